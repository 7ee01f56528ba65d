"""rskd_jax.sampling: goodness of fit, unbiasedness, invariants, shapes and keys.

Statistical tests use fixed seeds and tolerances derived from the estimator's standard error:
each test allows a family-wise false-failure probability ALPHA, split over its coordinates
(Bonferroni), i.e. |mean - expected| <= z * SE with z = Phi^-1(1 - ALPHA / (2 * #coords)),
plus FLOAT_ATOL for float32 rounding (the weights themselves are float32).
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rskd_jax import sampling
from rskd_jax.losses import full_kd_loss, sparse_kd_loss
from rskd_jax.sampling import (
    GhostTargets,
    SampledCounts,
    SparseTargets,
    draw_categorical,
    ghost_targets,
    sample_counts,
    sample_tokens,
    top_k_targets,
)

ALPHA = 1e-3
FLOAT_ATOL = 1e-6

# The public functions are jitted themselves; short aliases.
_draw, _counts, _tokens = draw_categorical, sample_counts, sample_tokens


def softmax64(logits, temperature=1.0):
    s = np.asarray(logits, np.float64) / temperature
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def bonferroni_z(num_coords):
    return stats.norm.isf(ALPHA / (2 * num_coords))


def dense(ids, weights, vocab):
    """[M, K] sparse targets -> [M, V] dense (duplicate ids add up)."""
    ids, weights = np.asarray(ids), np.asarray(weights, np.float64)
    out = np.zeros((ids.shape[0], vocab))
    np.add.at(out, (np.arange(ids.shape[0])[:, None], ids), weights)
    return out


def chisquare_pvalue(draws, q, min_expected=5.0):
    """Pearson chi-square of draws against q; ids pooled in id order until each bin expects
    at least min_expected draws. Asserts first that no zero-probability id was drawn."""
    draws = np.asarray(draws).ravel()
    observed = np.bincount(draws, minlength=q.size).astype(np.float64)
    assert observed[q == 0].sum() == 0, "drew a zero-probability id"
    obs_bins, exp_bins, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(observed[q > 0], q[q > 0] * draws.size):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= min_expected:
            obs_bins.append(acc_o)
            exp_bins.append(acc_e)
            acc_o = acc_e = 0.0
    obs_bins[-1] += acc_o
    exp_bins[-1] += acc_e
    obs_bins, exp_bins = np.array(obs_bins), np.array(exp_bins)
    stat = ((obs_bins - exp_bins) ** 2 / exp_bins).sum()
    return stats.chi2.sf(stat, len(obs_bins) - 1)


def lm_like_logits(vocab, seed, scale=2.5, padded=0):
    """Skewed logits (Gaussian * scale) with the last `padded` ids masked to -inf."""
    logits = np.random.default_rng(seed).normal(size=vocab).astype(np.float32) * scale
    if padded:
        logits[-padded:] = -np.inf
    return logits


# ------------------------------------------------------------------ goodness of fit


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_sampler_matches_q_chisquare(temperature):
    vocab, positions, n = 5003, 64, 2048  # V not a multiple of 16: padded rows at each level
    logits = lm_like_logits(vocab, seed=1, padded=11)
    logits_PxV = np.broadcast_to(logits, (positions, vocab))
    draws = _draw(jax.random.key(0), logits_PxV, n, temperature=temperature)
    assert draws.shape == (positions, n) and draws.dtype == jnp.int32
    q = softmax64(logits, temperature)
    assert chisquare_pvalue(draws, q) > ALPHA
    # The same test has power: a proposal off by 5% in temperature is rejected.
    assert chisquare_pvalue(draws, softmax64(logits, temperature * 1.05)) < ALPHA


def test_naive_reference_matches_q_chisquare():
    logits = lm_like_logits(20, seed=2, scale=1.5)
    draws = jax.random.categorical(jax.random.key(3), logits, shape=(20000,))
    assert chisquare_pvalue(draws, softmax64(logits)) > ALPHA


# ------------------------------------------------------------------ unbiasedness

UNB_V, UNB_M, UNB_N = 33, 4000, 8


def _unbiasedness_setup():
    """32 ids with logits spread over [-1.25, 1.25] (shuffled) and one masked id."""
    spread = np.random.default_rng(0).permutation(np.linspace(1.25, -1.25, UNB_V - 1))
    logits = np.append(spread, -np.inf).astype(np.float32)
    student = np.random.default_rng(1).normal(size=UNB_V).astype(np.float32)
    return logits, student, softmax64(logits)


@jax.jit
def _per_sample_grads(student_V, ids_MxK, w_MxK):
    """Gradient of each sample's sparse loss, the rows sharing the student logits: [M, V]."""
    x_MxV = jnp.broadcast_to(student_V, (ids_MxK.shape[0], student_V.shape[-1]))
    return jax.grad(lambda x: sparse_kd_loss(x, ids_MxK, w_MxK).sum())(x_MxV)


