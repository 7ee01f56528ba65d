"""Adam's view of sparse targets: parameter updates and second moments of a comparison's students.

    python tools/adam_updates.py --config configs/diagnosis/docs.yaml --at full_kd \
        --methods rskd_n50 top_k_12 --json runs/diag_docs/adam_updates.json

Two measurements on a finished comparison (issue 15's optimizer diagnosis):
1. **Update angles.** At the final train state of student `--at` (its params AND its Adam moments),
   the gradient of each method's loss and of full KD (teacher online) on the gradcheck's fixed
   batches, then ONE optimizer update each (`tx.update`, clipping and AdamW as trained): the angle
   between each method's update and the full-KD update, next to the angle between the gradients,
   for all parameters and for the tied embedding alone. An unbiased but noisy gradient can point
   the right way on average and still move Adam's normalised step far from full KD's.
2. **Second moments of the embedding.** Adam's nu of the tied embedding [V, D] in each student's
   final state, per vocabulary row as sqrt(mean over D), grouped by how often the id occurs as a
   train target (0, 1-9, 10-99, 100-999, >= 1000): sparse targets put zero-mean noise on rows of
   ids that are rarely drawn, which inflates nu there and shrinks their steps. Printed as the
   median per group and its ratio to the `--at` student's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

BUCKETS = ((0, 1), (1, 10), (10, 100), (100, 1000), (1000, None))


def _adam_nu(opt_state):
    import optax

    found = [s for s in _walk(opt_state) if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise SystemExit(f"expected one Adam state in the optimizer state, found {len(found)}")
    return found[0].nu


def _walk(tree):
    yield tree
    if isinstance(tree, tuple | list):
        for t in tree:
            yield from _walk(t)


def restore_state(tcfg, vocab, mesh):
    """(graphdef, TrainState, tx) of a finished train run, restored as the train program saved it."""
    import jax
    from flax import nnx

    from rskd_jax import optim
    from rskd_jax.checkpoint import Checkpointer
    from rskd_jax.model_spec import build_model
    from rskd_jax.train_step import model_shardings, split_model

    oc, t = tcfg.optim, tcfg.train
    graphdef, shapes = jax.eval_shape(lambda: split_model(build_model(tcfg.student, vocab)))
    param_sh = model_shardings(nnx.merge(graphdef, shapes), mesh)
    schedule = optim.lr_schedule(oc.learning_rate, oc.warmup_steps, t.steps, oc.end_lr_ratio)
    tx = optim.make_optimizer(
        schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, clip_norm=oc.clip_norm
    )
    state_sh = optim.state_shardings(shapes, param_sh, tx, mesh)
    ckpt = Checkpointer(os.path.join(os.path.abspath(t.output), "checkpoints"), read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise SystemExit(f"{t.output}: no checkpoint (train the comparison first)")
        state, _ = ckpt.restore(step, optim.abstract_state(shapes, tx, state_sh))
    finally:
        ckpt.close()
    return graphdef, state, tx


def target_counts(tokens, vocab: int) -> np.ndarray:
    """How often each id is a next-token target in the train split."""
    counts = np.zeros(vocab, np.int64)
    n = tokens.num_rows("train")
    for start in range(0, n, 256):
        rows = tokens.read("train", np.arange(start, min(n, start + 256)))
        counts += np.bincount(np.asarray(rows)[:, 1:].reshape(-1), minlength=vocab)[:vocab]
    return counts


def nu_by_bucket(nu_VxD: np.ndarray, counts: np.ndarray) -> dict[str, dict[str, float]]:
    rms = np.sqrt(nu_VxD.astype(np.float64).mean(axis=1))
    out = {}
    for lo, hi in BUCKETS:
        sel = (counts >= lo) & (counts < hi) if hi else counts >= lo
        name = f"{lo}-{hi - 1}" if hi else f">={lo}"
        out[name] = {"ids": int(sel.sum()), "median_rms_nu": float(np.median(rms[sel])) if sel.any() else None}
    return out


def angle(dot: float, aa: float, bb: float) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / math.sqrt(aa * bb))))) if aa > 0 and bb > 0 else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the comparison's config (its runs must be trained)")
    ap.add_argument("--at", default="full_kd", help="student whose final state (params, Adam moments) is used")
    ap.add_argument("--methods", nargs="+", required=True, help="sparse/ghost/ce students to compare")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("overrides", nargs="*", help="config overrides, as for python -m rskd_jax.compare")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from rskd_jax import sharding
    from rskd_jax import train_step as ts
    from rskd_jax.compare import CompareRun, Comparison
    from rskd_jax.compare.runtime import build_teacher, loss_spec, method_rows, setup
    from rskd_jax.config import load_config
    from rskd_jax.train_data import host_batch

    cfg = load_config(CompareRun, args.config, args.overrides)
    cmp = Comparison(cfg)
    runs = cmp.train_runs()
    by_name = {m.name: m for m in cfg.reproduce.methods}
    for name in [args.at, *args.methods]:
        if name not in by_name:
            raise SystemExit(f"{name!r} is not a method of {args.config}: {sorted(by_name)}")
    mesh, tokens, vocab = setup(cmp)
    graphdef, state, tx = restore_state(runs[args.at], vocab, mesh)
    params = state.params
    tg, tparams, _ = build_teacher(cmp, vocab, mesh)
    r = cfg.reproduce

    fns: dict = {}

    def grads(loss: str, batch, tp=None):
        """The loss's student gradient, one jitted function per loss (compiled once)."""
        if loss not in fns:
            spec = loss_spec(cmp, loss, vocab)
            tgd = tg if loss == "full_online" else None
            fns[loss] = jax.jit(
                lambda p, b, t: ts.loss_and_grad(p, t, b, graphdef=graphdef, spec=spec, teacher_graphdef=tgd)[2]
            )
        return fns[loss](params, batch, tp)

    update = jax.jit(lambda g: tx.update(g, state.opt_state, params)[0])

    @jax.jit
    def dots(a, b):
        whole = [
            (jnp.vdot(x, y), jnp.vdot(x, x), jnp.vdot(y, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        ]
        emb = (jnp.vdot(a["embed"], b["embed"]), jnp.vdot(a["embed"], a["embed"]), jnp.vdot(b["embed"], b["embed"]))
        return tuple(sum(w[i] for w in whole) for i in range(3)), emb

    rng = np.random.default_rng(cfg.train.seed)  # the gradcheck's batches
    need = r.grad_batches * r.grad_batch_size
    idx_all = rng.choice(tokens.num_rows("train"), size=need, replace=False).reshape(r.grad_batches, -1)
    rec = {m: {"grad_deg": [], "update_deg": [], "grad_deg_embed": [], "update_deg_embed": []} for m in args.methods}
    sources = {m: method_rows(cmp, by_name[m], tokens) for m in args.methods}
    for b, idx in enumerate(idx_all):
        base = sharding.global_batch(host_batch({"tokens": tokens.read("train", idx), "index": idx}, ()), mesh)
        g_full = grads("full_online", base, tparams)
        u_full = update(g_full)
        for m in args.methods:
            rows, fields = sources[m]
            g = grads(by_name[m].loss, sharding.global_batch(host_batch(rows.read(idx), fields), mesh))
            for kind, a, ref in (("grad", g, g_full), ("update", update(g), u_full)):
                whole, emb = dots(a, ref)
                rec[m][f"{kind}_deg"].append(angle(*(float(x) for x in whole)))
                rec[m][f"{kind}_deg_embed"].append(angle(*(float(x) for x in emb)))
        print(f"batch {b + 1}/{len(idx_all)}", file=sys.stderr, flush=True)

    counts = target_counts(tokens, vocab)
    nus = {}
    for name in [args.at, *args.methods]:
        st = state if name == args.at else restore_state(runs[name], vocab, mesh)[1]
        nus[name] = nu_by_bucket(np.asarray(_adam_nu(st.opt_state)["embed"]), counts)
    for groups in nus.values():
        for g, v in groups.items():
            base = nus[args.at][g]["median_rms_nu"]
            v["ratio_to_" + args.at] = v["median_rms_nu"] / base if base and v["median_rms_nu"] is not None else None
    out = {
        "config": args.config,
        "at": args.at,
        "step": int(state.step),
        "batches": idx_all.tolist(),
        "angles": {
            m: {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in rec[m].items()}
            for m in args.methods
        },
        "embed_nu_by_target_count": nus,
        "note": "angles to the full-KD gradient / one-step update at the --at student's final params and "
        "Adam state; nu: sqrt(mean over D of Adam's second moment) of each embedding row, median per group of "
        "ids by how often the id is a train target",
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
