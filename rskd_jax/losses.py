"""Per-position distillation losses, like optax losses: no reduction, optional `where` mask.

Pure jax: no flax, no config. Logits are cast to float32 before any softmax, whatever the
compute dtype. Every loss maps `[..., V]` logits to a `[...]` loss; masked positions
(where=False) give exactly 0. Reduce with `reduce_sum_count`, which returns (sum, count) so
means stay exact across micro-batches and hosts.
Letters: V student vocabulary, K stored target slots, B rows, L positions, D hidden size,
C positions per chunk, E ragged entries. The student vocabulary may be padded beyond the
teacher's (target ids are always < V).

The `*_from_hidden` losses take the final hidden states h [B, L, D] and the output projection
w [D, V] instead of logits: they compute logits = h @ w (float32 accumulation) C positions at a
time under jax.checkpoint, so no [B, L, V] array exists in the forward or the backward pass
(memory B * C * V floats instead of B * L * V). `map_logit_chunks` is the driver they share;
use it to chunk any other per-position function of the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _masked(loss_x: jax.Array, where: jax.Array | None) -> jax.Array:
    if where is None:
        return loss_x
    return jnp.where(jnp.asarray(where, bool), loss_x, 0.0)


def _xlogx_over(a: jax.Array, log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """a * (log a - log b) with the convention 0 * log(0 / b) = 0 (also for b = 0)."""
    pos = a > 0
    return jnp.where(pos, a * (jnp.where(pos, log_a, 0.0) - jnp.where(pos, log_b, 0.0)), 0.0)


def sparse_kd_loss(
    student_logits: jax.Array, ids: jax.Array, weights: jax.Array, *, where: jax.Array | None = None
) -> jax.Array:
    """Sparse KD: -sum_k w_k log softmax(x)[ids_k]. [..., V], [..., K], [..., K] -> [...].

    The weights are used as given (never renormalised), so unbiased sampled targets give an
    unbiased estimate of the full-KD gradient: dL/dx = p * sum_k w_k - scatter(w).
    Slots with weight 0 contribute exactly 0 (even if that id's logit is -inf).
    Computed as sum(w) * logsumexp(x) - sum_k w_k x[ids_k] (no V-sized log_softmax output).

    >>> float(sparse_kd_loss(jnp.zeros(4), jnp.array([1, 0]), jnp.array([1.0, 0.0])))
    1.386294...
    """
    x_xV = _f32(student_logits)
    x_xK = jnp.take_along_axis(x_xV, jnp.asarray(ids).astype(jnp.int32), axis=-1)
    return sparse_kd_from_target_logits(jax.nn.logsumexp(x_xV, axis=-1), x_xK, weights, where=where)


def sparse_kd_from_target_logits(
    lse: jax.Array, target_logits: jax.Array, weights: jax.Array, *, where: jax.Array | None = None
) -> jax.Array:
    """Sparse KD from logsumexp(x) [...] and the gathered logits x[ids] [..., K] -> [...].

    sum_k w_k (lse - x[ids_k]) over the slots with w_k != 0 (a weight-0 slot contributes
    exactly 0 even if its logit is -inf). For callers that share one logsumexp and one gather
    between several losses, e.g. CE (slot: the label) and KD (slots: the teacher's ids) in one
    train step: one [..., V] pass for all of them.

    >>> float(sparse_kd_from_target_logits(jnp.log(4.0), jnp.array([0.0, -jnp.inf]),
    ...                                    jnp.array([1.0, 0.0])))
    1.386294...
    """
    lse_x1 = _f32(lse)[..., None]
    w_xK = _f32(weights)
    nonzero = w_xK != 0
    nll_xK = jnp.where(nonzero, lse_x1 - jnp.where(nonzero, _f32(target_logits), 0.0), 0.0)
    return _masked(jnp.sum(w_xK * nll_xK, axis=-1), where)


def full_kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = False,
    where: jax.Array | None = None,
) -> jax.Array:
    """Full KD: forward KL(t || p) = sum_j t_j (log t_j - log p_j), [..., V] x 2 -> [...].

    t = softmax(teacher / T), p = softmax(student / T) at the KD temperature T; t log t = 0
    where t = 0. Gradient: dL/dx = (p - t) / T, so at T = 1 it is p - t. With
    scale_by_temperature_squared=True the loss is multiplied by T**2 (Hinton et al. 2015),
    which keeps the gradient scale independent of T. The teacher vocabulary may be smaller
    than the student's (teacher probability 0 on the student's padded rows).

    >>> float(full_kd_loss(jnp.zeros(2), jnp.log(jnp.array([0.75, 0.25]))))
    0.1308120...
    """
    x_xV = _f32(student_logits)
    l_xU = _f32(teacher_logits)
    vocab, teacher_vocab = x_xV.shape[-1], l_xU.shape[-1]
    if teacher_vocab > vocab:
        raise ValueError(
            f"teacher vocabulary ({teacher_vocab}) is larger than the student's ({vocab}); "
            "the student's vocabulary must contain the teacher's"
        )
    if teacher_vocab < vocab:
        pad = [(0, 0)] * (l_xU.ndim - 1) + [(0, vocab - teacher_vocab)]
        l_xU = jnp.pad(l_xU, pad, constant_values=-jnp.inf)
    log_t_xV = jax.nn.log_softmax(l_xU / temperature, axis=-1)
    log_p_xV = jax.nn.log_softmax(x_xV / temperature, axis=-1)
    loss_x = jnp.sum(_xlogx_over(jnp.exp(log_t_xV), log_t_xV, log_p_xV), axis=-1)
    if scale_by_temperature_squared:
        loss_x = loss_x * temperature**2
    return _masked(loss_x, where)


def _drop_ids(x_xV: jax.Array, ids_xK: jax.Array) -> jax.Array:
    """x with x[..., ids] = -inf (the complement of the kept ids)."""
    vocab, k = x_xV.shape[-1], ids_xK.shape[-1]
    out_PxV = jax.vmap(lambda x_V, i_K: x_V.at[i_K].set(-jnp.inf))(x_xV.reshape(-1, vocab), ids_xK.reshape(-1, k))
    return out_PxV.reshape(x_xV.shape)


def ghost_kd_loss(
    student_logits: jax.Array,
    ids: jax.Array,
    probs: jax.Array,
    tail_mass: jax.Array,
    *,
    where: jax.Array | None = None,
) -> jax.Array:
    """Ghost-token KD: KL over the kept ids plus one bucket for the rest of the mass.

    L = sum_{i in K} t_i log(t_i / p_i) + r log(r / (1 - sum_{i in K} p_i)), r = tail_mass.
    [..., V], ids [..., K] (distinct), probs [..., K], tail_mass [...] -> [...].
    log(1 - sum_K p_i) is computed as logsumexp(x outside K) - logsumexp(x): no cancellation
    when the student puts almost all its mass on K. 0 log 0 = 0 for both terms.

    >>> x = jnp.log(jnp.array([0.5, 0.25, 0.25]))
    >>> float(ghost_kd_loss(x, jnp.array([0]), jnp.array([0.5]), jnp.array(0.5)))
    0.0
    """
    x_xV = _f32(student_logits)
    ids_xK = jnp.asarray(ids).astype(jnp.int32)
    t_xK = _f32(probs)
    r_x = _f32(tail_mass)
    lse_x = jax.nn.logsumexp(x_xV, axis=-1)
    log_p_xK = jnp.take_along_axis(x_xV, ids_xK, axis=-1) - lse_x[..., None]
    head_x = jnp.sum(_xlogx_over(t_xK, jnp.log(t_xK), log_p_xK), axis=-1)
    log_rest_x = jax.nn.logsumexp(_drop_ids(x_xV, ids_xK), axis=-1) - lse_x
    tail_x = _xlogx_over(r_x, jnp.log(r_x), log_rest_x)
    return _masked(head_x + tail_x, where)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
    """Cross-entropy -log softmax(x)[label]: [..., V], int labels [...] -> [...].

    >>> float(cross_entropy(jnp.zeros(4), jnp.array(2)))
    1.386294...
    """
    x_xV = _f32(logits)
    labels_x1 = jnp.asarray(labels).astype(jnp.int32)[..., None]
    x_label = jnp.take_along_axis(x_xV, labels_x1, axis=-1)[..., 0]
    return _masked(jax.nn.logsumexp(x_xV, axis=-1) - x_label, where)


def z_loss(logits: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
    """Auxiliary z-loss (log Z)^2, Z = sum_j exp(x_j): [..., V] -> [...]. Scale it yourself
    (e.g. 1e-4) when adding it to a loss; it keeps the softmax normaliser near 1.

    >>> float(z_loss(jnp.zeros(4)))
    1.9218120...
    """
    return _masked(jnp.square(jax.nn.logsumexp(_f32(logits), axis=-1)), where)


def reduce_sum_count(loss: jax.Array, where: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of loss over unmasked positions, number of unmasked positions), float32 scalars.

    Add (sum, count) pairs across micro-batches or hosts and divide once at the end, so the
    mean is exact whatever the split.

    >>> s, c = reduce_sum_count(jnp.array([1.0, 2.0, 3.0]), jnp.array([True, False, True]))
    >>> float(s), float(c)
    (4.0, 2.0)
    """
    loss = _f32(loss)
    if where is None:
        return jnp.sum(loss), jnp.asarray(loss.size, jnp.float32)
    mask = jnp.broadcast_to(jnp.asarray(where, bool), loss.shape)
    return jnp.sum(jnp.where(mask, loss, 0.0)), jnp.sum(mask, dtype=jnp.float32)


# ------------------------------------------------------------------ losses from hidden states


def _logits(h_xD: jax.Array, w_DxV: jax.Array, softcap: float | None = None) -> jax.Array:
    logits = jnp.einsum("...d,dv->...v", h_xD, w_DxV, preferred_element_type=jnp.float32)
    return logits if softcap is None else jnp.tanh(logits / softcap) * softcap


def _pad_positions(x_BxLx: jax.Array, pad: int) -> jax.Array:
    x_BxLx = jnp.asarray(x_BxLx)
    return jnp.pad(x_BxLx, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxLx.ndim - 2)) if pad else x_BxLx