def _assert_mean_within_se(samples_MxV, expected_V, what):
    mean = samples_MxV.mean(0)
    se = samples_MxV.std(0, ddof=1) / np.sqrt(samples_MxV.shape[0])
    tol = bonferroni_z(expected_V.size) * se + FLOAT_ATOL
    worst = np.argmax(np.abs(mean - expected_V) / tol)
    assert (np.abs(mean - expected_V) <= tol).all(), (
        f"{what}: id {worst} mean {mean[worst]:.6f} vs {expected_V[worst]:.6f}, tol {tol[worst]:.2e}"
    )
    return se


@pytest.mark.parametrize("replace, temperature", [(True, 0.7), (True, 1.0), (True, 1.5), (False, 1.0), (False, 1.5)])
def test_targets_and_gradient_are_unbiased(replace, temperature):
    logits, student, t = _unbiasedness_setup()
    logits_MxV = np.broadcast_to(logits, (UNB_M, UNB_V))
    st = _tokens(jax.random.key(7), logits_MxV, UNB_N, temperature=temperature, replace=replace)
    w_MxV = dense(st.ids, st.weights, UNB_V)
    # Precondition for a trustworthy sample SE: every support id was kept often.
    assert ((w_MxV > 0).sum(0)[:-1] >= 50).all()
    assert (w_MxV[:, -1] == 0).all()  # the masked id carries nothing, ever
    _assert_mean_within_se(w_MxV, t, "E[w] = t")
    if replace and temperature != 1.0:  # power: bare counts c/N (no t/q factor) are rejected
        q = softmax64(logits, temperature)
        bare = w_MxV * np.divide(q, t, out=np.zeros_like(t), where=t > 0)
        bare_se = bare.std(0, ddof=1) / np.sqrt(UNB_M)
        assert (np.abs(bare.mean(0) - t) > bonferroni_z(UNB_V) * bare_se + FLOAT_ATOL).any()
    if not replace:  # the largest perturbed value is a draw from q: so is the first kept id
        assert chisquare_pvalue(st.ids[:, 0], softmax64(logits, temperature)) > ALPHA

    # Per-sample gradients of the sparse loss vs the full-KD gradient.
    g_MxV = _per_sample_grads(student, st.ids, st.weights)
    g_full = jax.grad(full_kd_loss)(student, logits)
    _assert_mean_within_se(np.asarray(g_MxV, np.float64), np.asarray(g_full, np.float64), "E[grad]")


def test_top_k_is_biased():
    logits, student, t = _unbiasedness_setup()
    g_full = np.asarray(jax.grad(full_kd_loss)(student, logits), np.float64)
    # SE of the RS-KD mean gradient with the same storage (K = N = 8) and M samples.
    st = _tokens(
        jax.random.key(8), np.broadcast_to(logits, (UNB_M, UNB_V)), UNB_N, temperature=1.0, replace=True
    )  # the same static arguments: no recompile
    g_MxV = _per_sample_grads(student, st.ids, st.weights)
    se = np.asarray(g_MxV, np.float64).std(0, ddof=1) / np.sqrt(UNB_M)
    for renormalize in (True, False):
        tk = top_k_targets(logits, UNB_N, renormalize=renormalize)
        g_topk = np.asarray(jax.grad(sparse_kd_loss)(student, tk.ids, tk.weights), np.float64)
        # Deterministic, so its expected gradient is itself: it fails the unbiasedness test
        # that RS-KD passes (|bias| <= z * SE) by more than 5x that tolerance.
        assert (np.abs(g_topk - g_full)[:-1] / se[:-1]).max() > 5 * bonferroni_z(UNB_V)
        w = dense(tk.ids[None], tk.weights[None], UNB_V)[0]
        assert not np.allclose(w, t, atol=0.01)  # the target is not t
    kept = np.asarray(tk.ids)
    np.testing.assert_allclose(tk.weights, t[kept], rtol=1e-5)  # unrenormalised: t on the kept ids
    assert t[kept].sum() < 0.6  # ... which misses most of the mass


