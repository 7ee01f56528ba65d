"""rskd_jax.sampling's variance-reduced estimators: systematic_counts and head_tail_targets.

Statistical tests as in test_sampling: fixed seeds, |mean - expected| <= z * SE + FLOAT_ATOL with
a Bonferroni z over the coordinates; each has a power check (a biased variant is rejected).
"""

import jax
import numpy as np
import pytest
from test_sampling import (
    FLOAT_ATOL,
    UNB_M,
    UNB_N,
    UNB_V,
    _assert_mean_within_se,
    _per_sample_grads,
    _unbiasedness_setup,
    bonferroni_z,
    dense,
    lm_like_logits,
    softmax64,
)

from rskd_jax.losses import full_kd_loss
from rskd_jax.sampling import SampledCounts, SparseTargets, head_tail_targets, sample_counts, systematic_counts


def _rejects(samples_MxV, expected_V):
    """True if some coordinate's mean is off by more than the unbiasedness test's tolerance."""
    se = samples_MxV.std(0, ddof=1) / np.sqrt(samples_MxV.shape[0])
    return (np.abs(samples_MxV.mean(0) - expected_V) > bonferroni_z(expected_V.size) * se + FLOAT_ATOL).any()


# ------------------------------------------------------------------ systematic


@pytest.mark.parametrize("temperature", [1.0, pytest.param(0.7, marks=pytest.mark.slow)])
def test_systematic_counts_are_floor_or_ceil_of_n_q(temperature):
    vocab, positions, n = 5003, 64, 50
    logits_PxV = np.stack([lm_like_logits(vocab, seed=s, padded=11) for s in range(positions)])
    sc = systematic_counts(jax.random.key(0), logits_PxV, n, temperature=temperature)
    assert isinstance(sc, SampledCounts) and sc.ids.shape == sc.counts.shape == sc.weights.shape == (positions, n)
    counts = np.asarray(sc.counts)
    assert (counts.sum(-1) == n).all() and (counts >= 0).all()
    c_PxV = dense(sc.ids, counts, vocab)
    nq = n * softmax64(logits_PxV, temperature)
    # every id, kept or not: floor or ceil of N q_i (1e-3 slack for the float32 CDF)
    assert ((c_PxV >= np.floor(nq - 1e-3)) & (c_PxV <= np.ceil(nq + 1e-3))).all()
    assert (c_PxV[:, -11:] == 0).all()  # masked ids never kept
    for row in range(positions):  # unique ids first, increasing; empty slots id 0, weight 0
        k = int((counts[row] > 0).sum())
        assert (counts[row, :k] > 0).all() and (np.diff(np.asarray(sc.ids[row, :k])) > 0).all()
        assert (np.asarray(sc.ids[row, k:]) == 0).all() and (np.asarray(sc.weights[row, k:]) == 0).all()
    # i.i.d. draws (the same N) break the floor/ceil property: the check has power
    iid = dense(*sample_counts(jax.random.key(0), logits_PxV, n, temperature=temperature)[:2], vocab)
    assert not ((iid >= np.floor(nq - 1e-3)) & (iid <= np.ceil(nq + 1e-3))).all()


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_systematic_targets_and_gradient_are_unbiased(temperature):
    logits, student, t = _unbiasedness_setup()
    logits_MxV = np.broadcast_to(logits, (UNB_M, UNB_V))
    sc = systematic_counts(jax.random.key(7), logits_MxV, UNB_N, temperature=temperature)
    w_MxV = dense(sc.ids, sc.weights, UNB_V)
    assert ((w_MxV > 0).sum(0)[:-1] >= 50).all()  # every support id kept often: a usable SE
    assert (w_MxV[:, -1] == 0).all()
    _assert_mean_within_se(w_MxV, t, "systematic E[w] = t")
    if temperature != 1.0:  # power: bare counts c/N (no t/q factor) are rejected
        assert _rejects(dense(sc.ids, sc.counts, UNB_V) / UNB_N, t)
    g_MxV = _per_sample_grads(student, sc.ids, sc.weights)
    g_full = jax.grad(full_kd_loss)(student, logits)
    _assert_mean_within_se(np.asarray(g_MxV, np.float64), np.asarray(g_full, np.float64), "systematic E[grad]")


