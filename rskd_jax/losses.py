"""Per-position distillation losses, like optax losses: no reduction, optional `where` mask.

Pure jax: no flax, no config. Logits are cast to float32 before any softmax, whatever the
compute dtype. Every loss maps `[..., V]` logits to a `[...]` loss; masked positions
(where=False) give exactly 0. Reduce with `reduce_sum_count`, which returns (sum, count) so
means stay exact across micro-batches and hosts.
Letters: V student vocabulary, K stored target slots. The student vocabulary may be padded
beyond the teacher's (target ids are always < V).
"""

from __future__ import annotations

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
    w_xK = _f32(weights)
    lse_x1 = jax.nn.logsumexp(x_xV, axis=-1, keepdims=True)
    x_xK = jnp.take_along_axis(x_xV, jnp.asarray(ids).astype(jnp.int32), axis=-1)
    nonzero = w_xK != 0
    nll_xK = jnp.where(nonzero, lse_x1 - jnp.where(nonzero, x_xK, 0.0), 0.0)
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
    out_PxV = jax.vmap(lambda x_V, i_K: x_V.at[i_K].set(-jnp.inf))(
        x_xV.reshape(-1, vocab), ids_xK.reshape(-1, k)
    )
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


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, where: jax.Array | None = None
) -> jax.Array:
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


def reduce_sum_count(
    loss: jax.Array, where: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
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