def test_self_normalised_is_biased_for_one_draw():
    # With one draw the self-normalised weight is a one-hot of a draw from q, so its
    # expectation is q, not t: biased (E[w] = t for the plain weights). The same holds for
    # replace=False with k = 1 (its first id is a draw from q, tested above).
    logits, _, t = _unbiasedness_setup()
    temperature = 2.0
    q = softmax64(logits, temperature)
    st = _tokens(jax.random.key(9), np.broadcast_to(logits, (UNB_M, UNB_V)), 1, temperature=temperature, normalize=True)
    w_MxV = dense(st.ids, st.weights, UNB_V)
    np.testing.assert_allclose(w_MxV.sum(1), 1.0, rtol=1e-6)
    se = _assert_mean_within_se(w_MxV, q, "E[w_normalised] = q")
    z = bonferroni_z(UNB_V)
    assert (np.abs(w_MxV.mean(0) - t) > z * se + FLOAT_ATOL).any()


def test_self_normalised_is_consistent():
    # Many draws: w_norm_i - t_i ~ Normal(0, s_i^2 / N) (delta method), with
    # s_i^2 = E_q[r(X)^2 (1[X = i] - t_i)^2], r = t / q: the error shrinks like 1/sqrt(N).
    logits, _, t = _unbiasedness_setup()
    temperature, n, positions = 1.5, 4096, 8
    q = softmax64(logits, temperature)
    r = np.divide(t, q, out=np.zeros_like(t), where=q > 0)
    s2 = q * r**2 * (1 - t) ** 2 + t**2 * ((q * r**2).sum() - q * r**2)
    st = _tokens(
        jax.random.key(10), np.broadcast_to(logits, (positions, UNB_V)), n, temperature=temperature, normalize=True
    )
    w = dense(st.ids, st.weights, UNB_V)
    tol = bonferroni_z(positions * UNB_V) * np.sqrt(s2 / n) + FLOAT_ATOL
    assert (np.abs(w - t) <= tol).all()


def test_without_replacement_keeping_every_id_is_exact():
    # k = V: all finite ids kept with pi = 1 (no (k+1)-th value exists), weights = t exactly.
    logits, _, t = _unbiasedness_setup()
    st = _tokens(jax.random.key(11), logits[None], UNB_V, replace=False)
    np.testing.assert_allclose(dense(st.ids, st.weights, UNB_V)[0], t, rtol=1e-5, atol=1e-7)
    assert (np.asarray(st.weights)[0, -1] == 0) and st.ids[0, -1] == 0  # one empty slot


# ------------------------------------------------------------------ without replacement: law

WOR_V, WOR_K, WOR_M = 300, 3, 30000
# 8 finite ids spread over the tree (V = 300: 19 leaf rows under 2 nodes under the root), two
# in one leaf row (40, 41), so draws walk every level and removals cross rows and nodes.
WOR_IDS = np.array([3, 17, 40, 41, 100, 250, 257, 299])


def _wor_logits():
    logits = np.full(WOR_V, -np.inf, np.float32)
    logits[WOR_IDS] = np.random.default_rng(30).normal(size=WOR_IDS.size) * 1.2
    return logits


def _ordered_law(q, k, remove=True):
    """Exact law of ordered k-tuples of distinct ids: successive draws from q renormalised over
    the ids left (remove=True), or i.i.d. from q conditioned on distinct ids (remove=False):
    flat index sum_j ids_j V^(k-1-j) -> probability."""
    vocab, out = q.size, np.zeros(q.size**k)
    support = np.flatnonzero(q)

    def walk(prefix, prob, left):
        if len(prefix) == k:
            out[np.ravel_multi_index(prefix, (vocab,) * k)] = prob
            return
        for i in support:
            if i not in prefix:
                walk(prefix + [i], prob * q[i] / (left if remove else 1.0), left - q[i])

    walk([], 1.0, 1.0)
    return out / out.sum()


