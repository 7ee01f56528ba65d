"""The eval stage: every student on each val_<source> split of the mix, the teacher online.

The teacher runs once per batch and is shared by all students: val loss, accuracy, ECE with
its 15 reliability bins, exact KL(teacher || student) and top-1 agreement
(rskd_jax.evaluate.make_eval_fn with the teacher's logits as the batch's `logprobs`;
rskd_jax.metrics sums, kept before `finalize` for the bins), and each evaluated row's nll sum
and label count (`row_sums`: the paired bootstrap of rskd_jax.compare.bootstrap).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from rskd_jax.compare.runtime import build_teacher, setup, token_rows
from rskd_jax.documents import DOCUMENT_KEYS


def pad_batch(tokens_bxL: np.ndarray, batch_size: int, **fields: np.ndarray) -> dict[str, np.ndarray]:
    """tokens + mask (+ `fields`, e.g. segment_ids and positions, zero-padded) for a batch
    padded to batch_size rows (padding rows fully masked).

    >>> b = pad_batch(np.ones((1, 3), np.int32), 2)
    >>> b["tokens"].tolist(), b["mask"].tolist()
    ([[1, 1, 1], [0, 0, 0]], [[1, 1, 1], [0, 0, 0]])
    """
    b, length = tokens_bxL.shape
    tokens = np.zeros((batch_size, length), np.int32)
    tokens[:b] = tokens_bxL
    mask = np.zeros((batch_size, length), np.int32)
    mask[:b] = 1
    out = {"tokens": tokens, "mask": mask}
    for k, v in fields.items():
        out[k] = np.zeros((batch_size, *v.shape[1:]), v.dtype)
        out[k][:b] = v
    return out


def figures(total: dict) -> dict[str, Any]:
    """metrics.finalize of accumulated sums, plus the reliability bins as lists."""
    from rskd_jax import metrics

    out = metrics.finalize(total)
    out["bins"] = {k: np.asarray(total[f"bin_{k}"]).tolist() for k in ("count", "conf", "correct")}
    return out


def eval_rows(num_rows: int, max_rows: int | None) -> np.ndarray:
    """All rows, or max_rows evenly spaced ones (a val split is in path order: a prefix would
    be a few files).

    >>> eval_rows(10, 3).tolist(), eval_rows(3, None).tolist()
    ([0, 4, 9], [0, 1, 2])
    """
    if max_rows is None or num_rows <= max_rows:
        return np.arange(num_rows)
    return np.unique(np.linspace(0, num_rows - 1, max_rows).round().astype(np.int64))


def evaluate_students(cmp, runs: dict) -> dict[str, Any]:
    """{"teacher": {split: figures}, "students": {method: {split: figures}}, "rows": ...,
    "row_sums": {method: {split: {"nll_sum": [...], "count": [...]}}}}; the split "all" pools every
    source's val rows."""
    import jax
    from flax import nnx

    from rskd_jax import evaluate, metrics, sharding
    from rskd_jax.train_step import prepare_targets

    r = cmp.cfg.reproduce
    mesh, tokens, vocab = setup(cmp)
    sharding.check_batch(r.eval_batch_size, mesh, key="reproduce.eval_batch_size")
    students, fns = {}, []  # fns: [(graphdef, jitted eval fn)], one per distinct architecture
    for name, tcfg in runs.items():
        graphdef, params, _ = evaluate.load_student(tcfg.train.output, vocab, mesh)
        fn = next((f for g, f in fns if g == graphdef), None)
        if fn is None:
            raw = evaluate.make_eval_fn(graphdef, vocab_size=vocab, chunk_size=cmp.cfg.loss.chunk_size, per_row=True)
            fn = evaluate.jit_eval_fn(raw, jax.tree.map(lambda a: a.sharding, params), mesh)
            fns.append((graphdef, fn))
        students[name] = (params, fn)
    tg, tparams, tsh = build_teacher(cmp, vocab, mesh)

    def teacher_fn(tp, batch):
        docs = batch.get("segment_ids"), batch.get("positions")  # document masking (or None)
        logits_BxLxV = metrics.mask_vocab(nnx.merge(tg, tp)(batch["tokens"], *docs), vocab)
        t = prepare_targets(batch, "ce")
        return logits_BxLxV, metrics.lm_sums(logits_BxLxV, t["labels"], t["ce_where"])

    teacher_jit = jax.jit(
        teacher_fn,
        in_shardings=(tsh, None),
        out_shardings=(sharding.batch_sharding(mesh, 3), sharding.replicated(mesh)),
    )
    splits = [f"val_{s.name}" for s in cmp.sources]
    totals: dict[str, dict[str, dict]] = {n: {} for n in [*runs, "<teacher>"]}
    per_row: dict[str, dict[str, dict[str, list[float]]]] = {n: {} for n in runs}  # name -> split -> sums
    rows = {}
    t0 = time.perf_counter()
    for split in splits:
        rows_S = eval_rows(tokens.num_rows(split), r.eval_max_rows)
        n = rows[split] = len(rows_S)
        source = token_rows(cmp, tokens, split)
        for lo in range(0, n, r.eval_batch_size):
            read = source.read(rows_S[lo : lo + r.eval_batch_size])
            real = len(read["tokens"])  # the rest of the batch is padding
            docs = {k: read[k] for k in DOCUMENT_KEYS if k in read}
            batch = sharding.global_batch(pad_batch(read["tokens"], r.eval_batch_size, **docs), mesh)
            logits, tsums = teacher_jit(tparams, batch)
            for key in (split, "all"):
                totals["<teacher>"][key] = metrics.accumulate(totals["<teacher>"].get(key), tsums)
            batch = dict(batch, logprobs=logits)  # raw logits: the eval fn log-softmaxes them
            for name, (params, fn) in students.items():
                sums = dict(fn(params, None, batch))
                split_rows = per_row[name].setdefault(split, {"nll_sum": [], "count": []})
                for k in ("nll_sum", "count"):
                    split_rows[k] += np.asarray(sums.pop(f"row_{k}"), np.float64)[:real].tolist()
                for key in (split, "all"):
                    totals[name][key] = metrics.accumulate(totals[name].get(key), sums)
            print(f"   eval {split}: rows {min(lo + r.eval_batch_size, n)}/{n}", flush=True)
    teacher = {k: figures(v) for k, v in totals.pop("<teacher>").items()}
    return {
        "teacher": teacher,
        "students": {n: {k: figures(v) for k, v in t.items()} for n, t in totals.items()},
        "rows": rows,
        "row_sums": per_row,
        "seconds": round(time.perf_counter() - t0, 2),
        "kl": "exact: sum_v t_v log(t_v / p_v), the teacher run online on every evaluated val row",
    }
