"""Sparse teacher targets from teacher logits: sampled (RS-KD), top-K and ghost-token.

Pure jax: no flax, no I/O, no config. Every function takes logits of any leading shape
`[..., V]` and returns `[..., K]` arrays (K static). The public functions are jitted (sizes,
temperatures and flags static) and compose with an outer jit, vmap or sharding.
Letters: V vocabulary, N draws, K stored slots, P flattened positions, R children per node
of the sampling tree (below), L its levels.

Estimators (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in
LLMs", ACL 2025, arXiv:2503.16870), for one position with teacher t = softmax(logits):
- with replacement: N i.i.d. draws from q = softmax(logits / temperature); each unique id i
  drawn c_i times gets w_i = (c_i / N) * t_i / q_i, so E[w_i] = t_i exactly.
- without replacement: k ids from q in the law of Gumbel-top-k (successive draws, each from
  the mass left), w_i = t_i / pi_i with pi_i = 1 - exp(-exp(log q_i - kappa)), kappa the
  (k+1)-th largest perturbed log q (Kool et al. 2019), so E[sum_{i kept} w_i f(i)] =
  sum_i t_i f(i) exactly. Drawn sequentially down the sampling tree with kappa from the
  exponential race (`_wor_one`), never V Gumbels.
- systematic (ours, variance-reduced): the N points (u + j) / N of q's CDF with one uniform u;
  counts floor or ceil of N q_i, weights as with replacement, E[w_i] = t_i exactly.
- head + sampled tail (ours): the top-h t_i exactly, plus N i.i.d. draws from the tail
  (renormalised, optionally tempered) weighted by the tail mass m: E[w_i] = t_i exactly.
- `normalize=True` divides the weights by their sum (self-normalised importance sampling):
  lower variance, consistent, but BIASED for finite N / k.
- top-K and ghost-token targets are deterministic and biased (the paper's baselines).

Randomness: position p (row-major flat index over the leading dims) uses the key
`jax.random.fold_in(key, p)`, so its draws depend only on (key, p).
Preconditions: every position has at least one finite logit; logits are finite or -inf.
Ids whose logit is -inf (masked or padded vocabulary rows) are never drawn.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rskd_jax.sampling_tree import (
    SYSTEMATIC_SAMPLER as SYSTEMATIC_SAMPLER,  # the draws a key gives, recorded in store manifests
)
from rskd_jax.sampling_tree import WOR_SAMPLER as WOR_SAMPLER
from rskd_jax.sampling_tree import MassTree as MassTree
from rskd_jax.sampling_tree import _draw_one, _systematic_one, _unique_counts, _wor_one
from rskd_jax.sampling_tree import mass_tree as mass_tree  # the samplers' O(V) pass, shared by the cache step

# store method -> the version of the draws its sampler gives for a key, recorded in store
# manifests ("sampler"): a resume or `inspect_store --verify` refuses a store of another version
STORE_SAMPLERS = {"sample_wor": WOR_SAMPLER, "systematic": SYSTEMATIC_SAMPLER}


class SparseTargets(NamedTuple):
    """Sparse teacher targets: ids int32 [..., K], importance weights float32 [..., K].

    Empty slots have weight 0 (their id is 0). The weights are final: losses use them as is.
    """

    ids: jax.Array
    weights: jax.Array


class SampledCounts(NamedTuple):
    """With-replacement draws, for exact storage: ids, counts (int32) and weights [..., N].

    counts sum to N per position; empty slots have count 0, weight 0 and id 0.
    weights = (counts / N) * t / q (= counts / N at temperature 1).
    """

    ids: jax.Array
    counts: jax.Array
    weights: jax.Array


class GhostTargets(NamedTuple):
    """Top-k ids int32 [..., k], their teacher probs f32 [..., k] (not renormalised) and the
    remaining mass tail_mass f32 [...] = 1 - sum(probs), computed without cancellation."""

    ids: jax.Array
    probs: jax.Array
    tail_mass: jax.Array


# --------------------------------------------------------------------------- helpers


def _check_static(num_draws: int, temperature: float) -> None:
    if int(num_draws) != num_draws or num_draws < 1:
        raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _flatten(logits_xV: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """[..., V] -> float32 [P, V] and the leading shape."""
    logits_xV = jnp.asarray(logits_xV)
    if logits_xV.ndim < 1:
        raise ValueError("teacher_logits must have a vocabulary axis: shape [..., V]")
    lead = logits_xV.shape[:-1]
    return logits_xV.reshape(-1, logits_xV.shape[-1]).astype(jnp.float32), lead


def _position_keys(key: jax.Array, num_positions: int) -> jax.Array:
    """One key per flattened position: fold_in(key, p)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_positions))