def _tuple_index(ids_MxK, vocab):
    return np.ravel_multi_index(tuple(np.asarray(ids_MxK).T), (vocab,) * ids_MxK.shape[-1])


@pytest.mark.parametrize("temperature", [1.0, pytest.param(0.8, marks=pytest.mark.slow)])
def test_without_replacement_ordered_tuples_match_sequential_law(temperature):
    logits = _wor_logits()
    st = _tokens(
        jax.random.key(31), np.broadcast_to(logits, (WOR_M, WOR_V)), WOR_K, temperature=temperature, replace=False
    )
    ids = np.asarray(st.ids)
    assert (np.sort(ids, -1)[:, 1:] != np.sort(ids, -1)[:, :-1]).all()  # no repeated id
    q = softmax64(logits, temperature)
    cells = _tuple_index(ids, WOR_V)
    # chisquare_pvalue asserts that no zero-probability tuple (a repeat, a masked id) was drawn.
    assert chisquare_pvalue(cells, _ordered_law(q, WOR_K)) > ALPHA
    # Power: the same draws reject i.i.d. draws conditioned on distinct ids (the drawn mass not
    # removed from the renormalisation) and a proposal 5% off in temperature.
    assert chisquare_pvalue(cells, _ordered_law(q, WOR_K, remove=False)) < ALPHA
    assert chisquare_pvalue(cells, _ordered_law(softmax64(logits, temperature * 1.05), WOR_K)) < ALPHA


def _gumbel_top_k_numpy(logits, k, m, seed, kappa_rank=None):
    """Reference Gumbel-top-k (the first sampler's algorithm) in float64: ids [m, k] and
    weights t_i / pi_i, pi_i = 1 - exp(-exp(l_i - kappa)), kappa the (kappa_rank + 1)-th
    largest perturbed logit (default kappa_rank = k: the (k+1)-th)."""
    perturbed = logits + np.random.default_rng(seed).gumbel(size=(m, logits.size))  # -inf stays
    order = np.argsort(-perturbed, axis=-1, kind="stable")
    ids = order[:, :k]
    kappa = np.take_along_axis(perturbed, order[:, [k if kappa_rank is None else kappa_rank]], -1)
    pi = -np.expm1(-np.exp(logits[ids] - kappa))
    return ids, softmax64(logits)[ids] / pi


def test_without_replacement_weights_match_gumbel_top_k_in_law():
    # Two-sample KS tests against the reference algorithm on the total weight (a function of
    # the ids and of kappa) and on the first id's weight: the same law, not only the same mean.
    # Both rounded to 1e-4: in float32 pi rounds to 1 (w = t, an atom) where float64 has
    # w = t (1 + 1e-8); the rounding makes the atoms the same (KS is conservative with ties).
    logits, k, m = _wor_logits(), 4, 4000
    st = _tokens(jax.random.key(32), np.broadcast_to(logits, (m, WOR_V)), k, replace=False)
    w = np.round(np.asarray(st.weights, np.float64), 4)
    ref_ids, ref_w = _gumbel_top_k_numpy(logits, k, m, seed=33)
    ref_w = np.round(ref_w, 4)
    assert np.isfinite(logits[ref_ids]).all() and np.isfinite(ref_w).all()
    for got, ref in ((w.sum(-1), ref_w.sum(-1)), (w[:, 0], ref_w[:, 0])):
        assert stats.ks_2samp(got, ref).pvalue > ALPHA / 2
    # Power: kappa taken as the k-th largest value (the last kept id's) is rejected.
    _, bad_w = _gumbel_top_k_numpy(logits, k, m, seed=33, kappa_rank=k - 1)
    assert stats.ks_2samp(w.sum(-1), np.round(bad_w, 4).sum(-1)).pvalue < ALPHA