def _stress_logits(kind, vocab, positions):
    """[P, V] float32: "peaked" (one id per row has q > 0.99, the rest a long tail spread over 6
    orders of magnitude) or "flat" (Gaussian * 0.1); -inf on the last 11 ids and on 1% of ids
    scattered (the peak's neighbours included), so zero-mass ids sit inside rows."""
    rng = np.random.default_rng(5)
    out = np.empty((positions, vocab), np.float32)
    for p in range(positions):
        if kind == "peaked":
            row = np.log(0.001 / vocab) + rng.normal(size=vocab) * 2.0
            row[(p * 997) % (vocab - 11)] = 0.0
        else:
            row = rng.normal(size=vocab) * 0.1
        row[rng.choice(vocab, vocab // 100, replace=False)] = -np.inf
        row[-11:] = -np.inf
        out[p] = row
    peak = (np.arange(positions) * 997) % (vocab - 11)
    if kind == "peaked":
        out[np.arange(positions), peak] = 0.0
        out[np.arange(positions), np.minimum(peak + 1, vocab - 12)] = -np.inf
    return out


@pytest.mark.parametrize("n", [1, 7, 50])
@pytest.mark.parametrize("kind", ["peaked", "flat"])
def test_systematic_counts_match_float64_cdf_for_the_same_u(kind, n):
    """Every id's count equals the float64 systematic count for the position's own u
    (F_i = ceil(N cdf_i - u) clipped to [0, N]), except where N cdf_i - u is within 1e-4 of an
    integer (a float32 tie); so counts are floor / ceil of N q_i and zero-mass ids get none."""
    vocab, positions = 5003, 96
    logits_PxV = _stress_logits(kind, vocab, positions)
    q_PxV = softmax64(logits_PxV)
    if kind == "peaked":
        assert (q_PxV.max(-1) > 0.99).all()
    key = jax.random.key(11)
    sc = systematic_counts(key, logits_PxV, n)
    counts = np.asarray(sc.counts)
    assert (counts.sum(-1) == n).all()
    c_PxV = dense(sc.ids, counts, vocab)
    assert (c_PxV[~np.isfinite(logits_PxV)] == 0).all()
    u_P = np.array([float(jax.random.uniform(jax.random.fold_in(key, p), ())) for p in range(positions)])
    x_PxV = n * np.cumsum(q_PxV, -1) - u_P[:, None]
    f_ref = np.clip(np.ceil(x_PxV), 0, n)
    tie_PxV = np.abs(x_PxV - np.round(x_PxV)) < 1e-4
    f_got = np.cumsum(c_PxV, -1)
    assert (tie_PxV | (f_got == f_ref)).all()
    assert tie_PxV.mean() < 1e-3  # the exemption is rare: the check bites
    nq = n * q_PxV
    assert ((c_PxV >= np.floor(nq - 1e-4)) & (c_PxV <= np.ceil(nq + 1e-4))).all()
    for row in range(positions):  # unique ids first, increasing
        k = int((counts[row] > 0).sum())
        assert (np.diff(np.asarray(sc.ids[row, :k])) > 0).all() and (np.asarray(sc.ids[row, k:]) == 0).all()


# ------------------------------------------------------------------ head + sampled tail

HEAD = 4


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_head_tail_is_unbiased_and_exact_on_the_head(temperature):
    logits, student, t = _unbiasedness_setup()
    logits_MxV = np.broadcast_to(logits, (UNB_M, UNB_V))
    ht = head_tail_targets(jax.random.key(9), logits_MxV, HEAD, UNB_N, temperature=temperature)
    assert isinstance(ht, SparseTargets) and ht.ids.shape == ht.weights.shape == (UNB_M, HEAD + UNB_N)
    ids, w = np.asarray(ht.ids), np.asarray(ht.weights)
    top = np.argsort(-t)[:HEAD]
    assert (ids[:, :HEAD] == top).all()  # the top-h ids, in order, with t_i exactly
    np.testing.assert_allclose(w[:, :HEAD], np.broadcast_to(t[top], (UNB_M, HEAD)), rtol=1e-6)
    tail_ids = np.where(w[:, HEAD:] > 0, ids[:, HEAD:], -1)
    assert not np.isin(tail_ids, top).any()  # tail draws never repeat a head id
    w_MxV = dense(ids, w, UNB_V)
    assert ((w_MxV > 0).sum(0)[:-1] >= 50).all() and (w_MxV[:, -1] == 0).all()
    _assert_mean_within_se(w_MxV, t, "head_tail E[w] = t")
    # power: the tail without its mass factor m (weights (c/N) r/q, summing to ~1) is rejected
    m = 1.0 - t[top].sum()
    no_m = w_MxV.copy()
    no_m[:, np.setdiff1d(np.arange(UNB_V), top)] /= m
    assert _rejects(no_m, t)
    g_MxV = _per_sample_grads(student, ht.ids, ht.weights)
    g_full = jax.grad(full_kd_loss)(student, logits)
    _assert_mean_within_se(np.asarray(g_MxV, np.float64), np.asarray(g_full, np.float64), "head_tail E[grad]")


def test_head_tail_at_temperature_1_sums_to_one_and_empty_tail():
    logits_PxV = np.stack([lm_like_logits(300, seed=s, padded=7) for s in range(16)])
    ht = head_tail_targets(jax.random.key(3), logits_PxV, 5, 20)
    np.testing.assert_allclose(np.asarray(ht.weights).sum(-1), 1.0, rtol=1e-5)
    assert not np.isin(np.asarray(ht.ids)[np.asarray(ht.weights) > 0], np.arange(293, 300)).any()
    # every finite id in the head: the tail mass is 0, the tail slots empty, the head exact
    few = np.full((2, 40), -np.inf, np.float32)
    few[:, :3] = [[0.0, 1.0, 2.0], [2.0, 2.0, -1.0]]
    ht = head_tail_targets(jax.random.key(4), few, 3, 6)
    w = np.asarray(ht.weights)
    assert (w[:, 3:] == 0).all() and (np.asarray(ht.ids)[:, 3:] == 0).all()
    np.testing.assert_allclose(dense(ht.ids, w, 40), softmax64(few), rtol=1e-6, atol=1e-7)


def test_head_tail_refuses_bad_head():
    for head in (0, 41):
        with pytest.raises(ValueError, match="k must be an integer"):
            head_tail_targets(jax.random.key(0), np.zeros((2, 40), np.float32), head, 4)