def _sample(key, logits, num_draws, temperature):
    """Draws for every position: ids [..., N], log Z_q [P], float32 logits [P, V], lead shape."""
    logits_PxV, lead = _flatten(logits)
    s_PxV = logits_PxV / temperature if temperature != 1.0 else logits_PxV
    keys_P = _position_keys(key, logits_PxV.shape[0])
    tree_P = jax.vmap(mass_tree)(s_PxV)
    ids_PxN = jax.vmap(_draw_one, in_axes=(0, 0, None))(keys_P, tree_P, num_draws)
    return ids_PxN.reshape(*lead, num_draws), tree_P.log_z, logits_PxV, lead


def _check_k(k: int, vocab: int) -> None:
    if int(k) != k or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, V={vocab}], got {k!r}")


def _top_k(x_xV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k behind an optimization barrier.

    PERF: on CPU, top_k lowers to sort + slice and XLA turns it back into a fast TopK only if
    every user is that exact slice; any further slice (e.g. the (k+1)-th value) fused into it
    leaves a full O(V log V) sort (~100x slower at V = 49,152). The barrier keeps the pattern.
    """
    return jax.lax.optimization_barrier(jax.lax.top_k(x_xV, k))


def _normalized(w_xK: jax.Array) -> jax.Array:
    return w_xK / jnp.sum(w_xK, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- public API


@functools.partial(jax.jit, static_argnames=("num_draws", "temperature"))
def draw_categorical(key: jax.Array, logits: jax.Array, num_draws: int, *, temperature: float = 1.0) -> jax.Array:
    """N i.i.d. draws from q = softmax(logits / temperature): int32 [..., N].

    Exact (up to float32 rounding) but O(V + N R log_R V) per position (R = 16), unlike
    `jax.random.categorical(key, logits, shape=(N, ...))`, which adds N x V Gumbel noise.
    Ids with logit -inf are never drawn. Position p uses fold_in(key, p) (row-major p).

    >>> draw_categorical(jax.random.key(0), jnp.log(jnp.array([0.5, 0.5, 0.0])), 4).shape
    (4,)
    """
    _check_static(num_draws, temperature)
    return _sample(key, logits, num_draws, temperature)[0]


@functools.partial(jax.jit, static_argnames=("num_draws", "temperature"))
def sample_counts(
    key: jax.Array, teacher_logits: jax.Array, num_draws: int, *, temperature: float = 1.0
) -> SampledCounts:
    """RS-KD with replacement, with integer counts for exact storage.

    teacher_logits [..., V] -> SampledCounts(ids, counts, weights), each [..., N]:
    N = num_draws i.i.d. draws from q = softmax(logits / temperature); the unique ids come
    first in increasing order, counts c_i (summing to N), weights
    w_i = (c_i / N) * t_i / q_i with t = softmax(logits) (= c_i / N at temperature 1),
    so E[w_i] = t_i for every id. Empty slots: id 0, count 0, weight 0.

    >>> sc = sample_counts(jax.random.key(0), jnp.array([0.0, 0.0, -jnp.inf]), 4)
    >>> int(sc.counts.sum()), bool((sc.ids[sc.counts > 0] < 2).all())
    (4, True)
    """
    _check_static(num_draws, temperature)
    ids_xN, log_zq_P, logits_PxV, lead = _sample(key, teacher_logits, num_draws, temperature)
    uniq_PxN, counts_PxN = jax.vmap(_unique_counts)(ids_xN.reshape(-1, num_draws))
    w_PxN = _count_weights(logits_PxV, uniq_PxN, counts_PxN, log_zq_P, num_draws, temperature)
    shape = (*lead, num_draws)
    return SampledCounts(uniq_PxN.reshape(shape), counts_PxN.reshape(shape), w_PxN.reshape(shape))


@functools.partial(jax.jit, static_argnames=("num_draws", "temperature", "replace", "normalize"))
def sample_tokens(
    key: jax.Array,
    teacher_logits: jax.Array,
    num_draws: int,
    *,
    temperature: float = 1.0,
    replace: bool = True,
    normalize: bool = False,
) -> SparseTargets:
    """Sampled sparse teacher targets, K = num_draws slots: SparseTargets(ids, weights).

    teacher_logits [..., V] (any float dtype; math in float32); t = softmax(logits),
    q = softmax(logits / temperature) the proposal.
    - replace=True (RS-KD): N i.i.d. draws from q, unique ids first (sorted), weights
      w_i = (c_i / N) * t_i / q_i: unbiased, E[w_i] = t_i. See `sample_counts`.
    - replace=False: k = num_draws distinct ids from q, in draw order: each a draw from q
      renormalised over the ids not yet drawn (the law of Gumbel-top-k, i.e. of
      `jax.random.categorical(..., replace=False)`, without its V Gumbels: O(V + k R log_R V)
      per position), weights w_i = t_i / pi_i, pi_i = 1 - exp(-exp(log q_i - kappa)), kappa
      the (k+1)-th largest Gumbel-perturbed log q, drawn exactly from the masses left
      (`_wor_one`): unbiased (Kool et al. 2019). Positions with fewer than k finite logits
      keep them all (pi = 1) and leave the rest empty. Sampler version: `WOR_SAMPLER`.
    - normalize=True: weights divided by their sum (sum to 1). Self-normalised importance
      sampling: lower variance and consistent, but BIASED; the default is unbiased.

    Jitted, with num_draws, temperature (a Python float), replace and normalize static.

    >>> logits = jnp.log(jnp.array([[0.7, 0.2, 0.1, 0.0]]))
    >>> st = sample_tokens(jax.random.key(0), logits, 8)
    >>> st.ids.shape, float(st.weights.sum())
    ((1, 8), 1.0)
    """
    _check_static(num_draws, temperature)
    if replace:
        sc = sample_counts(key, teacher_logits, num_draws, temperature=temperature)
        w_xK = sc.weights
        if normalize and temperature != 1.0:  # at temperature 1 they already sum to 1
            w_xK = _normalized(w_xK)
        return SparseTargets(sc.ids, w_xK)
    logits_PxV, lead = _flatten(teacher_logits)
    # At temperature 1 the tree's root is log Z_t: no second pass over V.
    log_zt_P = None if temperature == 1.0 else jax.nn.logsumexp(logits_PxV, axis=-1)
    keys_P = _position_keys(key, logits_PxV.shape[0])
    ids_PxK, w_PxK = jax.vmap(_wor_one, in_axes=(0, 0, None, None, None if log_zt_P is None else 0))(
        keys_P, logits_PxV, num_draws, temperature, log_zt_P
    )
    if normalize:
        w_PxK = _normalized(w_PxK)
    shape = (*lead, num_draws)
    return SparseTargets(ids_PxK.reshape(shape), w_PxK.reshape(shape))


@functools.partial(jax.jit, static_argnames=("k", "renormalize"))
def top_k_targets(teacher_logits: jax.Array, k: int, *, renormalize: bool = True) -> SparseTargets:
    """Top-K baseline: the k most likely ids and their teacher probabilities [..., k].

    weights = t_i for the k largest t_i, divided by their sum if renormalize (the paper's
    two variants; same fixed point). Deterministic and biased: the target is not t.

    >>> top_k_targets(jnp.log(jnp.array([0.5, 0.3, 0.2])), 2).weights
    Array([0.625, 0.375], dtype=float32)
    """
    logits_xV = jnp.asarray(teacher_logits).astype(jnp.float32)
    _check_k(k, logits_xV.shape[-1])
    top_xK, ids_xK = _top_k(logits_xV, k)
    if renormalize:
        w_xK = jax.nn.softmax(top_xK, axis=-1)
    else:
        w_xK = jnp.exp(top_xK - jax.nn.logsumexp(logits_xV, axis=-1, keepdims=True))
    return SparseTargets(ids_xK.astype(jnp.int32), w_xK)


@functools.partial(jax.jit, static_argnames=("k",))
def ghost_targets(teacher_logits: jax.Array, k: int) -> GhostTargets:
    """Ghost-token baseline: top-k ids, their probs t_i [..., k] and tail_mass [...].

    tail_mass = 1 - sum_k t_i, computed as exp(logsumexp(logits outside the top k) -
    logsumexp(logits)) so a tiny tail keeps its relative precision.

    >>> g = ghost_targets(jnp.log(jnp.array([0.5, 0.3, 0.2])), 2)
    >>> g.ids.tolist(), round(float(g.tail_mass), 6)
    ([0, 1], 0.2)
    """
    logits_xV = jnp.asarray(teacher_logits).astype(jnp.float32)
    vocab = logits_xV.shape[-1]
    _check_k(k, vocab)
    top_xK, ids_xK = _top_k(logits_xV, k)
    log_z_x = jax.nn.logsumexp(logits_xV, axis=-1)
    probs_xK = jnp.exp(top_xK - log_z_x[..., None])
    rest_PxV = jax.vmap(lambda l_V, i_K: l_V.at[i_K].set(-jnp.inf))(logits_xV.reshape(-1, vocab), ids_xK.reshape(-1, k))
    log_tail_x = jax.nn.logsumexp(rest_PxV, axis=-1).reshape(log_z_x.shape) - log_z_x
    return GhostTargets(ids_xK.astype(jnp.int32), probs_xK, jnp.exp(log_tail_x))


# --------------------------------------------------------------------------- variance-reduced


# What `systematic_counts` draws for a given key, recorded in systematic stores so a resume
# never mixes two samplers in one store. Version 1 (unnamed, no record) located the points
# in a cumsum over V; v2 walks the tree's partial sums with the same u per key, so the same
# law but other float rounding at interval boundaries: a point there may change ids. v3: the
# tree's bottom row sums come from a two-output reduce (`mass_tree`, with the entropy's
# moment), which XLA sums in another order: other rounding again (14 of 24,576 stored ids
# moved at V = 151,936, N = 16).
@functools.partial(jax.jit, static_argnames=("num_draws", "temperature"))
def systematic_counts(
    key: jax.Array, teacher_logits: jax.Array, num_draws: int, *, temperature: float = 1.0
) -> SampledCounts:
    """Systematic (stratified) RS-KD: SampledCounts(ids, counts, weights), each [..., N].

    Per position one uniform u and the N points (u + j) / N, j = 0..N-1, located in the CDF of
    q = softmax(logits / temperature) in vocabulary order. Each point is marginally uniform,
    so E[c_i] = N q_i exactly, and c_i is floor(N q_i) or ceil(N q_i). Weights
    w_i = (c_i / N) * t_i / q_i (= c_i / N at temperature 1): unbiased, E[w_i] = t_i, with
    counts of variance <= 1/4 instead of N q_i (1 - q_i). Ids in increasing order; empty slots
    id 0, count 0, weight 0. O(V + N R log_R V) per position (R = 16: one fused pass over V,
    then the N points walk a tree of partial sums), never N x V. Sampler version:
    `SYSTEMATIC_SAMPLER`.

    >>> sc = systematic_counts(jax.random.key(0), jnp.log(jnp.array([0.5, 0.25, 0.25])), 4)
    >>> sc.ids.tolist(), sc.counts.tolist()
    ([0, 1, 2, 0], [2, 1, 1, 0])
    """
    _check_static(num_draws, temperature)
    logits_PxV, lead = _flatten(teacher_logits)
    s_PxV = logits_PxV / temperature if temperature != 1.0 else logits_PxV
    keys_P = _position_keys(key, logits_PxV.shape[0])
    tree_P = jax.vmap(mass_tree)(s_PxV)
    ids_PxN, counts_PxN = jax.vmap(_systematic_one, in_axes=(0, 0, None))(keys_P, tree_P, num_draws)
    w_PxN = _count_weights(logits_PxV, ids_PxN, counts_PxN, tree_P.log_z, num_draws, temperature)
    shape = (*lead, num_draws)
    return SampledCounts(ids_PxN.reshape(shape), counts_PxN.reshape(shape), w_PxN.reshape(shape))


@functools.partial(jax.jit, static_argnames=("num_draws",))
def sample_counts_from_tree(key: jax.Array, tree: MassTree, num_draws: int) -> SampledCounts:
    """`sample_counts(key, logits_V, num_draws)` for ONE position at temperature 1, from its
    tree `mass_tree(logits_V)` (the sampler's one O(V) pass), for a caller that uses the tree
    for more: the cache step takes log Z and the entropy from the same tree. The same draws for
    the same tree; XLA may round the tree's sums in the last bit otherwise in another program
    (another fusion), which moves a near-tie draw, as the LM head's own rounding does. [N] each.

    >>> logits = jnp.log(jnp.array([0.5, 0.25, 0.25]))
    >>> a = sample_counts_from_tree(jax.random.key(0), mass_tree(logits), 4)
    >>> b = sample_counts(jax.random.key(0), logits, 4)
    >>> all(bool((x == y).all()) for x, y in zip(a, b))
    True
    """
    _check_static(num_draws, 1.0)
    ids_N = _draw_one(jax.random.fold_in(key, 0), tree, num_draws)  # position 0 of sample_counts
    uniq_N, counts_N = _unique_counts(ids_N)
    return SampledCounts(uniq_N, counts_N, counts_N.astype(jnp.float32) / num_draws)


@functools.partial(jax.jit, static_argnames=("num_draws",))
def systematic_counts_from_tree(key: jax.Array, tree: MassTree, num_draws: int) -> SampledCounts:
    """`systematic_counts(key, logits_V, num_draws)` for ONE position at temperature 1, from
    its tree `mass_tree(logits_V)`; see `sample_counts_from_tree`. [N] each."""
    _check_static(num_draws, 1.0)
    ids_N, counts_N = _systematic_one(jax.random.fold_in(key, 0), tree, num_draws)
    return SampledCounts(ids_N, counts_N, counts_N.astype(jnp.float32) / num_draws)


def _count_weights(logits_PxV, ids_PxN, counts_PxN, log_zq_P, num_draws, temperature, log_zt_P=None):
    """(c_i / N) * t_i / q_i for counted ids (0 on empty slots); t = softmax(logits) unless
    log_zt_P (the log-normaliser of the target) is given, q = softmax(logits / T) / Z_q.
    log t_i - log q_i = (l_i - log Z_t) - (l_i / T - log Z_q); one more pass over V."""
    frac_PxN = counts_PxN.astype(jnp.float32) / num_draws
    if temperature == 1.0 and log_zt_P is None:
        return frac_PxN
    if log_zt_P is None:
        log_zt_P = jax.nn.logsumexp(logits_PxV, axis=-1)
    l_PxN = jnp.take_along_axis(logits_PxV, ids_PxN, axis=-1)
    log_ratio_PxN = (l_PxN - log_zt_P[:, None]) - (l_PxN / temperature - log_zq_P[:, None])
    safe_PxN = jnp.where(counts_PxN > 0, log_ratio_PxN, 0.0)  # empty slots: id 0 may be -inf
    return jnp.where(counts_PxN > 0, frac_PxN * jnp.exp(safe_PxN), 0.0)


def _head_tail_one(key, l_V, head, num_draws, temperature):
    """Head + sampled tail for one position: ids [h + N], weights [h + N]."""
    log_z = jax.nn.logsumexp(l_V)
    top_H, head_H = _top_k(l_V, head)
    w_head_H = jnp.exp(top_H - log_z)
    tail_V = l_V.at[head_H].set(-jnp.inf)
    log_ztail = jax.nn.logsumexp(tail_V)
    has_tail = log_ztail > -jnp.inf  # else every finite id is in the head: the tail is empty
    tail_V = jnp.where(has_tail, tail_V, 0.0)  # draws stay defined; their weight is m = 0
    s_V = tail_V / temperature if temperature != 1.0 else tail_V
    tree = mass_tree(s_V)
    ids_N, log_zq = _draw_one(key, tree, num_draws), tree.log_z
    uniq_N, counts_N = _unique_counts(ids_N)
    # r = tail / m with log-normaliser log_ztail; w = (c / N) (r / q) m, m = tail mass
    w_N = _count_weights(
        tail_V[None], uniq_N[None], counts_N[None], log_zq[None], num_draws, temperature, log_ztail[None]
    )[0]
    w_N = jnp.where(has_tail, w_N * jnp.exp(log_ztail - log_z), 0.0)  # * m
    valid_H = w_head_H > 0
    ids = jnp.concatenate([jnp.where(valid_H, head_H, 0), jnp.where(w_N > 0, uniq_N, 0)])
    return ids.astype(jnp.int32), jnp.concatenate([jnp.where(valid_H, w_head_H, 0.0), w_N])


@functools.partial(jax.jit, static_argnames=("head", "num_draws", "temperature"))
def head_tail_targets(
    key: jax.Array,
    teacher_logits: jax.Array,
    head: int,
    num_draws: int,
    *,
    temperature: float = 1.0,
) -> SparseTargets:
    """Head + sampled tail: SparseTargets(ids, weights) [..., h + N], h = head.

    The h largest teacher probabilities t_i are kept exactly (weight t_i, slots 0..h-1).
    N ids are drawn i.i.d. from the tail proposal q = softmax(tail logits / temperature)
    (head ids masked to -inf); each unique tail id j drawn c_j times (slots h.., increasing)
    gets w_j = (c_j / N) * m * r_j / q_j with r_j = t_j / m the renormalised tail and m the
    tail mass (= (c_j / N) m at temperature 1). Unbiased: E[w_j] = t_j for every id, exact on
    the head. If every finite id is in the head (m = 0) the tail slots are empty. Empty slots:
    id 0, weight 0. O(V + N R log_R V) per position (top_k, two logsumexps, `_draw_one`).

    >>> ht = head_tail_targets(jax.random.key(0), jnp.log(jnp.array([0.5, 0.3, 0.2])), 1, 4)
    >>> ht.ids[0].item(), ht.weights[0].item(), round(float(ht.weights.sum()), 6)
    (0, 0.5, 1.0)
    """
    _check_static(num_draws, temperature)
    logits_PxV, lead = _flatten(teacher_logits)
    _check_k(head, logits_PxV.shape[-1])
    keys_P = _position_keys(key, logits_PxV.shape[0])
    ids_PxK, w_PxK = jax.vmap(_head_tail_one, in_axes=(0, 0, None, None, None))(
        keys_P, logits_PxV, head, num_draws, temperature
    )
    shape = (*lead, head + num_draws)
    return SparseTargets(ids_PxK.reshape(shape), w_PxK.reshape(shape))
