"""The model-running stages of tools/reproduce.py: evaluation, gradient check, step timing, estimate.

  evaluate_students  every student on each val_<source> split of the mix; the teacher runs once
                     per batch and is shared by all students: val loss, accuracy, ECE with its
                     15 reliability bins, exact KL(teacher || student) and top-1 agreement
                     (rskd_jax.evaluate.make_eval_fn with the teacher's logits as the batch's
                     `logprobs`; rskd_jax.metrics sums, kept before `finalize` for the bins)
  gradient_check     at fixed params (the CE student's final ones, or the init), the gradient
                     of each method's train loss w.r.t. the student parameters on fixed train
                     rows, vs the full-KD gradient (teacher online) on the same rows: angle and
                     norm ratio per batch, mean and std over reproduce.grad_batches batches.
                     The gradients come from rskd_jax.train_step.make_train_step itself (its
                     loss composition, chunking and masks), with an optax transformation that
                     returns the gradient as its state and a zero update.
  time_steps         each method's jitted train step (AdamW included) on one batch, interleaved
                     over reps after a warm-up (a busy machine slows all alike); medians
  estimate           projected seconds per stage from a cache dry run and the step timing
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np


def _setup(rep):
    from rskd_jax import sharding
    from rskd_jax.store.tokens import open_token_store
    from rskd_jax.train_data import tokenizer_vocab

    mesh = sharding.make_mesh(rep.cfg.mesh)
    tokens = open_token_store(rep.mix)
    return mesh, tokens, tokenizer_vocab(tokens)


def _teacher(rep, vocab: int, mesh):
    import jax

    from rskd_jax.model_spec import build_model
    from rskd_jax.train_step import model_shardings, split_model

    teacher = build_model(rep.cfg.teacher, vocab)
    graphdef, params = split_model(teacher)
    shardings = model_shardings(teacher, mesh)
    return graphdef, jax.device_put(params, shardings), shardings


def _pad_batch(tokens_bxL: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """tokens + mask for a batch padded to batch_size rows (padding rows fully masked)."""
    b, length = tokens_bxL.shape
    tokens = np.zeros((batch_size, length), np.int32)
    tokens[:b] = tokens_bxL
    mask = np.zeros((batch_size, length), np.int32)
    mask[:b] = 1
    return {"tokens": tokens, "mask": mask}


def _figures(total: dict) -> dict[str, Any]:
    from rskd_jax import metrics

    out = metrics.finalize(total)
    out["bins"] = {k: np.asarray(total[f"bin_{k}"]).tolist() for k in ("count", "conf", "correct")}
    return out


# ----------------------------------------------------------------------------- evaluation


def eval_rows(num_rows: int, max_rows: int | None) -> np.ndarray:
    """All rows, or max_rows evenly spaced ones (a val split is in path order: a prefix would
    be a few files)."""
    if max_rows is None or num_rows <= max_rows:
        return np.arange(num_rows)
    return np.unique(np.linspace(0, num_rows - 1, max_rows).round().astype(np.int64))


def evaluate_students(rep, runs: dict) -> dict[str, Any]:
    """{"teacher": {split: figures}, "students": {method: {split: figures}}, "rows": ...}; the
    split "all" pools every source's val rows."""
    import jax
    from flax import nnx

    from rskd_jax import evaluate, metrics, sharding
    from rskd_jax.train_step import prepare_targets

    r = rep.cfg.reproduce
    mesh, tokens, vocab = _setup(rep)
    sharding.check_batch(r.eval_batch_size, mesh, key="reproduce.eval_batch_size")
    students, fns = {}, []  # fns: [(graphdef, jitted eval fn)], one per distinct architecture
    for name, tcfg in runs.items():
        graphdef, params, _ = evaluate.load_student(tcfg.train.output, vocab, mesh)
        fn = next((f for g, f in fns if g == graphdef), None)
        if fn is None:
            raw = evaluate.make_eval_fn(graphdef, vocab_size=vocab, chunk_size=rep.cfg.loss.chunk_size)
            fn = evaluate.jit_eval_fn(raw, jax.tree.map(lambda a: a.sharding, params), mesh)
            fns.append((graphdef, fn))
        students[name] = (params, fn)
    tg, tparams, tsh = _teacher(rep, vocab, mesh)

    def teacher_fn(tp, batch):
        logits_BxLxV = metrics.mask_vocab(nnx.merge(tg, tp)(batch["tokens"]), vocab)
        t = prepare_targets(batch, "ce")
        return logits_BxLxV, metrics.lm_sums(logits_BxLxV, t["labels"], t["ce_where"])

    teacher_jit = jax.jit(teacher_fn, in_shardings=(tsh, None),
                          out_shardings=(sharding.batch_sharding(mesh, 3), sharding.replicated(mesh)))
    splits = [f"val_{s.name}" for s in rep.sources]
    totals: dict[str, dict[str, dict]] = {n: {} for n in [*runs, "<teacher>"]}
    rows = {}
    t0 = time.perf_counter()
    for split in splits:
        rows_S = eval_rows(tokens.num_rows(split), r.eval_max_rows)
        n = rows[split] = len(rows_S)
        for lo in range(0, n, r.eval_batch_size):
            idx = rows_S[lo:lo + r.eval_batch_size]
            batch = sharding.global_batch(_pad_batch(tokens.read(split, idx), r.eval_batch_size), mesh)
            logits, tsums = teacher_jit(tparams, batch)
            for key in (split, "all"):
                totals["<teacher>"][key] = metrics.accumulate(totals["<teacher>"].get(key), tsums)
            batch = dict(batch, logprobs=logits)  # raw logits: the eval fn log-softmaxes them
            for name, (params, fn) in students.items():
                sums = fn(params, None, batch)
                for key in (split, "all"):
                    totals[name][key] = metrics.accumulate(totals[name].get(key), sums)
            print(f"   eval {split}: rows {min(lo + r.eval_batch_size, n)}/{n}", flush=True)
    teacher = {k: _figures(v) for k, v in totals.pop("<teacher>").items()}
    return {"teacher": teacher, "students": {n: {k: _figures(v) for k, v in t.items()} for n, t in totals.items()},
            "rows": rows, "seconds": round(time.perf_counter() - t0, 2),
            "kl": "exact: sum_v t_v log(t_v / p_v), the teacher run online on every evaluated val row"}