@pytest.mark.parametrize("vocab", [1, 17])  # a single id; k = V over a padded leaf row
def test_without_replacement_small_vocabularies_keep_every_id(vocab):
    logits = np.linspace(0.0, -1.0, vocab).astype(np.float32)
    st = _tokens(jax.random.key(34), np.broadcast_to(logits, (50, vocab)), vocab, replace=False)
    ids, w = np.asarray(st.ids), np.asarray(st.weights)
    assert (np.sort(ids, -1) == np.arange(vocab)).all()  # each id once
    np.testing.assert_allclose(np.take_along_axis(softmax64(logits)[None].repeat(50, 0), ids, -1), w, rtol=1e-5)
    assert len({tuple(r) for r in ids}) > 1 or vocab == 1  # the order is random


def test_without_replacement_is_exact_past_float32_underflow():
    # exp(-150) is 0 in float32, yet once id 0 is drawn the -150 ids hold all the mass left:
    # each row is rescaled by its own max, so the next draws are uniform over them, as with
    # Gumbel-top-k (a single float32 mass tree could not draw them at all).
    vocab, m = 40, 3000
    logits = np.full(vocab, -150.0, np.float32)
    logits[0] = 0.0
    logits[[7, 20, 33]] = -np.inf
    st = _tokens(jax.random.key(35), np.broadcast_to(logits, (m, vocab)), 3, replace=False)
    ids = np.asarray(st.ids)
    assert (ids[:, 0] == 0).all() and (ids[:, 1] != ids[:, 2]).all() and (ids[:, 1:] != 0).all()
    uniform = np.where(np.isfinite(logits), 1.0, 0.0)
    uniform[0] = 0.0
    assert chisquare_pvalue(ids[:, 1], uniform / uniform.sum()) > ALPHA


# ------------------------------------------------------------------ invariants


