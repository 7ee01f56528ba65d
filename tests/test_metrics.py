"""rskd_jax.metrics against numpy references and hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rskd_jax import metrics


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _numpy_ece(logits, labels, where, nb=15):
    logp = _log_softmax(logits)
    conf = np.exp(logp.max(-1))[where]
    correct = (logp.argmax(-1) == labels)[where]
    ece = 0.0
    for b in range(nb):
        lo, hi = b / nb, (b + 1) / nb
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.sum() / len(conf) * abs(correct[sel].mean() - conf[sel].mean())
    return ece


def _random_case(seed=0, b=3, l=7, v=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, l, v)).astype(np.float32) * 2.0
    teacher = rng.normal(size=(b, l, v)).astype(np.float32) * 2.0
    labels = rng.integers(0, v, size=(b, l)).astype(np.int32)
    where = rng.random((b, l)) > 0.2
    return logits, teacher, labels, where


def test_hand_computed_two_positions():
    # position 0: p = (0.5, 0.5) label 0 -> nll log 2, conf 0.5 (bin 7: (7/15, 8/15]), argmax 0
    # position 1: p = (e^2, 1)/(e^2+1) label 1 -> nll log(e^2+1), conf 0.8808 (bin 13), wrong
    logits = jnp.array([[[0.0, 0.0], [2.0, 0.0]]])
    labels = jnp.array([[0, 1]])
    total = metrics.finalize(metrics.accumulate(None, metrics.lm_sums(logits, labels)))
    conf1 = math.exp(2) / (math.exp(2) + 1)
    assert total["val_loss"] == pytest.approx((math.log(2) + math.log(math.exp(2) + 1)) / 2, 1e-6)
    assert total["perplexity"] == pytest.approx(math.exp(total["val_loss"]), 1e-6)
    assert total["accuracy"] == pytest.approx(0.5)
    # argmax of a tie is the first id (0) == label: correct, |1 - 0.5|; second |0 - conf1|
    assert total["ece"] == pytest.approx((0.5 + conf1) / 2, 1e-6)


def test_lm_sums_match_numpy():
    logits, _, labels, where = _random_case()
    total = metrics.finalize(metrics.accumulate(None, metrics.lm_sums(logits, labels, where)))
    logp = _log_softmax(logits)
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    assert total["val_loss"] == pytest.approx(nll[where].mean(), rel=1e-5)
    assert total["accuracy"] == pytest.approx((logp.argmax(-1) == labels)[where].mean())
    assert total["ece"] == pytest.approx(_numpy_ece(logits, labels, where), abs=1e-6)
    assert total["tokens"] == where.sum()


def test_per_row_sums_split_the_pooled_sums():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=(3, 5))
    where = rng.random((3, 5)) < 0.6
    where[1] = False  # a row without labels
    out = metrics.lm_sums(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(where), per_row=True)
    nll = -np.take_along_axis(_log_softmax(logits), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["row_nll_sum"], np.where(where, nll, 0).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(out["row_count"], where.sum(1))
    np.testing.assert_allclose(out["row_nll_sum"].sum(), out["nll_sum"], rtol=1e-6)
    assert "row_nll_sum" not in metrics.lm_sums(jnp.asarray(logits), jnp.asarray(labels))


def test_sums_add_over_chunks_and_batches():
    logits, teacher, labels, where = _random_case(1)
    whole = metrics.accumulate(
        None, {**metrics.lm_sums(logits, labels, where), **metrics.teacher_sums(logits, teacher, where)}
    )
    parts = None
    for sl in (np.s_[:1, :3], np.s_[:1, 3:], np.s_[1:, :]):
        parts = metrics.accumulate(
            parts,
            {
                **metrics.lm_sums(logits[sl], labels[sl], where[sl]),
                **metrics.teacher_sums(logits[sl], teacher[sl], where[sl]),
            },
        )
    a, b = metrics.finalize(whole), metrics.finalize(parts)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6), k


def test_teacher_kl_and_agreement_match_numpy():
    logits, teacher, _, where = _random_case(2)
    total = metrics.finalize(metrics.accumulate(None, metrics.teacher_sums(logits, teacher, where)))
    logp, logt = _log_softmax(logits), _log_softmax(teacher)
    kl = (np.exp(logt) * (logt - logp)).sum(-1)
    assert total["kl_to_teacher"] == pytest.approx(kl[where].mean(), rel=1e-5)
    agree = logp.argmax(-1) == logt.argmax(-1)
    assert total["top1_agreement"] == pytest.approx(agree[where].mean())
    same = metrics.finalize(metrics.accumulate(None, metrics.teacher_sums(teacher, teacher)))
    assert same["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert same["top1_agreement"] == 1.0


def test_sparse_kl_estimate_exact_with_full_support():
    # Weights = t over every id: the estimate equals the exact KL.
    logits, teacher, _, where = _random_case(3)
    logt = _log_softmax(teacher)
    t = np.exp(logt)
    entropy = -(t * logt).sum(-1)
    v = logits.shape[-1]
    ids = np.broadcast_to(np.arange(v), t.shape).astype(np.int32)
    est = metrics.sparse_teacher_sums(logits, ids, t.astype(np.float32), entropy, where)
    exact = metrics.teacher_sums(logits, teacher, where)
    assert float(est["kl_sum"]) == pytest.approx(float(exact["kl_sum"]), rel=1e-5)


def test_sparse_kl_estimate_hand_computed_with_empty_slots():
    # One position, p = softmax(0, log 3) = (1/4, 3/4); stored ids (1, 0, pad) with weights
    # (0.6, 0.4, 0): cross = 0.6 log(4/3) + 0.4 log 4; KL = cross - H(t).
    logits = jnp.array([[0.0, math.log(3.0)]])
    ids = jnp.array([[1, 0, 0]])
    w = jnp.array([[0.6, 0.4, 0.0]])
    h = 0.5
    est = metrics.sparse_teacher_sums(logits, ids, w, jnp.array([h]))
    want = 0.6 * math.log(4 / 3) + 0.4 * math.log(4) - h
    assert float(est["kl_sum"]) == pytest.approx(want, rel=1e-6)
    assert float(est["teacher_count"]) == 1.0
    # argmax p = 1 = the id of largest stored weight
    total = metrics.finalize(metrics.accumulate(None, est))
    assert total["top1_agreement"] == 1.0 and total["top1_agreement_estimated"] is True


def test_mask_vocab_hides_padded_ids():
    logits = jnp.array([[5.0, 1.0, 9.0, 9.0]])
    masked = metrics.mask_vocab(logits, 2)
    p = jax.nn.softmax(masked, axis=-1)
    np.testing.assert_allclose(p[0, 2:], 0.0)
    total = metrics.finalize(metrics.accumulate(None, metrics.lm_sums(masked, jnp.array([0]))))
    assert total["accuracy"] == 1.0
    # only ids 0 and 1 count: -log softmax(5, 1)[0] = log(1 + e^-4)
    assert total["val_loss"] == pytest.approx(math.log1p(math.exp(-4.0)), rel=1e-5)  # float32
    for vocab in (None, 4, 6):  # nothing to mask: the logits come back unchanged
        np.testing.assert_array_equal(metrics.mask_vocab(logits, vocab), logits)
    # tempered masked logits stay finite
    assert np.isfinite(np.asarray(masked / 0.1)).all()
