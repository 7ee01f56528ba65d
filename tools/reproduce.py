"""Reproduce the paper's comparison on this machine: data -> ONE teacher pass -> students -> table.

    python tools/reproduce.py --config configs/reproduce.yaml [--estimate] [key=value ...]

Stages (each resumable; progress and results go to <reproduce.output>/state.json):
  data     one token store per text source (the data program; '@pydoc' inputs are the reST
           sources of the Debian package python3.11-doc, fetched with apt-get download if
           missing), merged into one store `tokens/mix`: train = every source's train rows,
           val = every source's val rows, val_<source> = one source's val rows
  cache    ONE teacher pass over the mix writing every `cache.outputs` store (the cache program)
  train/M  one student per `reproduce.methods` entry, same architecture, init and data order
           (the train program; `reproduce.epochs` sets the steps)
  eval     every student on each val_<source> split against the teacher run online: val loss,
           ECE (+ reliability bins), exact KL(teacher || student), top-1 agreement
  grad     the gradient check: angle and norm ratio between each method's student-parameter
           gradient and the full-KD gradient at the same params, on fixed batches of train rows
  timing   train-step time of each method relative to CE, interleaved on one batch
  report   docs/results/results.json, plots, and the Results section of the README (between
           `<!-- results:start -->` and `<!-- results:end -->`; printed if the markers are absent)

A stage whose recorded fingerprint (its resolved config) matches and whose outputs exist is
skipped; an interrupted one resumes (the stores and the train runs resume where they stopped).
Stage keys chain their inputs' fingerprints, so a changed config redoes what depends on it; the
programs never overwrite a store or run made with other settings unless told to
(data.overwrite=true, cache.overwrite=true; delete <output>/train/<method> for a student).
`--estimate` runs the data stage, a cache dry run and a short interleaved step timing, and
prints the projected wall time of every stage (also written to <results_dir>/estimate.json)
instead of running them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Literal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the reproduce_* helpers

from rskd_jax.config import (CacheRun, ConfigError, DataRun, PipelineRun, TrainRun, config_to_dict,  # noqa: E402
                             opt, parse_cli)

STAGES = ("data", "cache", "train", "eval", "grad", "timing", "report")
PYDOC = "@pydoc"
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"


class ReproduceError(RuntimeError):
    """A stage cannot run; the message says what to do."""


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One text source: its own token store, its own val split in the mix."""

    name: str = opt("stdlib", "source name: the mix's val split is val_<name>")
    inputs: tuple[str, ...] = opt(("@stdlib",), "files/dirs/globs; '@pydoc[/sub]' = the python3.11-doc reST sources")
    max_tokens: int | None = opt(None, "stop after about this many tokens (train + val), in sorted path order")
    exclude: tuple[str, ...] = opt((), "fnmatch patterns of paths to skip")

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(f"source name {self.name!r} must be alphanumeric (and '_')")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """One student: its loss and the cache output (store) it trains from."""

    name: str = opt("ce", "method name (run dir train/<name>, results row)")
    loss: Literal["ce", "sparse", "ghost", "full_online"] = opt("ce", "loss.method of its train run")
    store: str | None = opt(None, "cache output it trains from (sparse, ghost)")

    def __post_init__(self):
        if (self.loss in ("sparse", "ghost")) != (self.store is not None):
            raise ConfigError(f"method {self.name!r}: loss {self.loss!r} "
                              f"{'needs' if self.store is None else 'takes no'} a store")


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    output: str = opt("runs/reproduce", "every store, run and state.json go under this directory")
    docs: bool = opt(True, "include sources that read '@pydoc' (false: drop them, no apt needed)")
    docs_dir: str = opt("runs/pydoc", "where python3.11-doc is extracted (fetched if missing)")
    sources: tuple[SourceConfig, ...] = opt((SourceConfig(),), "text sources")
    methods: tuple[MethodConfig, ...] = opt((MethodConfig(),), "students")
    epochs: float | None = opt(1.0, "train steps = epochs * train rows / train.batch_size (null: train.steps)")
    eval_batch_size: int = opt(8, "rows per eval batch (teacher online)")
    eval_max_rows: int | None = opt(None, "val rows per source evaluated (null: all)")
    grad_at: Literal["ce_final", "init"] = opt("ce_final", "params of the gradient check")
    grad_batches: int = opt(4, "batches of the gradient check (figures are averaged over them)")
    grad_batch_size: int = opt(4, "rows per gradient-check batch")
    timing_reps: int = opt(5, "interleaved timed steps per method (0: use the runs' metrics)")
    timing_methods: tuple[str, ...] | None = opt(None, "methods timed (null: all)")
    reliability: tuple[str, ...] = opt(("ce", "top_k_12", "rskd_n50", "full_kd"), "reliability diagrams")
    results_dir: str = opt("docs/results", "results.json and plots")
    readme: str | None = opt("README.md", "README whose Results markers are filled (null: print)")
    compile_cache: bool = opt(True, "persistent XLA compile cache under <output>/jax_cache")
    until: str | None = opt(None, "stop after this stage: " + ", ".join(STAGES))
    progress: bool = opt(True, "progress bars")

    def __post_init__(self):
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"reproduce.methods needs unique names, got {names}")
        if "ce" not in names:
            raise ConfigError("reproduce.methods must include a method named 'ce' (the baseline)")
        if len({s.name for s in self.sources}) != len(self.sources) or not self.sources:
            raise ConfigError("reproduce.sources needs at least one source and unique names")
        if self.until is not None and self.until not in STAGES:
            raise ConfigError(f"reproduce.until must be one of {STAGES}, got {self.until!r}")
        for name in ("eval_batch_size", "grad_batches", "grad_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reproduce.{name} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ReproduceRun(PipelineRun):
    """Root config: the reproduction plus the sections every program shares."""

    reproduce: ReproduceConfig = opt(ReproduceConfig())

    def __post_init__(self):
        stores = {o.name for o in self.cache.outputs}
        for m in self.reproduce.methods:
            if m.store is not None and m.store not in stores:
                raise ConfigError(f"method {m.name!r} trains from store {m.store!r}, which is not "
                                  f"in cache.outputs ({sorted(stores)})")


# ----------------------------------------------------------------------------- helpers


# config keys that do not change a stage's outputs: left out of the stage fingerprints
NOT_IN_KEY = frozenset({"overwrite", "progress"})


def fingerprint(obj: Any) -> str:
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in NOT_IN_KEY}
        return [strip(v) for v in x] if isinstance(x, (list, tuple)) else x

    return hashlib.sha256(json.dumps(strip(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def ensure_python_docs(docs_dir: str) -> str:
    """The python3.11-doc reST sources dir, extracted into `docs_dir` first if missing
    (`apt-get download python3.11-doc && dpkg-deb -x python3.11-doc*.deb DIR`, no install)."""
    sources = os.path.join(docs_dir, PYDOC_SOURCES)
    if os.path.isdir(sources):
        return sources
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise ReproduceError(
            f"the Python docs corpus is not in {docs_dir} and {' and '.join(missing)} "
            "is not available to fetch it. On a Debian/Ubuntu machine run `apt-get download "
            f"python3.11-doc && dpkg-deb -x python3.11-doc*.deb {docs_dir}`, copy the extracted "
            f"tree here, or drop the docs source with reproduce.docs=false")
    print(f"fetching python3.11-doc into {docs_dir} (apt-get download, no install)", flush=True)
    with tempfile.TemporaryDirectory(prefix="pydoc-") as tmp:
        got = subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, capture_output=True, text=True)
        debs = [f for f in os.listdir(tmp) if f.startswith("python3.11-doc") and f.endswith(".deb")]
        if got.returncode or not debs:
            raise ReproduceError(
                f"`apt-get download python3.11-doc` failed ({got.stderr.strip()[-300:]}); try "
                "`apt-get update` first, or set reproduce.docs=false to run without the docs corpus")
        os.makedirs(docs_dir, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", os.path.join(tmp, debs[0]), docs_dir], check=True)
    if not os.path.isdir(sources):
        raise ReproduceError(f"python3.11-doc was extracted to {docs_dir} but has no {PYDOC_SOURCES}")
    return sources


def resolve_inputs(inputs, docs_dir: str) -> tuple[str, ...]:
    """'@pydoc' / '@pydoc/sub' -> paths under the extracted docs (fetched on first use)."""
    out = []
    for item in inputs:
        if item == PYDOC or item.startswith(PYDOC + "/"):
            item = ensure_python_docs(docs_dir) + item[len(PYDOC):]
        out.append(item)
    return tuple(out)


def active_sources(r: ReproduceConfig) -> tuple[SourceConfig, ...]:
    uses_docs = lambda s: any(i == PYDOC or i.startswith(PYDOC + "/") for i in s.inputs)  # noqa: E731
    kept = tuple(s for s in r.sources if r.docs or not uses_docs(s))
    if not kept:
        raise ConfigError("reproduce.docs=false drops every source; add one without '@pydoc'")
    return kept


def hardware() -> dict[str, Any]:
    import jax

    info = {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "cpu_count": os.cpu_count(), "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "backend": jax.default_backend()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        info["cpu"] = model
        with open("/proc/meminfo", encoding="utf-8") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except (OSError, StopIteration, ValueError):
        pass
    return info


# ----------------------------------------------------------------------------- the pipeline


class Reproduction:
    """The stage configs wired under reproduce.output, the state file, and the stages."""

    def __init__(self, cfg: ReproduceRun, argv: list[str] | None = None):
        self.cfg, r = cfg, cfg.reproduce
        self.out = r.output.rstrip("/")
        self.sources = active_sources(r)
        self.mix = f"{self.out}/tokens/mix"
        self.teacher_dir = f"{self.out}/teacher"
        self.argv = list(argv or [])
        self.state_path = os.path.join(self.out, "state.json")
        os.makedirs(self.out, exist_ok=True)
        self.state = self._load_state()
        self.ran: list[str] = []
        self.skipped: list[str] = []

    # ---- state
    def _load_state(self) -> dict:
        if os.path.exists(self.state_path):
            with open(self.state_path, encoding="utf-8") as f:
                return json.load(f)
        return {"version": 1, "stages": {}}

    def _save_state(self) -> None:
        tmp = self.state_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.state, f, indent=1)  # insertion order: reads back identical
        os.replace(tmp, self.state_path)

    def stage(self, name: str, key: Any, fn: Callable[[], Any], *, outputs_ok: Callable[[], bool] = lambda: True):
        """Runs `fn` unless state.json records it done with the same fingerprint of `key` and
        its outputs still exist. Seconds of interrupted attempts add up."""
        fp = fingerprint(key)
        rec = self.state["stages"].get(name)
        if rec and rec.get("fingerprint") == fp and rec.get("status") == "done" and outputs_ok():
            self.skipped.append(name)
            print(f"== {name}: done earlier ({rec['seconds']:.0f} s), skipped", flush=True)
            return rec["result"]
        before = rec["seconds"] if rec and rec.get("fingerprint") == fp and rec.get("status") != "done" else 0.0
        print(f"== {name}", flush=True)
        if name != "report":  # the machine the results come from
            self.state["hardware"] = hardware()
        t0, status, result = time.perf_counter(), "interrupted", None
        try:
            result = json.loads(json.dumps(fn()))  # as it reads back from state.json
            status = "done"
        finally:
            seconds = before + time.perf_counter() - t0
            self.state["stages"][name] = {"fingerprint": fp, "status": status, "seconds": round(seconds, 2),
                                          "result": result}
            self._save_state()
        self.ran.append(name)
        print(f"   {name}: {seconds:.1f} s", flush=True)
        return result

    def result(self, name: str) -> Any:
        return self.state["stages"][name]["result"]

    # ---- stage configs
    def data_runs(self) -> dict[str, DataRun]:
        return {s.name: DataRun(dataclasses.replace(
            self.cfg.data, inputs=s.inputs, exclude=s.exclude, max_tokens=s.max_tokens,
            output=f"{self.out}/tokens/{s.name}")) for s in self.sources}

    def cache_run(self) -> CacheRun:
        return CacheRun(cache=dataclasses.replace(self.cfg.cache, tokens=self.mix, output=self.teacher_dir),
                        teacher=self.cfg.teacher, mesh=self.cfg.mesh)

    def train_steps(self) -> int:
        c = self.cfg
        if c.reproduce.epochs is None:
            return c.train.steps
        rows = self.result("data")["mix"]["rows"]["train"]
        return max(1, int(c.reproduce.epochs * rows // c.train.batch_size))

    def store_url(self, store: str | None) -> str | None:
        return None if store is None else f"{self.teacher_dir}/{store}"

    def train_runs(self) -> dict[str, TrainRun]:
        c, steps = self.cfg, self.train_steps()
        runs = {}
        for m in c.reproduce.methods:
            runs[m.name] = TrainRun(
                train=dataclasses.replace(c.train, tokens=self.mix, teacher_store=self.store_url(m.store),
                                          output=f"{self.out}/train/{m.name}", steps=steps),
                loss=dataclasses.replace(c.loss, method=m.loss, alpha=1.0 if m.loss == "ce" else c.loss.alpha),
                optim=c.optim, student=c.student, teacher=c.teacher, mesh=c.mesh)
        return runs

    # ---- stages
    def run_data(self) -> dict:
        from rskd_jax import data

        r, summaries = self.cfg.reproduce, {}
        for name, dcfg in self.data_runs().items():
            dcfg = DataRun(dataclasses.replace(dcfg.data, inputs=resolve_inputs(dcfg.data.inputs, r.docs_dir)))
            s = data.run(dcfg, progress=r.progress)
            summaries[name] = {k: s[k] for k in ("output", "rows", "tokens", "documents", "content_hash")}
            print(f"   {name}: {s['tokens']} tokens, rows {s['rows']}", flush=True)
        mix = merge_token_stores({n: s["output"] for n, s in summaries.items()}, self.mix)
        print(f"   mix: rows {mix['rows']}", flush=True)
        return {"sources": summaries, "mix": mix}

    def run_cache(self) -> dict:
        from rskd_jax import cache

        s = cache.run(self.cache_run(), progress=self.cfg.reproduce.progress)
        keep = ("bytes_per_token", "bytes_per_token_by_array", "mean_unique_ids", "method", "k", "bytes_on_disk")
        return {"tokens_per_s": s["tokens_per_s"], "seconds": s["seconds"], "rows_written": s["rows_written"],
                "stores": {n: {k: st[k] for k in keep} for n, st in s["stores"].items()}}

    def cache_complete(self) -> bool:
        from rskd_jax.store.teacher import open_teacher_store

        try:
            for o in self.cfg.cache.outputs:
                store = open_teacher_store(f"{self.teacher_dir}/{o.name}")
                if not all(store.done_mask(s).all() for s in store.splits):
                    return False
        except (ValueError, OSError):
            return False
        return True

    def run_train(self, name: str, tcfg: TrainRun) -> dict:
        from rskd_jax import train

        s = train.run(tcfg)
        return {k: s[k] for k in ("output", "steps", "loss", "eval", "checkpoint_step", "seconds")}

    def train_complete(self, tcfg: TrainRun) -> bool:
        from rskd_jax.checkpoint import Checkpointer

        d = os.path.join(os.path.abspath(tcfg.train.output), "checkpoints")
        if not os.path.isdir(d):
            return False
        ckpt = Checkpointer(d, read_only=True)
        try:
            return ckpt.latest_step() == tcfg.train.steps
        finally:
            ckpt.close()

    def run(self, *, estimate: bool = False) -> dict:
        c, r = self.cfg, self.cfg.reproduce
        started = time.perf_counter()
        data_key = {n: config_to_dict(d) for n, d in self.data_runs().items()}
        self.stage("data", data_key, self.run_data, outputs_ok=lambda: _token_store_ok(self.mix))
        if estimate:
            import reproduce_eval

            est = {**reproduce_eval.estimate(self), "hardware": hardware()}
            os.makedirs(r.results_dir, exist_ok=True)
            with open(os.path.join(r.results_dir, "estimate.json"), "w", encoding="utf-8") as f:
                json.dump(est, f, indent=1)
            return est
        if r.until == "data":
            return self.summary(started)
        # keys chain the upstream stages' fingerprints: changed tokens redo the cache, a changed
        # cache redoes the students that read it (the programs then refuse to overwrite a
        # different store or run: set data.overwrite / cache.overwrite, or delete the run dir)
        fps = lambda *names: {n: self.state["stages"][n]["fingerprint"] for n in names}  # noqa: E731
        self.stage("cache", {"cfg": config_to_dict(self.cache_run()), **fps("data")}, self.run_cache,
                   outputs_ok=self.cache_complete)
        if r.until == "cache":
            return self.summary(started)
        runs = self.train_runs()
        for name, tcfg in runs.items():
            up = fps("data", "cache") if tcfg.train.teacher_store else fps("data")
            self.stage(f"train/{name}", {"cfg": config_to_dict(tcfg), **up}, lambda n=name, t=tcfg: self.run_train(n, t),
                       outputs_ok=lambda t=tcfg: self.train_complete(t))
        if r.until == "train":
            return self.summary(started)
        import reproduce_eval

        trained = {n: self.state["stages"][f"train/{n}"]["fingerprint"] for n in runs}
        eval_key = {"trained": trained, "teacher": config_to_dict(c.teacher), "sources": [s.name for s in self.sources],
                    "batch": r.eval_batch_size, "max_rows": r.eval_max_rows, "chunk": c.loss.chunk_size}
        self.stage("eval", eval_key, lambda: reproduce_eval.evaluate_students(self, runs))
        if r.until == "eval":
            return self.summary(started)
        grad_key = {"trained": trained, "cache": self.state["stages"]["cache"]["fingerprint"], "at": r.grad_at,
                    "batches": r.grad_batches, "batch": r.grad_batch_size, "loss": config_to_dict(c.loss)}
        self.stage("grad", grad_key, lambda: reproduce_eval.gradient_check(self, runs))
        if r.until == "grad":
            return self.summary(started)
        timing_key = {"trained": trained, "reps": r.timing_reps, "methods": r.timing_methods}
        self.stage("timing", timing_key, lambda: reproduce_eval.time_steps(self, runs))
        if r.until == "timing":
            return self.summary(started)
        import reproduce_report

        results = reproduce_report.build_results(self, runs)
        self.stage("report", fingerprint(results), lambda: reproduce_report.write_report(self, runs, results),
                   outputs_ok=lambda: reproduce_report.report_ok(self, results))
        return self.summary(started, results)

    def summary(self, started: float, results: dict | None = None) -> dict:
        out = {"output": self.out, "ran": self.ran, "skipped": self.skipped,
               "seconds": round(time.perf_counter() - started, 1)}
        if results is not None:
            out["results"] = os.path.join(self.cfg.reproduce.results_dir, "results.json")
            out["wall_time_s"] = results["wall_time_s"]
        return out

    def command(self) -> str:
        return shlex.join(["python", "tools/reproduce.py", *self.argv])


def _token_store_ok(url: str) -> bool:
    from rskd_jax.store.tokens import open_token_store

    try:
        open_token_store(url)
        return True
    except (ValueError, OSError):
        return False


def merge_token_stores(stores: dict[str, str], output: str) -> dict:
    """{source: token store} -> one store: train / val = the sources' rows concatenated in
    source order, val_<source> = that source's val rows. Rows are copied, never re-cut, so
    each val_<source> holds exactly the documents of that source's val split."""
    import numpy as np

    from rskd_jax.store.tokens import open_token_store, write_token_store

    opened = {n: open_token_store(u) for n, u in stores.items()}
    first = next(iter(opened.values()))
    for n, s in opened.items():
        if s.manifest["tokenizer"] != first.manifest["tokenizer"] or s.seq_len != first.seq_len:
            raise ReproduceError(f"source {n!r} was tokenized differently (tokenizer or seq_len)")
    rows = lambda s, split: s.read(split, np.arange(s.num_rows(split))) if split in s.splits else \
        np.zeros((0, s.seq_len), np.int32)  # noqa: E731
    vals = [rows(s, "val") for s in opened.values()]
    # val rows round-robin over the sources: the train-time eval (its first eval_batches
    # batches, in order) sees every source, not just the first one
    order = sorted((i / len(v), k, i) for k, v in enumerate(vals) for i in range(len(v)))
    splits = {"train": np.concatenate([rows(s, "train") for s in opened.values()]),
              "val": np.stack([vals[k][i] for _, k, i in order]) if order else vals[0]}
    splits.update({f"val_{n}": v for n, v in zip(opened, vals)})
    manifest = {"tokenizer": first.manifest["tokenizer"], "eos_id": first.manifest.get("eos_id"),
                "sources": [{"name": n, "tokens": s.url, "content_hash": s.fingerprint,
                             "rows": {k: s.num_rows(k) for k in s.splits}} for n, s in opened.items()],
                "mix": "train: the sources' train rows concatenated in this order; val: their val rows "
                       "interleaved in proportion; val_<name>: one source's val rows"}
    final = write_token_store(output, splits, manifest, overwrite=True)
    return {"output": output, "content_hash": final["content_hash"],
            "rows": {k: int(v.shape[0]) for k, v in splits.items()},
            "tokens": {k: int(v.size) for k, v in splits.items()}}


def _enable_compile_cache(out: str) -> None:
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(out, "jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: list[str] | None = None) -> None:
    import logging

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    cfg, flags = parse_cli(ReproduceRun, argv, prog="python tools/reproduce.py", flags=("estimate",))
    if cfg.reproduce.compile_cache:
        _enable_compile_cache(cfg.reproduce.output)
    try:
        summary = Reproduction(cfg, argv).run(estimate=flags["estimate"])
    except (ReproduceError, ConfigError) as err:
        print(f"python tools/reproduce.py: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
