"""Per-position sampling kernels of rskd_jax.sampling: the radix tree of partial sums and the draws
down it (i.i.d., systematic, without replacement), each for ONE position's logits [V], pure jax,
O(V + N R log_R V), never N x V. `rskd_jax.sampling` vmaps them over positions and turns their
draws into stored targets; the estimators and their contracts are documented there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Children per node of the sampling tree. 16 keeps each level's work tiny (N x 16) and the
# tree shallow (4 levels at V = 49,152, 5 at V = 262,144).
_RADIX = 16


def _rows(x_M: jax.Array, fill: float) -> jax.Array:
    """[M] -> [ceil(M / R), R], padded with `fill` (zero mass)."""
    size = -(-x_M.shape[-1] // _RADIX) * _RADIX
    return jnp.pad(x_M, (0, size - x_M.shape[-1]), constant_values=fill).reshape(-1, _RADIX)


def _child_cdf(mass_NxR: jax.Array, u_N: jax.Array):
    """`_pick_child`'s search: (child int32 [N], -1 for a row with no mass; cdf [N, R]; positive
    mask [N, R]; target [N, 1], the point u * total clamped below the row total)."""
    cdf_NxR = jnp.cumsum(mass_NxR, axis=-1)
    positive_NxR = mass_NxR > 0
    total_Nx1 = jnp.max(jnp.where(positive_NxR, cdf_NxR, 0.0), axis=-1, keepdims=True)
    target_Nx1 = jnp.minimum(u_N[:, None] * total_Nx1, jnp.nextafter(total_Nx1, 0.0))
    hit_NxR = (cdf_NxR > target_Nx1) & positive_NxR
    first_N = jnp.min(jnp.where(hit_NxR, jnp.arange(_RADIX, dtype=jnp.int32), _RADIX), axis=-1)
    return jnp.where(first_N < _RADIX, first_N, -1), cdf_NxR, positive_NxR, target_Nx1


def _pick_child(mass_NxR: jax.Array, u_N: jax.Array) -> jax.Array:
    """Inverse CDF within each row: the first child whose cumulative mass exceeds u * total,
    among children with positive mass. int32 [N]; -1 only for a row with no mass.

    Masking with mass > 0, rather than trusting cdf[i] == cdf[i-1] across a zero entry (a
    parallel cumsum does not guarantee it), makes zero-mass children impossible to pick;
    total is the largest cdf over positive children and u * total is clamped below it, so a
    positive child above it always exists. The row's own total is used, not 1, so float32
    rounding of the masses never shifts mass onto the last child.
    """
    return _child_cdf(mass_NxR, u_N)[0]


def _pick_child_within(mass_NxR: jax.Array, u_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`_pick_child` (never -1: a row with no mass gives child 0) and where the point falls
    inside the chosen child c, as a fraction of its mass: (target - lo) / (hi - lo) in [0, 1),
    hi = cdf[c], lo = the largest cdf of the positive children before c (0 if none).

    lo <= target < hi by the choice of c (every earlier positive child has cdf <= target), so
    hi > lo, and float rounding is monotone: points in one child keep their order. Clipped
    below 1 (nextafter) so the next level's pick stays inside the child.
    """
    child_N, cdf_NxR, positive_NxR, target_Nx1 = _child_cdf(mass_NxR, u_N)
    child_N = jnp.maximum(child_N, 0)
    before_NxR = positive_NxR & (jnp.arange(_RADIX, dtype=jnp.int32) < child_N[:, None])
    lo_N = jnp.max(jnp.where(before_NxR, cdf_NxR, 0.0), axis=-1)
    hi_N = jnp.take_along_axis(cdf_NxR, child_N[:, None], axis=-1)[:, 0]
    frac_N = (target_Nx1[:, 0] - lo_N) / jnp.where(hi_N > lo_N, hi_N - lo_N, 1.0)
    return child_N, jnp.clip(frac_N, 0.0, jnp.nextafter(jnp.float32(1.0), jnp.float32(0.0)))


