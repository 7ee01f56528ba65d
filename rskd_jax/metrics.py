"""Evaluation metrics as additive per-batch sums: exact over micro-batches, hosts and chunks.

Pure jax: arrays in, a flat dict of sums out. Every function returns *sums* (never means) so
that any split of the evaluation set (batches, position chunks, hosts) adds up to exactly the
same totals; `finalize` turns the accumulated totals into the reported figures.

Letters: B batch, L length (positions), V vocabulary, K stored teacher slots, NB bins.

Figures (over positions selected by `where`):
  val_loss       mean -log p(label)                     perplexity = exp(val_loss)
  accuracy       mean [argmax p == label]
  ece            sum_b (n_b / N) |acc_b - conf_b|, NB = 15 equal-width bins of the top-1
                 confidence, bin b holding confidences in (b/NB, (b+1)/NB] (Guo et al. 2017)
  kl_to_teacher  mean KL(t || p). Exact from teacher logits: sum_j t_j (log t_j - log p_j).
                 Estimated from a sparse store: sum_k w_k (-log p_{id_k}) - H(t), using the
                 stored teacher entropy H(t); unbiased whenever E[sum_k w_k f(id_k)] =
                 sum_j t_j f(j) (the sampled stores), biased for top-K / ghost stores.
  top1_agreement mean [argmax p == argmax t]: exact from teacher logits. From a sparse store
                 the stored id of largest weight stands in for argmax t (reported with
                 top1_agreement_estimated = true): exact for top-K / ghost stores, the mode of
                 the N draws for a sampled store (equal to argmax t with high probability
                 when the teacher is confident, never in expectation otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

NUM_BINS = 15
# Logit given to padded vocabulary rows. Finite (not -inf) so that 0 * log p stays 0 and
# tempered logits (x / T) never overflow; exp() of it is exactly 0 in float32.
MASKED_LOGIT = -1e30


def mask_vocab(logits_xV: jax.Array, vocab_size: int | None) -> jax.Array:
    """float32 logits with the ids >= vocab_size (padded rows) set to MASKED_LOGIT.

    >>> mask_vocab(jnp.zeros((2, 4)), 3)[0]
    Array([ 0.e+00,  0.e+00,  0.e+00, -1.e+30], dtype=float32)
    """
    logits_xV = logits_xV.astype(jnp.float32)
    v = logits_xV.shape[-1]
    if vocab_size is None or vocab_size >= v:
        return logits_xV
    return jnp.where(jnp.arange(v) < vocab_size, logits_xV, MASKED_LOGIT)


def _where(where: jax.Array | None, shape) -> jax.Array:
    return jnp.ones(shape, bool) if where is None else jnp.broadcast_to(where, shape).astype(bool)


def lm_sums(
    logits_xV: jax.Array,
    labels_x: jax.Array,
    where_x: jax.Array | None = None,
    *,
    num_bins: int = NUM_BINS,
    per_row: bool = False,
) -> dict[str, jax.Array]:
    """Sums for loss, perplexity, accuracy and ECE over positions with a label.

    Returns nll_sum, count, correct_sum (scalars) and bin_count, bin_conf, bin_correct [NB]
    (positions, summed top-1 confidence and summed correctness per confidence bin); per_row
    adds row_nll_sum and row_count [B] (summed over every axis but the first: x is [B, ...]),
    for paired bootstraps over rows (not additive across batches: keep them per batch).
    """
    logp_xV = jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)
    w_x = _where(where_x, labels_x.shape)
    wf_x = w_x.astype(jnp.float32)
    nll_x = -jnp.take_along_axis(logp_xV, labels_x[..., None].astype(jnp.int32), axis=-1)[..., 0]
    pred_x = jnp.argmax(logp_xV, axis=-1)
    conf_x = jnp.exp(jnp.max(logp_xV, axis=-1))
    correct_x = (pred_x == labels_x).astype(jnp.float32)
    # bin b holds (b/NB, (b+1)/NB]; a confidence of exactly 0 cannot occur (conf >= 1/V).
    bin_x = jnp.clip(jnp.ceil(conf_x * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
    onehot_xNB = (bin_x[..., None] == jnp.arange(num_bins)) & w_x[..., None]
    onehot_xNB = onehot_xNB.astype(jnp.float32)
    lead = tuple(range(labels_x.ndim))
    out = {
        "nll_sum": jnp.sum(jnp.where(w_x, nll_x, 0.0)),
        "count": jnp.sum(wf_x),
        "correct_sum": jnp.sum(correct_x * wf_x),
        "bin_count": jnp.sum(onehot_xNB, axis=lead),
        "bin_conf": jnp.sum(onehot_xNB * conf_x[..., None], axis=lead),
        "bin_correct": jnp.sum(onehot_xNB * correct_x[..., None], axis=lead),
    }
    if per_row:
        rest = tuple(range(1, labels_x.ndim))
        out["row_nll_sum"] = jnp.sum(jnp.where(w_x, nll_x, 0.0), axis=rest)
        out["row_count"] = jnp.sum(wf_x, axis=rest)
    return out


def teacher_sums(
    logits_xV: jax.Array, teacher_logits_xV: jax.Array, where_x: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Exact KL(t || p) and top-1 agreement sums given the teacher's logits (same V).

    Returns kl_sum, agree_sum and teacher_count.
    """
    logp_xV = jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)
    logt_xV = jax.nn.log_softmax(teacher_logits_xV.astype(jnp.float32), axis=-1)
    t_xV = jnp.exp(logt_xV)
    kl_x = jnp.sum(jnp.where(t_xV > 0, t_xV * (logt_xV - logp_xV), 0.0), axis=-1)
    agree_x = jnp.argmax(logp_xV, axis=-1) == jnp.argmax(logt_xV, axis=-1)
    w_x = _where(where_x, kl_x.shape)
    return {
        "kl_sum": jnp.sum(jnp.where(w_x, kl_x, 0.0)),
        "agree_sum": jnp.sum((agree_x & w_x).astype(jnp.float32)),
        "teacher_count": jnp.sum(w_x.astype(jnp.float32)),
    }


