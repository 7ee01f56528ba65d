"""The comparison's stages wired under reproduce.output, run in order, each resumable.

  data     one token store per source (the data program), merged into `tokens/mix`
  cache    ONE teacher pass over the mix writing every `cache.outputs` store (the cache program)
  train/M  one student per `reproduce.methods` entry, same architecture, init and data order
           (the train program; `reproduce.epochs` sets the steps)
  eval     every student on each val_<source> split, the teacher online (compare.evaluation)
  grad     angle and norm ratio to the full-KD gradient (compare.gradcheck)
  timing   train-step time of each method relative to CE (compare.timing)
  report   results.json, plots, README section (compare.report)

Stage keys chain their inputs' fingerprints, so a changed config redoes what depends on it;
the programs never overwrite a store or run made with other settings unless told to
(data.overwrite=true, cache.overwrite=true; delete <output>/train/<method> for a student).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time

from rskd_jax.compare import evaluation, gradcheck, report, results, sources, timing
from rskd_jax.compare.config import CompareRun
from rskd_jax.compare.state import StageLog, fingerprint, hardware
from rskd_jax.config import CacheRun, DataRun, TrainRun, config_to_dict
from rskd_jax.configlib import load_config_dict
from rskd_jax.runpath import run_path, write_text


class Comparison:
    """The stage configs wired under reproduce.output, the state file, and the stages."""

    def __init__(self, cfg: CompareRun, argv: list[str] | None = None):
        self.cfg = cfg
        self.out = cfg.reproduce.output.rstrip("/")
        self.sources = sources.active_sources(cfg.reproduce)
        self.mix = f"{self.out}/tokens/mix"
        self.teacher_dir = f"{self.out}/teacher"
        self.argv = list(argv or [])
        self.log = StageLog(self.out)

    # ---- stage configs
    def data_runs(self) -> dict[str, DataRun]:
        return {
            s.name: DataRun(
                dataclasses.replace(
                    self.cfg.data,
                    inputs=s.inputs,
                    exclude=s.exclude,
                    max_tokens=s.max_tokens,
                    output=f"{self.out}/tokens/{s.name}",
                )
            )
            for s in self.sources
        }

    def cache_run(self) -> CacheRun:
        return CacheRun(
            cache=dataclasses.replace(self.cfg.cache, tokens=self.mix, output=self.teacher_dir),
            teacher=self.cfg.teacher,
            context=self.cfg.context,
            mesh=self.cfg.mesh,
        )

    def train_steps(self, batch_size: int | None = None) -> int:
        c = self.cfg
        if c.reproduce.epochs is None:
            return c.train.steps
        rows = self.log.result("data")["mix"]["rows"]["train"]
        return max(1, int(c.reproduce.epochs * rows // (batch_size or c.train.batch_size)))

    def store_url(self, store: str | None) -> str | None:
        return None if store is None else f"{self.teacher_dir}/{store}"

    def train_runs(self) -> dict[str, TrainRun]:
        c = self.cfg
        runs = {}
        for m in c.reproduce.methods:
            tcfg = TrainRun(
                train=dataclasses.replace(
                    c.train,
                    tokens=self.mix,
                    teacher_store=self.store_url(m.store),
                    epoch_stores=tuple(f"{self.teacher_dir}/{s}" for s in m.epoch_stores),
                    output=f"{self.out}/train/{m.name}",
                ),
                loss=dataclasses.replace(c.loss, method=m.loss, alpha=1.0 if m.loss == "ce" else c.loss.alpha),
                optim=c.optim,
                student=c.student,
                teacher=c.teacher,
                context=c.context,
                mesh=c.mesh,
            )
            if m.set:  # the method's own overrides, applied to the resolved sections
                tcfg = load_config_dict(TrainRun, config_to_dict(tcfg), m.set)
            if not any(o.partition("=")[0].strip() == "train.steps" for o in m.set):
                tcfg = dataclasses.replace(
                    tcfg, train=dataclasses.replace(tcfg.train, steps=self.train_steps(tcfg.train.batch_size))
                )
            runs[m.name] = tcfg
        return runs

    # ---- the program stages
    def run_data(self) -> dict:
        from rskd_jax import data

        r, summaries = self.cfg.reproduce, {}
        for name, dcfg in self.data_runs().items():
            dcfg = DataRun(dataclasses.replace(dcfg.data, inputs=sources.resolve_inputs(dcfg.data.inputs, r.docs_dir)))
            s = data.run(dcfg, progress=r.progress)
            summaries[name] = {k: s[k] for k in ("output", "rows", "tokens", "documents", "content_hash")}
            print(f"   {name}: {s['tokens']} tokens, rows {s['rows']}", flush=True)
        mix = sources.merge_token_stores({n: s["output"] for n, s in summaries.items()}, self.mix)
        print(f"   mix: rows {mix['rows']}", flush=True)
        return {"sources": summaries, "mix": mix}

    def run_cache(self) -> dict:
        from rskd_jax import cache

        s = cache.run(self.cache_run(), progress=self.cfg.reproduce.progress)
        keep = ("bytes_per_token", "bytes_per_token_by_array", "mean_unique_ids", "method", "k", "bytes_on_disk")
        return {
            "tokens_per_s": s["tokens_per_s"],
            "seconds": s["seconds"],
            "rows_written": s["rows_written"],
            "stores": {n: {k: st[k] for k in keep} for n, st in s["stores"].items()},
        }

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

    @staticmethod
    def run_train(tcfg: TrainRun) -> dict:
        from rskd_jax import train

        s = train.run(tcfg)
        return {k: s[k] for k in ("output", "steps", "loss", "eval", "checkpoint_step", "seconds")}

    @staticmethod
    def train_complete(tcfg: TrainRun) -> bool:
        from rskd_jax.checkpoint import Checkpointer
        from rskd_jax.runpath import run_path

        d = run_path(tcfg.train.output) / "checkpoints"
        if not d.is_dir():
            return False
        ckpt = Checkpointer(os.fspath(d), read_only=True)
        try:
            return ckpt.latest_step() == tcfg.train.steps
        finally:
            ckpt.close()

    # ---- the pipeline
    def run(self, *, estimate: bool = False) -> dict:
        c, r, log = self.cfg, self.cfg.reproduce, self.log
        started = time.perf_counter()
        data_key = {n: config_to_dict(d) for n, d in self.data_runs().items()}
        log.stage("data", data_key, self.run_data, outputs_ok=lambda: sources.token_store_ok(self.mix))
        if estimate:
            est = {**timing.estimate(self), "hardware": hardware()}
            write_text(run_path(r.results_dir) / "estimate.json", json.dumps(est, indent=1))
            return est
        if r.until == "data":
            return self.summary(started)
        # keys chain the upstream stages' fingerprints: changed tokens redo the cache, a changed
        # cache redoes the students that read it (the programs then refuse to overwrite a
        # different store or run: set data.overwrite / cache.overwrite, or delete the run dir)
        log.stage(
            "cache",
            {"cfg": config_to_dict(self.cache_run()), **log.fingerprints("data")},
            self.run_cache,
            outputs_ok=self.cache_complete,
        )
        if r.until == "cache":
            return self.summary(started)
        runs = self.train_runs()
        for name, tcfg in runs.items():
            up = log.fingerprints("data", "cache") if tcfg.train.teacher_store else log.fingerprints("data")
            log.stage(
                f"train/{name}",
                {"cfg": config_to_dict(tcfg), **up},
                lambda t=tcfg: self.run_train(t),
                outputs_ok=lambda t=tcfg: self.train_complete(t),
            )
        if r.until == "train":
            return self.summary(started)
        trained = log.fingerprints(*[f"train/{n}" for n in runs])
        eval_key = {
            "trained": trained,
            "teacher": config_to_dict(c.teacher),
            "sources": [s.name for s in self.sources],
            "batch": r.eval_batch_size,
            "max_rows": r.eval_max_rows,
            "chunk": c.loss.chunk_size,
        }
        log.stage("eval", eval_key, lambda: evaluation.evaluate_students(self, runs))
        if r.until == "eval":
            return self.summary(started)
        grad_key = {
            "trained": trained,
            **log.fingerprints("cache"),
            "at": r.grad_at,
            "batches": r.grad_batches,
            "batch": r.grad_batch_size,
            "loss": config_to_dict(c.loss),
        }
        log.stage("grad", grad_key, lambda: gradcheck.gradient_check(self, runs))
        if r.until == "grad":
            return self.summary(started)
        timing_key = {"trained": trained, "reps": r.timing_reps, "methods": r.timing_methods}
        log.stage("timing", timing_key, lambda: timing.time_steps(self, runs))
        if r.until == "timing":
            return self.summary(started)
        res = results.build_results(self, runs)
        log.stage(
            "report",
            fingerprint(res),
            lambda: report.write_report(self, runs, res),
            outputs_ok=lambda: report.report_ok(self, res),
        )
        return self.summary(started, res)

    def summary(self, started: float, res: dict | None = None) -> dict:
        out = {
            "output": self.out,
            "ran": self.log.ran,
            "skipped": self.log.skipped,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if res is not None:
            out["results"] = os.fspath(run_path(self.cfg.reproduce.results_dir) / "results.json")
            out["wall_time_s"] = res["wall_time_s"]
        return out

    def command(self) -> str:
        """The command line that reproduces this run (results.json, README)."""
        return shlex.join(["python", "-m", "rskd_jax.compare", *self.argv])