class MassTree(NamedTuple):
    """The sampling tree of softmax(s) for one position (`mass_tree`); under vmap, every field
    gains the leading axes. log_z = s_max + log(root) = logsumexp(s)."""

    s_rows: jax.Array  # [V/R, R] the logits s in rows of R, padded with -inf
    s_max: jax.Array  # [] max s
    levels: tuple[jax.Array, ...]  # bottom-up, each [rows, R]: masses of R-sized groups below
    root: jax.Array  # [] sum exp(s - s_max), the root's mass
    moment: jax.Array  # [] sum exp(s - s_max) * s over the ids of positive mass (the entropy's term)

    @property
    def log_z(self) -> jax.Array:
        return self.s_max + jnp.log(self.root)


def _add_pairs(a, b):
    return a[0] + b[0], a[1] + b[1]


def mass_tree(s_V: jax.Array) -> MassTree:
    """The sampling tree of softmax(s_V) (see `_draw_one`): logits in rows [V/R, R] (padded
    with -inf), their max, the levels bottom-up (each [rows, R]: masses of the R-sized groups
    of the level below; the last is a single row, the root's children), the root mass
    sum exp(s - max) and the moment sum exp(s - max) s, so that the entropy of softmax(s) is
    log_z - moment / root.

    PERF: one pass over V after the max: exp(s - max) and both per-row sums in one two-output
    reduce, which XLA's CPU backend emits as one fused loop over both cores (at V = 151,936
    and 64 positions: sampler + entropy in half the time of a plain per-row sum, which CPU
    XLA hands to XNNPACK with its inputs materialised, plus a separate entropy pass). The
    barrier keeps the reduce whole where the moment is unused (the samplers alone): XLA would
    otherwise split off a one-output sum, lowered and rounded the XNNPACK way, and the cache
    step (which reads the moment) would round its masses otherwise than `sample_counts` in
    about half the rows at V = 49,152. Other fusion choices can still move a last bit.
    """
    s_rows = _rows(s_V, -jnp.inf)  # [V/R, R]
    s_max = jnp.max(s_V)
    e_rows = jnp.exp(s_rows - s_max)
    moment_rows = jnp.where(e_rows > 0, e_rows * s_rows, 0.0)  # e = 0 where s = -inf: no 0 * inf
    mass, moment = jax.lax.reduce((e_rows, moment_rows), (jnp.float32(0), jnp.float32(0)), _add_pairs, (1,))
    mass, moment = jax.lax.optimization_barrier((mass, moment))
    levels = []
    while mass.shape[-1] > 1:
        levels.append(_rows(mass, 0.0))
        mass = jnp.sum(levels[-1], axis=-1)
    return MassTree(s_rows, s_max, tuple(levels), mass[0], jnp.sum(moment))


def _pick_leaf(leaf_s_NxR: jax.Array, s_max: jax.Array, u_N: jax.Array) -> jax.Array:
    """The leaf within each leaf row, on exp recomputed for its R logits. -1 only if exp
    rounded differently from the fused pass: then the row's largest logit, which is finite
    because the row had positive mass."""
    leaf_N = _pick_child(jnp.exp(leaf_s_NxR - s_max), u_N)
    return jnp.where(leaf_N >= 0, leaf_N, jnp.argmax(leaf_s_NxR, axis=-1))


def _draw_one(key: jax.Array, tree: MassTree, num_draws: int) -> jax.Array:
    """N i.i.d. draws from softmax(s_V) for one position, O(N R log_R V), R = 16, given its
    tree (`mass_tree`, the one O(V) pass). Returns ids int32 [N].

    Inverse-CDF search down a tree of partial sums: leaves are the V tokens in rows of R, each
    internal level holds the masses of R-sized groups of the level below. Each draw walks from
    the root, choosing a child of its node with one uniform per level (only the R children of
    the N current nodes are read), and recomputes exp for the R logits of its leaf row.
    """
    levels = tree.levels
    # PERF: a 1-D draw compiles ~2x faster under vmap than a 2-D one (CPU, jax 0.10).
    u_LxN = jax.random.uniform(key, ((len(levels) + 1) * num_draws,), jnp.float32)
    u_LxN = u_LxN.reshape(len(levels) + 1, num_draws)
    node_N = jnp.zeros((num_draws,), jnp.int32)
    for depth, level in enumerate(reversed(levels)):
        # A node with positive mass has a positive child (its mass is their sum): never -1.
        node_N = node_N * _RADIX + jnp.maximum(_pick_child(level[node_N], u_LxN[depth]), 0)
    ids_N = node_N * _RADIX + _pick_leaf(tree.s_rows[node_N], tree.s_max, u_LxN[-1])
    return ids_N.astype(jnp.int32)


