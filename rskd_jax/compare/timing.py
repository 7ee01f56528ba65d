"""The timing stage and `--estimate`: train-step time of each method relative to CE.

time_steps      each method's jitted train step (AdamW included) on one batch, interleaved
                over reps after a warm-up (a busy machine slows all alike); medians
estimate        projected seconds per stage from a cache dry run and the step timing
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import numpy as np

from rskd_jax.compare.evaluation import eval_rows
from rskd_jax.compare.runtime import build_teacher, loss_spec, method_rows, setup, token_rows


def _synthetic_fields(cmp, m, b: int, length: int, vocab: int, rng) -> dict[str, np.ndarray]:
    """Store-shaped targets (for --estimate, before the stores exist)."""
    k = next(o.num_draws for o in cmp.cfg.cache.outputs if o.name == m.store)
    out = {
        "ids": rng.integers(0, vocab, (b, length, k)).astype(np.int32),
        "weights": np.full((b, length, k), 1.0 / k, np.float32),
    }
    if m.loss == "ghost":
        out["tail_mass"] = np.full((b, length), 0.1, np.float32)
    return out


def timed_methods(cmp) -> list:
    """reproduce.timing_methods (all if null), always with the CE baseline."""
    r = cmp.cfg.reproduce
    names = r.timing_methods or [m.name for m in r.methods]
    return [m for m in r.methods if m.name in names or m.name == r.ce_end]


def measure_steps(cmp, methods, reps: int, *, synthetic: bool = False) -> dict[str, Any]:
    """Median seconds of each method's train step on one batch of train.batch_size rows."""
    import jax

    from rskd_jax import optim, sharding
    from rskd_jax import train_step as ts
    from rskd_jax.model_spec import build_model
    from rskd_jax.train_data import host_batch

    c = cmp.cfg
    mesh, tokens, vocab = setup(cmp)
    b = c.train.batch_size
    student = build_model(c.student, vocab)
    graphdef, params = ts.split_model(student)
    schedule = optim.lr_schedule(c.optim.learning_rate, c.optim.warmup_steps, 1000, c.optim.end_lr_ratio)
    tx = optim.make_optimizer(
        schedule,
        b1=c.optim.b1,
        b2=c.optim.b2,
        eps=c.optim.eps,
        weight_decay=c.optim.weight_decay,
        clip_norm=c.optim.clip_norm,
    )
    state_sh = optim.state_shardings(params, ts.model_shardings(student, mesh), tx, mesh)
    state = optim.create_state(params, tx, c.train.seed, state_sh)
    idx = np.arange(b)
    rng = np.random.default_rng(0)
    teacher = None
    steps, batches = {}, {}
    for m in methods:
        if synthetic:
            host = host_batch(token_rows(cmp, tokens).read(idx), ())
            if m.store:
                host.update(_synthetic_fields(cmp, m, b, tokens.seq_len, vocab, rng))
        else:
            rows, fields = method_rows(cmp, m, tokens)
            host = host_batch(rows.read(idx), fields)
        batch = sharding.global_batch(host, mesh)
        if m.loss == "full_online" and teacher is None:
            teacher = build_teacher(cmp, vocab, mesh)
        tg, tsh = (teacher[0], teacher[2]) if m.loss == "full_online" else (None, None)
        fn = ts.make_train_step(graphdef, tx, schedule, loss_spec(cmp, m.loss, vocab), teacher_graphdef=tg)
        # not donated: every call starts from the same state
        steps[m.name] = jax.jit(
            fn,
            in_shardings=(state_sh, ts.batch_shardings(batch, mesh), tsh),
            out_shardings=(state_sh, sharding.replicated(mesh)),
        )
        batches[m.name] = (batch, teacher[1] if m.loss == "full_online" else None)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    first = {}
    for rep_i in range(reps + 1):
        for m in methods:
            batch, tp = batches[m.name]
            t = time.perf_counter()
            jax.block_until_ready(steps[m.name](state, batch, tp))
            if rep_i:
                times[m.name].append(time.perf_counter() - t)
            else:  # compile + first run
                first[m.name] = time.perf_counter() - t
    tokens_per_step = b * tokens.seq_len
    return {
        m.name: {
            "step_s": statistics.median(times[m.name]),
            "first_step_s": round(first[m.name], 2),
            "tokens_per_s": tokens_per_step / statistics.median(times[m.name]),
            "reps": reps,
        }
        for m in methods
    }


