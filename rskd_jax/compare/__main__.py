"""`python -m rskd_jax.compare --config configs/reproduce.yaml [--estimate] [key=value ...]`."""

from __future__ import annotations

import json
import logging
import os
import sys

from rskd_jax.compare.config import CompareRun
from rskd_jax.compare.stages import Comparison
from rskd_jax.compare.state import CompareError
from rskd_jax.config import ConfigError, parse_cli

PROG = "python -m rskd_jax.compare"


def enable_compile_cache(out: str) -> None:
    """A persistent XLA compile cache under <out>/jax_cache (unless one is set already)."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    from rskd_jax.runpath import run_path

    # a local path or an object-store URL (jax's cache writes through etils.epath too)
    jax.config.update("jax_compilation_cache_dir", os.fspath(run_path(out) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    cfg, flags = parse_cli(CompareRun, argv, prog=PROG, flags=("estimate",))
    if cfg.reproduce.compile_cache:
        enable_compile_cache(cfg.reproduce.output)
    try:
        summary = Comparison(cfg, argv).run(estimate=flags["estimate"])
    except (CompareError, ConfigError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