def _unique_counts(ids_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sorted unique ids first, with their counts; empty slots id 0, count 0. [N] -> 2 x [N]."""
    num = ids_N.shape[-1]
    sorted_N = jnp.sort(ids_N)
    first_N = jnp.concatenate([jnp.ones((1,), bool), sorted_N[1:] != sorted_N[:-1]])
    slot_N = jnp.cumsum(first_N) - 1
    counts_N = jnp.zeros((num,), jnp.int32).at[slot_N].add(1)
    uniq_N = jnp.zeros((num,), jnp.int32).at[slot_N].max(sorted_N)
    return uniq_N, counts_N


# What `sample_tokens(..., replace=False)` draws for a given key (its RNG use), recorded in
# sample_wor stores so a resume never mixes two samplers in one store. Version 1 (unnamed, no
# record) drew V Gumbels per position; both have the same law, not the same draws.
WOR_SAMPLER = "tree-sequential-exprace-v2"


def _lse_rows(x_NxR: jax.Array) -> jax.Array:
    """logsumexp over the last axis, -inf for a row of -inf (no NaN). [..., R] -> [...]."""
    m_N = jnp.max(x_NxR, axis=-1)
    safe_N = jnp.where(m_N > -jnp.inf, m_N, 0.0)
    return safe_N + jnp.log(jnp.sum(jnp.exp(x_NxR - safe_N[..., None]), axis=-1))


def _pick_log(log_mass_R: jax.Array, u: jax.Array) -> jax.Array:
    """_pick_child on log masses (rescaled by their max): a child index, 0 for a row of -inf."""
    m = jnp.max(log_mass_R)
    mass_R = jnp.exp(log_mass_R - jnp.where(m > -jnp.inf, m, 0.0))
    return jnp.maximum(_pick_child(mass_R[None], u[None])[0], 0)


def _wor_one(key, l_V, k, temperature, log_zt):
    """k draws without replacement from q = softmax(l / T) for one position: ids [k] in draw
    order, unbiased weights t_i / pi_i [k] (the law of Gumbel-top-k, see `sample_tokens`).

    A tree of log-masses as in `_draw_one` (log-space per node, so no mass underflows: each
    row is rescaled by its own max), walked k times with one uniform per level; a drawn leaf
    is masked (one bit per leaf in its row's int32 mask) and its row's and ancestors'
    log-masses are recomputed from their R children (never subtracted: no cancellation).
    Threshold: in the exponential-race view of Gumbel-top-k (arrival T_i = E_i / q_i, the
    order of arrivals is sequential sampling without replacement), the (k+1)-th arrival is
    y = sum_{j=0..k} E_j / Z_j with E_j ~ Exp(1) i.i.d. and Z_j the mass left before draw j,
    independent of which ids arrive; kappa = -log y is the (k+1)-th largest perturbed value.
    O(V) for the tree, O(k R log_R V) for the draws.
    """
    s_V = l_V / temperature if temperature != 1.0 else l_V
    s_rows = _rows(s_V, -jnp.inf)  # [V/R, R]
    levels = [_lse_rows(s_rows)]  # bottom-up log-masses; PERF: the only O(V) pass
    while levels[-1].shape[-1] > 1:
        levels.append(_lse_rows(_rows(levels[-1], -jnp.inf)))
    levels = [_rows(x, -jnp.inf).reshape(-1) for x in levels[:-1]] + [levels[-1]]  # padded
    depth = len(levels) - 1  # picks above the leaf row
    u_all = jax.random.uniform(key, (k * (depth + 1) + k + 1,), jnp.float32)
    u_KxD = u_all[: k * (depth + 1)].reshape(k, depth + 1)
    e_K1 = -jnp.log1p(-u_all[k * (depth + 1) :])  # Exp(1)
    bits0 = jnp.zeros((s_rows.shape[0],), jnp.int32)
    lanes_R = jnp.arange(_RADIX, dtype=jnp.int32)
    s_V_pad = s_rows.reshape(-1)

    def draw(carry, u_D):
        levels, bits = carry
        log_z = levels[-1][0]  # mass left before this draw
        node, path = jnp.int32(0), []
        for d in range(depth - 1, -1, -1):  # top-down: children of `node` at level d
            kids_R = jax.lax.dynamic_slice(levels[d], (node * _RADIX,), (_RADIX,))
            c = _pick_log(kids_R, u_D[depth - 1 - d])
            path.append((node, kids_R, c))
            node = node * _RADIX + c
        row_bits = bits[node]
        gone_R = (row_bits >> lanes_R) & 1 == 1
        leaf_R = jnp.where(gone_R, -jnp.inf, jax.lax.dynamic_slice(s_V_pad, (node * _RADIX,), (_RADIX,)))
        c = _pick_log(leaf_R, u_D[depth])
        leaf_id = node * _RADIX + c
        # Remove the leaf: recompute its row's log-mass, then each ancestor's from its children.
        bits = bits.at[node].set(row_bits | (1 << c))
        new = _lse_rows(jnp.where(lanes_R == c, -jnp.inf, leaf_R))
        levels = list(levels)
        levels[0] = levels[0].at[node].set(new)
        for d, (parent, kids_R, c) in zip(range(depth), reversed(path)):
            new = _lse_rows(jnp.where(lanes_R == c, new, kids_R))
            levels[d + 1] = levels[d + 1].at[parent].set(new)
        return (tuple(levels), bits), (leaf_id, log_z)

    (levels, _), (ids_K, log_z_K) = jax.lax.scan(draw, (tuple(levels), bits0), u_KxD)
    log_z_K1 = jnp.append(log_z_K, levels[-1][0])
    valid_K = log_z_K > -jnp.inf  # mass was left: fewer than k finite ids leave empty slots
    # log y = logsumexp_j(log E_j - log Z_j); Z_j = 0 gives y = inf, kappa = -inf, pi = 1.
    log_y = jax.nn.logsumexp(jnp.log(e_K1) - log_z_K1)
    ids_K = jnp.where(valid_K, ids_K, 0)
    s_K = s_V_pad[ids_K]
    # pi_i = P(T_i < y | y) = 1 - exp(-q_i y) = 1 - exp(-exp(s_i - kappa)), kappa = -log y.
    gap_K = jnp.where(valid_K, s_K + log_y, 0.0)
    log_pi_K = jnp.log(-jnp.expm1(-jnp.exp(gap_K)))
    log_t_K = (s_K if temperature == 1.0 else l_V[ids_K]) - (log_z_K1[0] if log_zt is None else log_zt)
    w_K = jnp.where(valid_K, jnp.exp(jnp.where(valid_K, log_t_K - log_pi_K, 0.0)), 0.0)
    return ids_K.astype(jnp.int32), w_K


SYSTEMATIC_SAMPLER = "tree-fraction-v3"


def _systematic_one(key: jax.Array, tree: MassTree, num_draws: int) -> tuple[jax.Array, jax.Array]:
    """Systematic draws from softmax(s_V) for one position, O(N R log_R V) given its tree
    (`mass_tree`): unique ids [N] (increasing) and counts [N] (summing to N).

    One uniform u; the points (u + j) / N of the CDF (vocabulary order), located by walking
    the tree: at each level a point picks the child its fraction falls in
    (`_pick_child`) and becomes its fraction within that child (`_pick_child_within`), so each
    id receives the points of its own interval, F_i - F_{i-1} of them with
    F_i = ceil(N cdf_i - u) clipped to [0, N]: its count is floor or ceil of N q_i and
    E[c_i] = N q_i. Zero-mass ids are never picked (masked at every level). The map into a
    child is monotone, so the ids come out non-decreasing in j; `_unique_counts` counts them
    (a sort of N, which does not rely on it).
    """
    u = jax.random.uniform(key, (), jnp.float32)
    u_N = (u + jnp.arange(num_draws, dtype=jnp.float32)) / num_draws
    node_N = jnp.zeros((num_draws,), jnp.int32)
    for level in reversed(tree.levels):
        child_N, u_N = _pick_child_within(level[node_N], u_N)
        node_N = node_N * _RADIX + child_N
    ids_N = node_N * _RADIX + _pick_leaf(tree.s_rows[node_N], tree.s_max, u_N)
    return _unique_counts(ids_N.astype(jnp.int32))