# ----------------------------------------------------------------------------- gradient check


def _grad_capture():
    """An optax transformation whose state is the last gradient and whose update is zero."""
    import jax
    import jax.numpy as jnp
    import optax

    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _method_rows(rep, m, tokens):
    """The train-split row source of method m with its loss's teacher fields."""
    from rskd_jax.store.teacher import open_teacher_store
    from rskd_jax.train_data import LOSS_FIELDS, split_rows

    fields = LOSS_FIELDS[m.loss]
    store = open_teacher_store(rep.store_url(m.store)) if m.store else None
    return split_rows(tokens, store, "train", fields), fields


def _loss_spec(rep, loss: str, vocab: int):
    from rskd_jax.train_step import LossSpec

    lc = rep.cfg.loss
    return LossSpec(loss, 1.0 if loss == "ce" else lc.alpha, lc.kd_temperature, lc.z_loss, vocab, lc.chunk_size)


def gradient_check(rep, runs: dict) -> dict[str, Any]:
    """{method: {angle_deg, angle_deg_std, norm_ratio, norm_ratio_std, per_batch}} vs full KD."""
    import jax
    import jax.numpy as jnp

    from rskd_jax import evaluate, optim, sharding
    from rskd_jax import train_step as ts
    from rskd_jax.model_spec import build_model
    from rskd_jax.train_data import host_batch

    c, r = rep.cfg, rep.cfg.reproduce
    mesh, tokens, vocab = _setup(rep)
    sharding.check_batch(r.grad_batch_size, mesh, key="reproduce.grad_batch_size")
    if r.grad_at == "ce_final":
        graphdef, params, _ = evaluate.load_student(runs["ce"].train.output, vocab, mesh)
    else:
        student = build_model(c.student, vocab)
        graphdef, params = ts.split_model(student)
        params = jax.device_put(params, ts.model_shardings(student, mesh))
    tg, tparams, _ = _teacher(rep, vocab, mesh)
    tx = _grad_capture()
    state = optim.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0))

    def grad_fn(loss: str):
        step = ts.make_train_step(graphdef, tx, lambda s: 0.0, _loss_spec(rep, loss, vocab),
                                  teacher_graphdef=tg if loss == "full_online" else None)
        return jax.jit(lambda st, b, tp: step(st, b, tp)[0].opt_state)

    @jax.jit
    def compare(g, ref):
        dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)))
        sq = lambda t: sum(jnp.vdot(a, a) for a in jax.tree.leaves(t))  # noqa: E731
        return dot, sq(g), sq(ref)

    n_train = tokens.num_rows("train")
    need = r.grad_batches * r.grad_batch_size
    rng = np.random.default_rng(c.train.seed)
    idx_all = rng.choice(n_train, size=need, replace=need > n_train).reshape(r.grad_batches, r.grad_batch_size)
    methods = [m for m in r.methods if m.loss != "full_online"]
    sources = {m.name: _method_rows(rep, m, tokens) for m in methods}
    ref_fn = grad_fn("full_online")
    fns = {}
    per_batch: dict[str, list] = {m.name: [] for m in methods}
    for b, idx in enumerate(idx_all):
        base = sharding.global_batch(host_batch({"tokens": tokens.read("train", idx), "index": idx}, ()), mesh)
        ref = ref_fn(state, base, tparams)
        for m in methods:
            rows, fields = sources[m.name]
            batch = sharding.global_batch(host_batch(rows.read(idx), fields), mesh)
            if m.loss not in fns:
                fns[m.loss] = grad_fn(m.loss)
            g = fns[m.loss](state, batch, None)
            dot, gg, rr = (float(x) for x in compare(g, ref))
            cos = max(-1.0, min(1.0, dot / math.sqrt(gg * rr)))
            per_batch[m.name].append({"angle_deg": math.degrees(math.acos(cos)), "norm_ratio": math.sqrt(gg / rr)})
        print(f"   grad batch {b + 1}/{r.grad_batches}", flush=True)
    out: dict[str, Any] = {}
    for name, recs in per_batch.items():
        a = [x["angle_deg"] for x in recs]
        q = [x["norm_ratio"] for x in recs]
        out[name] = {"angle_deg": statistics.fmean(a), "angle_deg_std": statistics.pstdev(a),
                     "norm_ratio": statistics.fmean(q), "norm_ratio_std": statistics.pstdev(q), "per_batch": recs}
    return {"methods": out, "at": r.grad_at, "rows": idx_all.tolist(),
            "note": (f"student-parameter gradient of each method's train loss (train_step.make_train_step, alpha="
                     f"{c.loss.alpha}) vs the full-KD gradient (teacher online), both at the "
                     f"{'CE student final' if r.grad_at == 'ce_final' else 'initial'} params, on "
                     f"{r.grad_batches} fixed batches of {r.grad_batch_size} train rows (each method's stored "
                     "draw for those rows); mean and std over the batches")}