def sparse_teacher_sums(
    logits_xV: jax.Array,
    ids_xK: jax.Array,
    weights_xK: jax.Array,
    entropy_x: jax.Array,
    where_x: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """KL(t || p) estimated from stored targets: sum_k w_k (-log p_{id_k}) - H(t), and the
    agreement of argmax p with the stored id of largest weight.

    Empty slots have weight 0. Returns kl_sum, mode_agree_sum and teacher_count.
    """
    logp_xV = jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)
    logp_xK = jnp.take_along_axis(logp_xV, ids_xK.astype(jnp.int32), axis=-1)
    w_xK = weights_xK.astype(jnp.float32)
    cross_x = -jnp.sum(jnp.where(w_xK != 0, w_xK * logp_xK, 0.0), axis=-1)
    kl_x = cross_x - entropy_x.astype(jnp.float32)
    w_x = _where(where_x, kl_x.shape)
    mode_x = jnp.take_along_axis(ids_xK, jnp.argmax(w_xK, axis=-1)[..., None], axis=-1)[..., 0]
    agree_x = jnp.argmax(logp_xV, axis=-1) == mode_x
    return {
        "kl_sum": jnp.sum(jnp.where(w_x, kl_x, 0.0)),
        "mode_agree_sum": jnp.sum((agree_x & w_x).astype(jnp.float32)),
        "teacher_count": jnp.sum(w_x.astype(jnp.float32)),
    }


def accumulate(total: Mapping[str, np.ndarray] | None, sums: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    """total + sums, on the host in float64 (None: start from sums)."""
    sums = {k: np.asarray(jax.device_get(v), np.float64) for k, v in sums.items()}
    if total is None:
        return sums
    return {k: total[k] + sums[k] if k in total else sums[k] for k in {*total, *sums}}


def finalize(total: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Accumulated sums -> val_loss, perplexity, accuracy, ece (+ kl_to_teacher,
    top1_agreement when the teacher sums are present), plus the token counts."""
    n = float(total.get("count", 0.0))
    out: dict[str, float] = {"tokens": n}
    if n > 0:
        val_loss = float(total["nll_sum"]) / n
        out["val_loss"] = val_loss
        out["perplexity"] = float(np.exp(min(val_loss, 700.0)))
        out["accuracy"] = float(total["correct_sum"]) / n
        gap = np.abs(np.asarray(total["bin_correct"]) - np.asarray(total["bin_conf"]))
        out["ece"] = float(np.sum(gap)) / n
    nt = float(total.get("teacher_count", 0.0))
    if nt > 0:
        out["teacher_tokens"] = nt
        out["kl_to_teacher"] = float(total["kl_sum"]) / nt
        if "agree_sum" in total:
            out["top1_agreement"] = float(total["agree_sum"]) / nt
        elif "mode_agree_sum" in total:
            out["top1_agreement"] = float(total["mode_agree_sum"]) / nt
            out["top1_agreement_estimated"] = True
    return out
