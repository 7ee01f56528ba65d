"""The grad stage: how far each method's gradient is from the full-KD gradient.

At fixed params (the CE student's final ones, or the init), the gradient of each method's
train loss w.r.t. the student parameters on fixed train rows, vs the full-KD gradient
(teacher online) on the same rows: angle and norm ratio per batch, mean and std over
reproduce.grad_batches batches. The gradients come from `train_step.loss_and_grad`, the
function whose gradients the train step applies (its targets, loss composition, chunking and
masks), without an optimizer.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from rskd_jax.compare.runtime import build_teacher, loss_spec, method_rows, setup, token_rows


def gradient_check(cmp, runs: dict) -> dict[str, Any]:
    """{"methods": {method: {angle_deg, angle_deg_std, norm_ratio, norm_ratio_std, per_batch}},
    "at", "rows", "note"}: every method except full_online against the full-KD gradient."""
    import jax
    import jax.numpy as jnp

    from rskd_jax import evaluate, sharding
    from rskd_jax import train_step as ts
    from rskd_jax.model_spec import build_model
    from rskd_jax.train_data import host_batch

    c, r = cmp.cfg, cmp.cfg.reproduce
    mesh, tokens, vocab = setup(cmp)
    sharding.check_batch(r.grad_batch_size, mesh, key="reproduce.grad_batch_size")
    if r.grad_at == "ce_final":
        graphdef, params, _ = evaluate.load_student(runs[r.ce_end].train.output, vocab, mesh)
    else:
        student = build_model(c.student, vocab)
        graphdef, params = ts.split_model(student)
        params = jax.device_put(params, ts.model_shardings(student, mesh))
    tg, tparams, _ = build_teacher(cmp, vocab, mesh)

    def grad_fn(loss: str):
        spec = loss_spec(cmp, loss, vocab)
        tgd = tg if loss == "full_online" else None
        return jax.jit(
            lambda p, b, tp: ts.loss_and_grad(p, tp, b, graphdef=graphdef, spec=spec, teacher_graphdef=tgd)[2]
        )

    @jax.jit
    def compare(g, ref):
        dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)))
        sq = lambda t: sum(jnp.vdot(a, a) for a in jax.tree.leaves(t))
        return dot, sq(g), sq(ref)

    n_train = tokens.num_rows("train")
    need = r.grad_batches * r.grad_batch_size
    rng = np.random.default_rng(c.train.seed)
    idx_all = rng.choice(n_train, size=need, replace=need > n_train).reshape(r.grad_batches, r.grad_batch_size)
    methods = [m for m in r.methods if m.loss != "full_online"]
    sources = {m.name: method_rows(cmp, m, tokens) for m in methods}
    plain = token_rows(cmp, tokens)
    ref_fn = grad_fn("full_online")
    fns = {}
    per_batch: dict[str, list] = {m.name: [] for m in methods}
    for b, idx in enumerate(idx_all):
        base = sharding.global_batch(host_batch(plain.read(idx), ()), mesh)
        ref = ref_fn(params, base, tparams)
        for m in methods:
            rows, fields = sources[m.name]
            batch = sharding.global_batch(host_batch(rows.read(idx), fields), mesh)
            if m.loss not in fns:
                fns[m.loss] = grad_fn(m.loss)
            g = fns[m.loss](params, batch, None)
            dot, gg, rr = (float(x) for x in compare(g, ref))
            cos = max(-1.0, min(1.0, dot / math.sqrt(gg * rr)))
            per_batch[m.name].append({"angle_deg": math.degrees(math.acos(cos)), "norm_ratio": math.sqrt(gg / rr)})
        print(f"   grad batch {b + 1}/{r.grad_batches}", flush=True)
    out: dict[str, Any] = {}
    for name, recs in per_batch.items():
        a = [x["angle_deg"] for x in recs]
        q = [x["norm_ratio"] for x in recs]
        out[name] = {
            "angle_deg": statistics.fmean(a),
            "angle_deg_std": statistics.pstdev(a),
            "norm_ratio": statistics.fmean(q),
            "norm_ratio_std": statistics.pstdev(q),
            "per_batch": recs,
        }
    return {
        "methods": out,
        "at": r.grad_at,
        "rows": idx_all.tolist(),
        "note": (
            f"student-parameter gradient of each method's train loss (train_step.make_train_step, alpha="
            f"{c.loss.alpha}) vs the full-KD gradient (teacher online), both at the "
            f"{'CE student final' if r.grad_at == 'ce_final' else 'initial'} params, on "
            f"{r.grad_batches} fixed batches of {r.grad_batch_size} train rows (each method's stored "
            "draw for those rows); mean and std over the batches"
        ),
    }