def _invariant_logits():
    logits = lm_like_logits(3 * 4 * 300, seed=12, scale=3.0).reshape(3, 4, 300)
    mask = np.random.default_rng(13).uniform(size=logits.shape) < 0.3
    logits[mask] = -np.inf
    logits[..., -40:] = -np.inf  # padded vocabulary rows
    return logits


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_with_replacement_invariants(temperature):
    logits = _invariant_logits()
    n = 64
    sc = _counts(jax.random.key(14), logits, n, temperature=temperature)
    assert isinstance(sc, SampledCounts)
    assert sc.ids.shape == sc.counts.shape == sc.weights.shape == (3, 4, n)
    assert (sc.ids.dtype, sc.counts.dtype, sc.weights.dtype) == (jnp.int32, jnp.int32, jnp.float32)
    ids, counts, w = (np.asarray(a).reshape(-1, n) for a in sc)
    assert (counts.sum(-1) == n).all() and (counts >= 0).all() and (w >= 0).all()
    flat_logits = logits.reshape(-1, 300)
    t, q = softmax64(flat_logits), softmax64(flat_logits, temperature)
    for row in range(ids.shape[0]):
        used = counts[row] > 0
        k = used.sum()
        assert used[:k].all() and not used[k:].any()  # unique ids first
        assert (np.diff(ids[row, :k]) > 0).all()  # sorted, so no duplicates
        assert (ids[row, k:] == 0).all() and (w[row, k:] == 0).all()
        assert np.isfinite(flat_logits[row, ids[row, :k]]).all()  # -inf never drawn
        expected = counts[row, :k] / n * t[row, ids[row, :k]] / q[row, ids[row, :k]]
        np.testing.assert_allclose(w[row, :k], expected, rtol=2e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_without_replacement_invariants(normalize):
    logits = _invariant_logits()
    k = 16
    st = _tokens(jax.random.key(15), logits, k, temperature=0.8, replace=False, normalize=normalize)
    assert isinstance(st, SparseTargets)
    assert st.ids.shape == st.weights.shape == (3, 4, k)
    assert (st.ids.dtype, st.weights.dtype) == (jnp.int32, jnp.float32)
    ids, w = np.asarray(st.ids).reshape(-1, k), np.asarray(st.weights).reshape(-1, k)
    flat_logits = logits.reshape(-1, 300)
    t = softmax64(flat_logits)
    for row in range(ids.shape[0]):
        assert len(set(ids[row])) == k and (w[row] > 0).all()
        assert np.isfinite(flat_logits[row, ids[row]]).all()
        if normalize:
            np.testing.assert_allclose(w[row].sum(), 1.0, rtol=1e-5)
        else:
            assert (w[row] >= t[row, ids[row]] * (1 - 1e-5)).all()  # w = t / pi, pi <= 1


def test_masked_ids_are_never_drawn():
    vocab, n = 1000, 2048  # tree: 63 leaf rows of 16 (the last half padding), 4 nodes of 256
    logits = np.tile(lm_like_logits(vocab, seed=16, scale=2.0), (5, 1))
    logits[0, :] = -np.inf
    logits[0, 517] = 0.0  # a single finite id
    logits[1, 700:] = -np.inf  # padded vocabulary tail: whole rows and nodes of zero mass
    logits[2, ::2] = -np.inf  # every other id, a whole 256-node and rows on either side
    logits[2, 224:544] = -np.inf
    logits[3, :] = -200.0  # finite but zero in float32 after exp(x - max)
    logits[3, [5, 600, 999]] = 0.0
    logits[4, 1::16] = -np.inf  # masked ids right next to likely ones, in every leaf row
    logits[4, 0::16] = 8.0
    sc = _counts(jax.random.key(17), logits, n)
    ids, counts = np.asarray(sc.ids), np.asarray(sc.counts)
    assert (counts.sum(-1) == n).all()
    drawn = [ids[row][counts[row] > 0] for row in range(5)]
    assert drawn[0].tolist() == [517] and sc.weights[0, 0] == 1.0
    assert (drawn[1] < 700).all()
    assert np.isfinite(logits[2][drawn[2]]).all()
    assert drawn[3].tolist() == [5, 600, 999]
    assert np.isfinite(logits[4][drawn[4]]).all()
    st = _tokens(jax.random.key(19), logits, 8, replace=False)
    assert st.ids[0, 0] == 517 and st.weights[0, 0] == 1.0 and (st.weights[0, 1:] == 0).all()
    assert np.sort(st.ids[3, :3]).tolist() == [5, 600, 999] and (st.weights[3, 3:] == 0).all()
    for row in (1, 2, 4):
        assert np.isfinite(logits[row][np.asarray(st.ids[row])]).all()


@pytest.mark.parametrize("vocab", [1, 17])  # a single id; a padded leaf row
def test_small_vocabularies(vocab):
    logits = np.linspace(0.0, -1.0, vocab).astype(np.float32)
    sc = _counts(jax.random.key(20), np.broadcast_to(logits, (500, vocab)), 4)
    ids = np.asarray(sc.ids)[np.asarray(sc.counts) > 0]
    assert ids.min() >= 0 and ids.max() < vocab and (np.asarray(sc.counts).sum(-1) == 4).all()
    assert len(np.unique(ids)) == vocab  # every id is reachable


# ------------------------------------------------------------------ shapes, keys, jit


def test_key_per_position_independent_of_batch_shape_and_vmap():
    # Position p (row-major over the leading dims) uses fold_in(key, p), whatever the shape.
    logits = lm_like_logits(6 * 200, seed=21).reshape(2, 3, 200)
    logits[0, 1] = logits[0, 0]
    key = jax.random.key(22)
    a = np.asarray(_draw(key, logits, 16)).reshape(6, 16)
    b = _draw(key, logits[0], 16)  # a prefix of the positions, another shape
    np.testing.assert_array_equal(a[:3], b)
    c = _draw(key, logits[0, 0], 16)  # no leading dims = position 0
    assert c.shape == (16,)
    np.testing.assert_array_equal(c, a[0])
    assert not np.array_equal(a[0], a[1])  # same logits, independent keys
    # How the cache may use it: one key per sequence, vmapped over the batch.
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(2))
    batched = jax.vmap(lambda k, l: draw_categorical(k, l, 16))(keys, logits)
    np.testing.assert_array_equal(batched[1], _draw(keys[1], logits[1], 16))