# ----------------------------------------------------------------------------- step timing


def _synthetic_fields(rep, m, b: int, length: int, vocab: int, rng) -> dict[str, np.ndarray]:
    """Store-shaped targets (for --estimate, before the stores exist)."""
    k = next(o.num_draws for o in rep.cfg.cache.outputs if o.name == m.store)
    out = {"ids": rng.integers(0, vocab, (b, length, k)).astype(np.int32),
           "weights": np.full((b, length, k), 1.0 / k, np.float32)}
    if m.loss == "ghost":
        out["tail_mass"] = np.full((b, length), 0.1, np.float32)
    return out


def _timed_methods(rep):
    r = rep.cfg.reproduce
    names = r.timing_methods or [m.name for m in r.methods]
    return [m for m in r.methods if m.name in names or m.name == "ce"]


def measure_steps(rep, methods, reps: int, *, synthetic: bool = False) -> dict[str, Any]:
    """Median seconds of each method's train step on one batch of train.batch_size rows."""
    import jax

    from rskd_jax import optim, sharding
    from rskd_jax import train_step as ts
    from rskd_jax.model_spec import build_model
    from rskd_jax.train_data import host_batch

    c = rep.cfg
    mesh, tokens, vocab = _setup(rep)
    b = c.train.batch_size
    student = build_model(c.student, vocab)
    graphdef, params = ts.split_model(student)
    schedule = optim.lr_schedule(c.optim.learning_rate, c.optim.warmup_steps, 1000, c.optim.end_lr_ratio)
    tx = optim.make_optimizer(schedule, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                              weight_decay=c.optim.weight_decay, clip_norm=c.optim.clip_norm)
    state_sh = optim.state_shardings(params, ts.model_shardings(student, mesh), tx, mesh)
    state = optim.create_state(params, tx, c.train.seed, state_sh)
    idx = np.arange(b)
    rng = np.random.default_rng(0)
    teacher = None
    steps, batches = {}, {}
    for m in methods:
        if synthetic:
            host = host_batch({"tokens": tokens.read("train", idx), "index": idx}, ())
            if m.store:
                host.update(_synthetic_fields(rep, m, b, tokens.seq_len, vocab, rng))
        else:
            rows, fields = _method_rows(rep, m, tokens)
            host = host_batch(rows.read(idx), fields)
        batch = sharding.global_batch(host, mesh)
        if m.loss == "full_online" and teacher is None:
            teacher = _teacher(rep, vocab, mesh)
        tg, tsh = (teacher[0], teacher[2]) if m.loss == "full_online" else (None, None)
        fn = ts.make_train_step(graphdef, tx, schedule, _loss_spec(rep, m.loss, vocab), teacher_graphdef=tg)
        # not donated: every call starts from the same state
        steps[m.name] = jax.jit(fn, in_shardings=(state_sh, ts.batch_shardings(batch, mesh), tsh),
                                out_shardings=(state_sh, sharding.replicated(mesh)))
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
    return {m.name: {"step_s": statistics.median(times[m.name]), "first_step_s": round(first[m.name], 2),
                     "tokens_per_s": tokens_per_step / statistics.median(times[m.name]), "reps": reps}
            for m in methods}