def map_logit_chunks(
    fn: Callable[[jax.Array, Any], Any],
    h_BxLxD: jax.Array,
    w_DxV: jax.Array,
    xs: Any = None,
    *,
    chunk_size: int,
    remat: bool = True,
    softcap: float | None = None,
) -> Any:
    """fn(logits [B, C, V] float32, xs chunk) over chunks of C positions; outputs stacked [n, ...].

    logits = h @ w with float32 accumulation, then softcap * tanh(logits / softcap) if a final
    logit soft-cap is given (Gemma 2). xs: a pytree of per-position arrays [B, L, ...]
    (targets, masks), cut into the same chunks. n = ceil(L / C): when C does not divide L the
    last chunk is padded (zeros in h and xs, so False in boolean masks) and its padded
    positions must be dropped or masked by the caller (`chunks_to_positions` drops them).
    chunk_size=0: one chunk of all L positions, no checkpoint (the [B, L, V] logits exist).
    With remat each chunk runs under jax.checkpoint: the backward pass recomputes the chunk's
    logits instead of storing them. PERF: one extra [C, D] x [D, V] matmul per chunk.
    Gradients flow to h, w and xs; the lm-head gradient is accumulated across chunks by scan.

    >>> out = map_logit_chunks(lambda x, _: x.sum(-1), jnp.ones((1, 5, 2)), jnp.ones((2, 3)),
    ...                        chunk_size=2)
    >>> out.shape, chunks_to_positions(out, 5).tolist()
    ((3, 1, 2), [[6.0, 6.0, 6.0, 6.0, 6.0]])
    """
    b, l = h_BxLxD.shape[:2]
    if not chunk_size:
        return jax.tree.map(lambda y: y[None], fn(_logits(h_BxLxD, w_DxV, softcap), xs))
    c, n = chunk_size, -(-l // chunk_size)

    def to_chunks(x_BxLx):  # [B, L, ...] -> [n, B, C, ...] (the scan axis first)
        x_BxLx = _pad_positions(x_BxLx, n * c - l)
        return jnp.moveaxis(x_BxLx.reshape(b, n, c, *x_BxLx.shape[2:]), 1, 0)

    def body(_, hx):
        h_BxCxD, x_chunk = hx
        return None, fn(_logits(h_BxCxD, w_DxV, softcap), x_chunk)

    body = jax.checkpoint(body, prevent_cse=False) if remat else body
    _, out = jax.lax.scan(body, None, (to_chunks(h_BxLxD), jax.tree.map(to_chunks, xs)))
    return out


def chunks_to_positions(out_nxBxCx: Any, length: int) -> Any:
    """Per-position outputs of `map_logit_chunks` back to [B, L, ...] (padding dropped)."""

    def one(y):
        n, b, c = y.shape[:3]
        return jnp.moveaxis(y, 0, 1).reshape(b, n * c, *y.shape[3:])[:, :length]

    return jax.tree.map(one, out_nxBxCx)


def sparse_kd_loss_from_hidden(
    h_BxLxD: jax.Array,
    w_DxV: jax.Array,
    ids: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int,
    where: jax.Array | None = None,
) -> jax.Array:
    """`sparse_kd_loss(h @ w, ids, weights)` without the [B, L, V] logits: -> loss [B, L].

    h [B, L, D] (any float dtype), w [D, V], ids / weights [B, L, K] (K: any slot count,
    e.g. the batch's largest entry count). Equal in value and gradient (w.r.t. h and w) to
    sparse_kd_loss(einsum(h, w, preferred_element_type=float32), ...), i.e. to
    sparse_kd_loss(h @ w, ...) for float32 h and w; C = chunk_size positions at a time (any
    C >= 1; 0 = unchunked), see `map_logit_chunks`.

    >>> h, w = jnp.zeros((1, 3, 2)), jnp.zeros((2, 4))
    >>> ids, wt = jnp.zeros((1, 3, 1), jnp.int32), jnp.ones((1, 3, 1))
    >>> loss = sparse_kd_loss_from_hidden(h, w, ids, wt, chunk_size=2)  # log 4 everywhere
    >>> loss.shape, float(loss[0, 2])
    ((1, 3), 1.386294...)
    """

    def fn(x_BxCxV, t):
        return sparse_kd_loss(x_BxCxV, t[0], t[1])

    out = map_logit_chunks(fn, h_BxLxD, w_DxV, (jnp.asarray(ids), jnp.asarray(weights)), chunk_size=chunk_size)
    return _masked(chunks_to_positions(out, h_BxLxD.shape[1]), where)


def cross_entropy_from_hidden(
    h_BxLxD: jax.Array,
    w_DxV: jax.Array,
    labels: jax.Array,
    *,
    chunk_size: int,
    where: jax.Array | None = None,
) -> jax.Array:
    """`cross_entropy(h @ w, labels)` without the [B, L, V] logits: [B, L, D], [D, V], int
    [B, L] -> [B, L]. The same chunking and float32 accumulation as
    `sparse_kd_loss_from_hidden` (CE is sparse KD with one slot of weight 1).

    >>> h, w = jnp.zeros((1, 3, 2)), jnp.zeros((2, 4))
    >>> float(cross_entropy_from_hidden(h, w, jnp.zeros((1, 3), int), chunk_size=2)[0, 1])
    1.386294...
    """
    labels_BxLx1 = jnp.asarray(labels)[..., None]
    return sparse_kd_loss_from_hidden(
        h_BxLxD, w_DxV, labels_BxLx1, jnp.ones(labels_BxLx1.shape, jnp.float32), chunk_size=chunk_size, where=where
    )


def sparse_kd_loss_from_hidden_ragged(
    h_BxLxD: jax.Array,
    w_DxV: jax.Array,
    position: jax.Array,
    ids: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int,
    where: jax.Array | None = None,
) -> jax.Array:
    """Sparse KD from ragged entries: E (position, id, weight) triples -> loss [B, L].

    position [E] int: flat position b * L + l of each entry; ids [E], weights [E] (padding
    entries: weight 0, any valid position and id). Equals `sparse_kd_loss_from_hidden` on the
    same entries laid out in per-position slots:
      loss[p] = (sum_{e: pos_e = p} w_e) * logsumexp(h_p @ w) - sum_{e: pos_e = p} w_e h_p . w[:, id_e]
    The logsumexp is chunked like the other `*_from_hidden` losses; the entry logits are
    E dot products of length D computed from h and w directly (no gather from, nor scatter
    into, [B, L, V] logits). PERF: two [E, D] gathers (and their scatter-add in the
    backward), i.e. E * D * 8 bytes of temporaries: cheap at ~12 entries per position.

    >>> h, w = jnp.zeros((1, 2, 2)), jnp.zeros((2, 4))
    >>> pos, ids, wt = jnp.array([0, 1, 1]), jnp.array([3, 0, 2]), jnp.array([1.0, 0.5, 0.5])
    >>> loss = sparse_kd_loss_from_hidden_ragged(h, w, pos, ids, wt, chunk_size=1)
    >>> loss.shape, float(loss[0, 1])
    ((1, 2), 1.386294...)
    """
    b, l, d = h_BxLxD.shape
    lse = map_logit_chunks(lambda x_BxCxV, _: jax.nn.logsumexp(x_BxCxV, axis=-1), h_BxLxD, w_DxV, chunk_size=chunk_size)
    lse_P = chunks_to_positions(lse, l).reshape(b * l)
    pos_E = jnp.asarray(position).astype(jnp.int32)
    w_E = _f32(weights)
    h_ExD = jnp.take(h_BxLxD.reshape(b * l, d), pos_E, axis=0)
    x_E = jnp.einsum(
        "ed,de->e",
        h_ExD,
        jnp.take(w_DxV, jnp.asarray(ids).astype(jnp.int32), axis=1),
        preferred_element_type=jnp.float32,
    )
    nonzero = w_E != 0
    nll_E = jnp.where(nonzero, lse_P[pos_E] - jnp.where(nonzero, x_E, 0.0), 0.0)
    loss_P = jax.ops.segment_sum(w_E * nll_E, pos_E, num_segments=b * l)
    return _masked(loss_P.reshape(b, l), where)