def test_mass_tree_entropy_terms_and_draws_from_a_shared_tree():
    """The tree's one pass over V also sums the entropy's moment; the cache step draws from the
    tree it shares with its diagnostics (`sample_counts_from_tree`, `systematic_counts_from_tree`)
    and must draw what the samplers draw alone."""
    vocab, positions = 49_152, 64
    logits = np.stack([lm_like_logits(vocab, seed=40 + p, scale=3.0, padded=p % 3) for p in range(positions)])
    logits_PxV = jnp.asarray(logits)
    tree_P = jax.jit(jax.vmap(sampling.mass_tree))(logits_PxV)
    x = np.where(np.isfinite(logits), logits, 0.0).astype(np.float64)
    e_PxV = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(tree_P.root, e_PxV.sum(-1), rtol=1e-5)
    np.testing.assert_allclose(tree_P.moment, (e_PxV * x).sum(-1), rtol=1e-4)
    np.testing.assert_allclose(tree_P.log_z, np.log(e_PxV.sum(-1)) + logits.max(-1), rtol=1e-6)
    keys_P = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(41), jnp.arange(positions))

    @jax.jit
    def shared(keys_P, logits_PxV):  # as the cache step: one tree, read by the draws and the entropy
        tree_P = jax.vmap(sampling.mass_tree)(logits_PxV)
        iid = jax.vmap(lambda k, t: sampling.sample_counts_from_tree(k, t, 50))(keys_P, tree_P)
        sys = jax.vmap(lambda k, t: sampling.systematic_counts_from_tree(k, t, 16))(keys_P, tree_P)
        return iid, sys, tree_P.moment / tree_P.root

    iid, sys, _ = shared(keys_P, logits_PxV)
    alone = jax.jit(jax.vmap(lambda k, l: (_counts(k, l, 50), sampling.systematic_counts(k, l, 16))))
    for a, b in zip((iid, sys), alone(keys_P, logits_PxV)):
        for x_a, x_b in zip(a, b):
            np.testing.assert_array_equal(x_a, x_b)


def test_bfloat16_logits():
    """bfloat16 logits x are sampled as their (exact) float32 values: draws from
    q = softmax(x / T), float32 weights with E[w] = t = softmax(x)."""
    vocab, m, temperature = 50, 4000, 1.5
    x_bf16 = jnp.asarray(lm_like_logits(vocab, seed=23, scale=1.0), jnp.bfloat16)
    x = np.asarray(x_bf16.astype(jnp.float32))
    x_MxV = jnp.broadcast_to(x_bf16, (m, vocab))
    st = _tokens(jax.random.key(24), x_MxV, 4, temperature=temperature)
    assert st.ids.dtype == jnp.int32 and st.weights.dtype == jnp.float32
    assert np.unique(st.ids).size == vocab  # every id was kept: a trustworthy sample SE
    _assert_mean_within_se(dense(st.ids, st.weights, vocab), softmax64(x), "E[w], bfloat16 logits")
    draws = _draw(jax.random.key(25), x_MxV[:64], 512, temperature=temperature)
    assert chisquare_pvalue(draws, softmax64(x, temperature)) > ALPHA


def test_top_k_and_ghost_targets():
    logits = np.log(np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]], np.float32))
    tk = top_k_targets(logits, 2)
    np.testing.assert_array_equal(tk.ids, [[1, 2], [2, 0]])  # ties: lower id first
    np.testing.assert_allclose(tk.weights, [[0.625, 0.375], [8 / 9, 1 / 9]], rtol=1e-6)
    raw = top_k_targets(logits, 2, renormalize=False)
    np.testing.assert_allclose(raw.weights, [[0.5, 0.3], [0.8, 0.1]], rtol=1e-6)
    g = ghost_targets(logits, 2)
    assert isinstance(g, GhostTargets) and g.tail_mass.shape == (2,)
    np.testing.assert_allclose(g.probs, [[0.5, 0.3], [0.8, 0.1]], rtol=1e-6)
    np.testing.assert_allclose(g.tail_mass, [0.2, 0.1], rtol=1e-5)
    # a tiny tail keeps its relative precision (1 - sum would be 0 in float32)
    peaked = np.zeros((1, 2, 100), np.float32)
    peaked[..., 0] = 40.0
    g = ghost_targets(peaked, 1)
    assert g.ids.shape == g.probs.shape == (1, 2, 1) and g.tail_mass.shape == (1, 2)
    np.testing.assert_allclose(g.tail_mass, 99 / (np.exp(40.0) + 99), rtol=1e-5)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="k must be"):
            top_k_targets(logits, bad)


def test_argument_errors():
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError, match="num_draws"):
        sample_tokens(jax.random.key(0), logits, 0)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(jax.random.key(0), logits, 4, temperature=0.0)


def test_docstring_examples():
    result = doctest.testmod(sampling, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