def metrics_throughput(run_dir: str) -> float | None:
    """Median tokens_per_s of a run's logged train steps (the first record, with the compile,
    dropped)."""
    import json
    import os

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    tps = [x["tokens_per_s"] for x in recs if not x.get("eval") and "tokens_per_s" in x][1:]
    return statistics.median(tps) if tps else None


def time_steps(rep, runs: dict) -> dict[str, Any]:
    """Per method: interleaved step time (reproduce.timing_reps > 0) and the run's own median
    tokens/s; step_time_rel_ce from the interleaved timing when there is one."""
    c, r = rep.cfg, rep.cfg.reproduce
    out = {n: {"run_tokens_per_s": metrics_throughput(t.train.output)} for n, t in runs.items()}
    if r.timing_reps > 0:
        for name, v in measure_steps(rep, _timed_methods(rep), r.timing_reps).items():
            out[name].update(v)
        source = f"interleaved timing, median of {r.timing_reps} steps of {c.train.batch_size} rows"
    else:
        source = "the runs' metrics.jsonl (median tokens/s of the logged steps)"
    ce = out["ce"]
    for v in out.values():  # interleaved if both were timed, else the runs' own throughput
        if v.get("step_s") and ce.get("step_s"):
            v["step_time_rel_ce"], v["step_time_source"] = v["step_s"] / ce["step_s"], "interleaved"
        elif v["run_tokens_per_s"] and ce["run_tokens_per_s"]:
            v["step_time_rel_ce"], v["step_time_source"] = ce["run_tokens_per_s"] / v["run_tokens_per_s"], "run metrics"
        else:
            v["step_time_rel_ce"], v["step_time_source"] = None, None
    return {"methods": out, "source": source}


# ----------------------------------------------------------------------------- estimate


def estimate(rep) -> dict[str, Any]:
    """Projected seconds per stage: the cache from a dry run (cache --dry-run), the students
    from an interleaved timing of each method's step on store-shaped synthetic targets."""
    from rskd_jax import cache

    c, r = rep.cfg, rep.cfg.reproduce
    dry = cache.run(rep.cache_run(), dry_run=True, progress=r.progress)
    steps = rep.train_steps()
    timing = measure_steps(rep, list(r.methods), max(1, min(r.timing_reps, 2)), synthetic=True)
    data = rep.result("data")
    seq_len = data["mix"]["tokens"]["train"] // max(data["mix"]["rows"]["train"], 1)
    val_tokens = seq_len * sum(len(eval_rows(data["mix"]["rows"][f"val_{s.name}"], r.eval_max_rows))
                               for s in rep.sources)
    evals = (steps // c.train.eval_every if c.train.eval_every else 0) + 1
    eval_frac = evals * c.train.eval_batches / max(steps, 1) / 3  # forward only: ~1/3 of a step
    train = {n: round(v["step_s"] * steps * (1 + eval_frac), 1) for n, v in timing.items()}
    teacher_tps = dry["tokens_per_s"]  # teacher forward + sampling: a lower bound of forward speed
    ce_s, full_s = timing["ce"]["step_s"], next((v["step_s"] for n, v in timing.items()
                                                 if n in {m.name for m in r.methods if m.loss == "full_online"}), 0.0)
    grad = r.grad_batches * (r.grad_batch_size / c.train.batch_size) * (full_s + ce_s * len(r.methods))
    proj = {"cache": dry["projected_seconds"], "train": train,
            "eval": round(val_tokens / teacher_tps + len(r.methods) * val_tokens / timing["ce"]["tokens_per_s"] / 3, 1),
            "grad": round(grad, 1), "timing": round((r.timing_reps + 1) * sum(v["step_s"] for v in timing.values()), 1)}
    total = proj["cache"] + sum(train.values()) + proj["eval"] + proj["grad"] + proj["timing"]
    return {"estimate": True, "command": rep.command(),
            "train_steps": steps, "train_tokens": steps * c.train.batch_size * seq_len,
            "cache_dry_run": dry, "step_timing": timing,
            "projected_seconds": proj, "projected_total_s": round(total, 1),
            "projected_total_h": round(total / 3600, 2)}
