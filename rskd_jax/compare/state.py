"""Resumable stages: the state file, stage fingerprints, and the machine the figures come from.

    log = StageLog("runs/reproduce")               # reads runs/reproduce/state.json if present
    result = log.stage("cache", key, run_cache, outputs_ok=cache_complete)

A stage runs unless state.json records it done with the same fingerprint of its key (a JSON
value: the stage's resolved config and its inputs' fingerprints) and its outputs still exist;
the seconds of interrupted attempts add up.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any


class CompareError(RuntimeError):
    """A stage cannot run; the message says what to do."""


# config keys that do not change a stage's outputs: left out of the stage fingerprints
NOT_IN_KEY = frozenset({"overwrite", "progress"})


def fingerprint(obj: Any) -> str:
    """16 hex digits of the sha256 of `obj` as sorted JSON, without the NOT_IN_KEY keys.

    >>> fingerprint({"a": 1, "progress": True}) == fingerprint({"a": 1})
    True
    """

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in NOT_IN_KEY}
        return [strip(v) for v in x] if isinstance(x, (list, tuple)) else x

    return hashlib.sha256(json.dumps(strip(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def hardware() -> dict[str, Any]:
    """Platform, CPU model, memory, load and the jax devices of this process."""
    import jax

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "backend": jax.default_backend(),
    }
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


class StageLog:
    """<output>/state.json: per stage its fingerprint, status, seconds and JSON result."""

    def __init__(self, output: str):
        from rskd_jax.runpath import run_path

        self.path = run_path(output) / "state.json"  # a local path or a gs://, s3://, file:// URL
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.state = self._load()
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def _load(self) -> dict:
        from rskd_jax.runpath import read_text

        text = read_text(self.path)
        return json.loads(text) if text is not None else {"version": 1, "stages": {}}

    def _save(self) -> None:
        from rskd_jax.runpath import write_text

        write_text(self.path, json.dumps(self.state, indent=1))  # insertion order: reads back identical

    @property
    def stages(self) -> dict[str, dict]:
        return self.state["stages"]

    def fingerprints(self, *names: str) -> dict[str, str]:
        """{stage: fingerprint} of finished or started stages (the keys of later ones)."""
        return {n: self.stages[n]["fingerprint"] for n in names}

    def result(self, name: str) -> Any:
        return self.stages[name]["result"]

    def stage(
        self, name: str, key: Any, fn: Callable[[], Any], *, outputs_ok: Callable[[], bool] = lambda: True
    ) -> Any:
        """Runs `fn` unless state.json records it done with the same fingerprint of `key` and
        its outputs still exist; returns its result as it reads back from state.json."""
        fp = fingerprint(key)
        rec = self.stages.get(name)
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
            self.stages[name] = {"fingerprint": fp, "status": status, "seconds": round(seconds, 2), "result": result}
            self._save()
        self.ran.append(name)
        print(f"   {name}: {seconds:.1f} s", flush=True)
        return result