def metrics_throughput(run_dir: str) -> float | None:
    """Median tokens_per_s of a run's logged train steps (the first record, with the compile,
    dropped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    tps = [x["tokens_per_s"] for x in recs if not x.get("eval") and "tokens_per_s" in x][1:]
    return statistics.median(tps) if tps else None


def time_steps(cmp, runs: dict) -> dict[str, Any]:
    """Per method: interleaved step time (reproduce.timing_reps > 0) and the run's own median
    tokens/s; step_time_rel_ce from the interleaved timing when there is one."""
    c, r = cmp.cfg, cmp.cfg.reproduce
    out = {n: {"run_tokens_per_s": metrics_throughput(t.train.output)} for n, t in runs.items()}
    if r.timing_reps > 0:
        for name, v in measure_steps(cmp, timed_methods(cmp), r.timing_reps).items():
            out[name].update(v)
        source = f"interleaved timing, median of {r.timing_reps} steps of {c.train.batch_size} rows"
    else:
        source = "the runs' metrics.jsonl (median tokens/s of the logged steps)"
    ce = out[r.ce_end]
    for v in out.values():  # interleaved if both were timed, else the runs' own throughput
        if v.get("step_s") and ce.get("step_s"):
            v["step_time_rel_ce"], v["step_time_source"] = v["step_s"] / ce["step_s"], "interleaved"
        elif v["run_tokens_per_s"] and ce["run_tokens_per_s"]:
            v["step_time_rel_ce"], v["step_time_source"] = ce["run_tokens_per_s"] / v["run_tokens_per_s"], "run metrics"
        else:
            v["step_time_rel_ce"], v["step_time_source"] = None, None
    return {"methods": out, "source": source}


def estimate(cmp) -> dict[str, Any]:
    """Projected seconds per stage: the cache from a dry run (cache --dry-run), the students
    from an interleaved timing of each method's step on store-shaped synthetic targets."""
    from rskd_jax import cache

    c, r = cmp.cfg, cmp.cfg.reproduce
    dry = cache.run(cmp.cache_run(), dry_run=True, progress=r.progress)
    steps = cmp.train_steps()
    timing = measure_steps(cmp, list(r.methods), max(1, min(r.timing_reps, 2)), synthetic=True)
    data = cmp.log.result("data")
    seq_len = data["mix"]["tokens"]["train"] // max(data["mix"]["rows"]["train"], 1)
    val_tokens = seq_len * sum(
        len(eval_rows(data["mix"]["rows"][f"val_{s.name}"], r.eval_max_rows)) for s in cmp.sources
    )
    evals = (steps // c.train.eval_every if c.train.eval_every else 0) + 1
    eval_frac = evals * c.train.eval_batches / max(steps, 1) / 3  # forward only: ~1/3 of a step
    train = {n: round(v["step_s"] * steps * (1 + eval_frac), 1) for n, v in timing.items()}
    teacher_tps = dry["tokens_per_s"]  # teacher forward + sampling: a lower bound of forward speed
    full = {m.name for m in r.methods if m.loss == "full_online"}
    ce_s = timing[r.ce_end]["step_s"]
    full_s = next((v["step_s"] for n, v in timing.items() if n in full), 0.0)
    grad = r.grad_batches * (r.grad_batch_size / c.train.batch_size) * (full_s + ce_s * len(r.methods))
    proj = {
        "cache": dry["projected_seconds"],
        "train": train,
        "eval": round(val_tokens / teacher_tps + len(r.methods) * val_tokens / timing[r.ce_end]["tokens_per_s"] / 3, 1),
        "grad": round(grad, 1),
        "timing": round((r.timing_reps + 1) * sum(v["step_s"] for v in timing.values()), 1),
    }
    total = proj["cache"] + sum(train.values()) + proj["eval"] + proj["grad"] + proj["timing"]
    return {
        "estimate": True,
        "command": cmp.command(),
        "train_steps": steps,
        "train_tokens": steps * c.train.batch_size * seq_len,
        "cache_dry_run": dry,
        "step_timing": timing,
        "projected_seconds": proj,
        "projected_total_s": round(total, 1),
        "projected_total_h": round(total / 3600, 2),
    }
