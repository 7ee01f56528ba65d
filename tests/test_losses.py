"""rskd_jax.losses: hand-computed values, float64 numpy references, masks, jit, gradients."""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rskd_jax import losses
from rskd_jax.losses import (
    cross_entropy,
    cross_entropy_from_hidden,
    full_kd_loss,
    ghost_kd_loss,
    reduce_sum_count,
    sparse_kd_loss,
    sparse_kd_loss_from_hidden,
    sparse_kd_loss_from_hidden_ragged,
    z_loss,
)

LN2, LN4 = np.log(2.0), np.log(4.0)


# ------------------------------------------------------------------ numpy float64 references


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_sparse_kd(x, ids, w):
    w = np.asarray(w, np.float64)
    log_p = np.take_along_axis(np_log_softmax(x), ids, -1)
    return -np.where(w != 0, w * np.where(w != 0, log_p, 0.0), 0.0).sum(-1)


def np_full_kd(x, l, temperature=1.0):
    log_t, log_p = np_log_softmax(l / temperature), np_log_softmax(x / temperature)
    t = np.exp(log_t)
    pos = t > 0
    return np.where(pos, t * (np.where(pos, log_t, 0.0) - np.where(pos, log_p, 0.0)), 0.0).sum(-1)


def np_ghost_kd(x, ids, probs, tail):
    log_p = np_log_softmax(x)
    p_k = np.exp(np.take_along_axis(log_p, ids, -1))
    head = (probs * (np.log(probs) - np.log(p_k))).sum(-1)
    return head + tail * (np.log(tail) - np.log1p(-p_k.sum(-1)))


def _inputs(v=11, k=4, lead=(2, 3), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*lead, v)).astype(np.float32) * 2
    l = rng.normal(size=(*lead, v)).astype(np.float32) * 2
    ids = np.stack([rng.choice(v, k, replace=False) for _ in range(int(np.prod(lead)))])
    ids = ids.reshape(*lead, k).astype(np.int32)
    w = rng.uniform(0.0, 0.5, size=(*lead, k)).astype(np.float32)
    return x, l, ids, w


# ------------------------------------------------------------------ values


def test_hand_computed_values():
    x = np.log(np.array([0.5, 0.25, 0.25], np.float32))
    loss = sparse_kd_loss(x, np.array([0, 2]), np.array([0.6, 0.4]))
    np.testing.assert_allclose(loss, 0.6 * LN2 + 0.4 * LN4, rtol=1e-6)
    t = np.log(np.array([0.75, 0.25], np.float32))
    kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    np.testing.assert_allclose(full_kd_loss(np.zeros(2), t), kl, rtol=1e-6)
    ghost = 0.7 * np.log(0.7 / 0.5) + 0.3 * np.log(0.3 / 0.5)
    got = ghost_kd_loss(x, np.array([0]), np.array([0.7]), 0.3)
    np.testing.assert_allclose(got, ghost, rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(x, 1), LN4, rtol=1e-6)
    np.testing.assert_allclose(z_loss(np.zeros(4)), LN4**2, rtol=1e-6)
    # the same teacher and student: KL 0, ghost 0
    np.testing.assert_allclose(full_kd_loss(x, x + 3.0), 0.0, atol=1e-6)
    got = ghost_kd_loss(x, np.array([0, 1]), np.array([0.5, 0.25]), 0.25)
    np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_numpy_references():
    x, l, ids, w = _inputs()
    np.testing.assert_allclose(sparse_kd_loss(x, ids, w), np_sparse_kd(x, ids, w), rtol=1e-5)
    for temp in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(full_kd_loss(x, l, temperature=temp), np_full_kd(x, l, temp), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            full_kd_loss(x, l, temperature=temp, scale_by_temperature_squared=True),
            temp**2 * np_full_kd(x, l, temp),
            rtol=1e-5,
            atol=1e-6,
        )
    t = np.exp(np_log_softmax(l))
    probs = np.take_along_axis(t, ids, -1)
    tail = 1.0 - probs.sum(-1)
    np.testing.assert_allclose(
        ghost_kd_loss(x, ids, probs, tail), np_ghost_kd(x, ids, probs, tail), rtol=1e-5, atol=1e-6
    )
    labels = ids[..., 0]
    ce = -np.take_along_axis(np_log_softmax(x), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(cross_entropy(x, labels), ce, rtol=1e-5)
    lse = np.log(np.exp(x.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(z_loss(x), lse**2, rtol=1e-5)


def test_ghost_tail_is_stable_when_student_is_confident():
    # 1 - sum_K p ~ 1e-13: a naive 1 - sum in float32 is 0 and its log is -inf.
    x = np.zeros(100, np.float32)
    x[0] = 30.0
    ids, probs, tail = np.array([0]), np.array([0.9]), np.array(0.1)
    ref = np_ghost_kd(x.astype(np.float64), ids, probs, tail)
    got = ghost_kd_loss(x, ids, probs, tail)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_zero_weight_slots_and_zero_probabilities_contribute_nothing():
    x = np.array([0.0, 1.0, -np.inf, 2.0], np.float32)  # student gives id 2 probability 0
    ids, w = np.array([1, 2, 3]), np.array([0.5, 0.0, 0.5], np.float32)
    loss, grad = jax.value_and_grad(sparse_kd_loss)(x, ids, w)
    np.testing.assert_allclose(loss, np_sparse_kd(x, ids, w), rtol=1e-6)
    assert np.isfinite(grad).all()
    # teacher t = 0 where the student has -inf: t log(t/p) = 0
    l = np.array([0.0, 1.0, -np.inf, 2.0], np.float32)
    kl, grad = jax.value_and_grad(full_kd_loss)(x, l)
    assert np.isfinite(kl) and np.isfinite(grad).all()
    np.testing.assert_allclose(kl, np_full_kd(x[[0, 1, 3]], l[[0, 1, 3]]), rtol=1e-6)
    # ghost with zero tail mass: r log r = 0, only the head sum_K t log(t / p) remains, and its
    # gradient is the full-KD gradient towards t = (0, 0.25, 0, 0.75): softmax(x) - t
    t = np.array([0.25, 0.75])
    val, grad = jax.value_and_grad(ghost_kd_loss)(x, np.array([1, 3]), t.astype(np.float32), 0.0)
    log_p = np_log_softmax(x.astype(np.float64))
    np.testing.assert_allclose(val, (t * (np.log(t) - log_p[[1, 3]])).sum(), rtol=1e-6)
    np.testing.assert_allclose(grad, np.exp(log_p) - np.array([0.0, 0.25, 0.0, 0.75]), atol=1e-6)
    # and a positive weight on an id the student excludes is an infinite loss, not a NaN
    assert sparse_kd_loss(x, np.array([2]), np.array([1.0])) == np.inf


def test_padded_student_vocabulary():
    x, l, ids, w = _inputs(v=7)
    pad = np.full((*x.shape[:-1], 5), -np.inf, np.float32)
    x_pad = np.concatenate([x, pad], -1)  # student rows 7..11 are padding (masked)
    np.testing.assert_allclose(sparse_kd_loss(x_pad, ids, w), sparse_kd_loss(x, ids, w), rtol=1e-6)
    np.testing.assert_allclose(full_kd_loss(x_pad, l), full_kd_loss(x, l), rtol=1e-6)
    probs, tail = _ghost_inputs(l, ids)
    np.testing.assert_allclose(ghost_kd_loss(x_pad, ids, probs, tail), ghost_kd_loss(x, ids, probs, tail), rtol=1e-5)
    # padded rows with finite student logits count in the student's normaliser
    x_open = np.concatenate([x, np.zeros_like(pad)], -1)
    l_pad = np.concatenate([l, pad], -1)
    np.testing.assert_allclose(full_kd_loss(x_open, l), np_full_kd(x_open, l_pad), rtol=1e-5)
    with pytest.raises(ValueError, match="larger than the student"):
        full_kd_loss(x, np.concatenate([l, l], -1))


def test_bfloat16_logits_give_float32_math():
    x, l, ids, w = _inputs()
    xb = jnp.asarray(x, jnp.bfloat16)
    got = sparse_kd_loss(xb, ids, w)
    assert got.dtype == jnp.float32
    ref = np_sparse_kd(np.asarray(xb.astype(jnp.float32)), ids, w)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert full_kd_loss(xb, jnp.asarray(l, jnp.bfloat16)).dtype == jnp.float32


# ------------------------------------------------------------------ masks, jit, reduction


def _ghost_inputs(l, ids):
    probs = np.take_along_axis(np.exp(np_log_softmax(l)), ids, -1).astype(np.float32)
    return probs, (1 - probs.sum(-1)).astype(np.float32)


def _all_losses(x, l, ids, w, probs, tail, where=None):
    return {
        "sparse": sparse_kd_loss(x, ids, w, where=where),
        "full": full_kd_loss(x, l, temperature=1.5, where=where),
        "ghost": ghost_kd_loss(x, ids, probs, tail, where=where),
        "ce": cross_entropy(x, ids[..., 0], where=where),
        "z": z_loss(x, where=where),
    }


def test_masked_equals_sliced():
    x, l, ids, w = _inputs()
    where = np.array([[True, False, True], [False, False, True]])
    probs, tail = _ghost_inputs(l, ids)
    masked = _all_losses(x, l, ids, w, probs, tail, where)
    sliced = _all_losses(x[where], l[where], ids[where], w[where], probs[where], tail[where])
    for name in masked:
        got = np.asarray(masked[name])
        np.testing.assert_allclose(got[where], sliced[name], rtol=1e-6, err_msg=name)
        assert (got[~where] == 0).all(), name
        s, c = reduce_sum_count(masked[name], where)
        s_ref, c_ref = reduce_sum_count(sliced[name])
        np.testing.assert_allclose(s, s_ref, rtol=1e-6)
        assert c == c_ref == where.sum() and c.dtype == s.dtype == jnp.float32


def test_masked_positions_may_hold_garbage_targets():
    x, _, ids, w = _inputs()
    where = np.ones(x.shape[:-1], bool)
    where[0, 0] = False
    w_bad = w.copy()
    w_bad[0, 0] = np.inf
    loss = sparse_kd_loss(x, ids, w_bad, where=where)
    assert loss[0, 0] == 0 and np.isfinite(loss).all()


def test_jit_equals_eager():
    x, l, ids, w = _inputs()
    probs, tail = _ghost_inputs(l, ids)
    eager = _all_losses(x, l, ids, w, probs, tail, where=ids[..., 0] > 2)
    jitted = jax.jit(_all_losses)(x, l, ids, w, probs, tail, ids[..., 0] > 2)
    for name in eager:
        np.testing.assert_allclose(jitted[name], eager[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_reduce_sum_count_is_exact_across_micro_batches():
    loss = np.random.default_rng(1).uniform(size=(4, 6)).astype(np.float32)
    where = np.random.default_rng(2).uniform(size=(4, 6)) > 0.4
    total_s, total_c = reduce_sum_count(loss, where)
    parts = [reduce_sum_count(loss[i : i + 2], where[i : i + 2]) for i in (0, 2)]
    np.testing.assert_allclose(sum(p[0] for p in parts), total_s, rtol=1e-6)
    assert sum(p[1] for p in parts) == total_c == where.sum()
    s, c = reduce_sum_count(loss)
    assert c == 24 and s.shape == () and c.shape == ()
    # a mask over the leading dims broadcasts
    s, c = reduce_sum_count(loss, np.array([True, False, True, False])[:, None])
    np.testing.assert_allclose(s, loss[[0, 2]].sum(), rtol=1e-6)
    assert c == 12


# ------------------------------------------------------------------ gradients


def test_full_kd_gradient_is_p_minus_t():
    x, l, _, _ = _inputs()
    for temp in (1.0, 0.5, 2.0):
        p, t = np.exp(np_log_softmax(x / temp)), np.exp(np_log_softmax(l / temp))
        g = jax.grad(lambda x_, temp=temp: full_kd_loss(x_, l, temperature=temp).sum())(x)
        np.testing.assert_allclose(g, (p - t) / temp, atol=1e-6)
        scaled = functools.partial(full_kd_loss, temperature=temp, scale_by_temperature_squared=True)
        g2 = jax.grad(lambda x_, scaled=scaled: scaled(x_, l).sum())(x)
        np.testing.assert_allclose(g2, temp * (p - t), atol=1e-6)


def test_sparse_kd_gradient_is_p_sum_w_minus_scattered_w():
    x, _, ids, w = _inputs()
    ids[0, 0, 1] = ids[0, 0, 0]  # a duplicated id adds up
    w[1, 2, 3] = 0.0  # an empty slot
    g = jax.grad(lambda x_: sparse_kd_loss(x_, ids, w).sum())(x)
    p = np.exp(np_log_softmax(x))
    scattered = np.zeros_like(p)
    for pos in np.ndindex(ids.shape[:-1]):
        np.add.at(scattered[pos], ids[pos], w[pos])
    np.testing.assert_allclose(g, p * w.sum(-1, keepdims=True) - scattered, atol=1e-6)


def test_ghost_kd_gradient():
    # dL/dx_j = p_j - t_j on the kept ids, p_j - r p_j / (1 - sum_K p) elsewhere.
    x, l, ids, _ = _inputs()
    t = np.exp(np_log_softmax(l))
    probs = np.take_along_axis(t, ids, -1)
    tail = 1.0 - probs.sum(-1)
    g = jax.grad(lambda x_: ghost_kd_loss(x_, ids, probs, tail).sum())(x)
    p = np.exp(np_log_softmax(x))
    kept = np.zeros(p.shape, bool)
    np.put_along_axis(kept, ids, True, -1)
    rest = 1 - np.where(kept, p, 0).sum(-1, keepdims=True)
    target = np.where(kept, t, tail[..., None] * p / rest)
    np.testing.assert_allclose(g, p - target, atol=1e-6)


def test_cross_entropy_and_z_loss_gradients():
    x, _, ids, _ = _inputs()
    labels = ids[..., 0]
    p = np.exp(np_log_softmax(x))
    g = jax.grad(lambda x_: cross_entropy(x_, labels).sum())(x)
    np.testing.assert_allclose(g, p - np.eye(x.shape[-1])[labels], atol=1e-6)
    lse = np.log(np.exp(x.astype(np.float64)).sum(-1, keepdims=True))
    g = jax.grad(lambda x_: z_loss(x_).sum())(x)
    np.testing.assert_allclose(g, 2 * lse * p, rtol=1e-5, atol=1e-6)


def test_docstring_examples():
    result = doctest.testmod(losses, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ losses from hidden states


def _hidden_inputs(b=2, l=7, d=5, v=13, k=4, dtype=jnp.float32, seed=1):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(b, l, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)), dtype)
    ids = np.stack([rng.choice(v, k, replace=False) for _ in range(b * l)]).reshape(b, l, k)
    wt = rng.dirichlet(np.ones(k), (b, l)).astype(np.float32)
    wt[..., -1] = 0.0  # an empty slot
    where = rng.uniform(size=(b, l)) < 0.7
    return h, w, jnp.asarray(ids, jnp.int32), jnp.asarray(wt), jnp.asarray(where)


def _ref_logits(h, w):
    return jnp.einsum("bld,dv->blv", h, w, preferred_element_type=jnp.float32)


def _dense_to_ragged(ids, wt):
    """Per-position slots -> flat entries (position b * L + l, id, weight), empty slots dropped."""
    ids, wt = np.asarray(ids), np.asarray(wt)
    b, l, k = ids.shape
    keep = wt != 0
    pos = np.broadcast_to(np.arange(b * l).reshape(b, l, 1), (b, l, k))
    return jnp.asarray(pos[keep]), jnp.asarray(ids[keep]), jnp.asarray(wt[keep])


def _value_and_grads(fn, h, w):
    """(loss [B, L], d/dh and d/dw of a weighted sum, so every position's gradient counts)."""
    coef = jnp.asarray(np.random.default_rng(7).uniform(0.5, 1.5, h.shape[:2]), jnp.float32)
    _, grads = jax.value_and_grad(lambda h_, w_: jnp.sum(coef * fn(h_, w_)), argnums=(0, 1))(h, w)
    return fn(h, w), grads


# 3 does not divide L = 7; 16 > L. test-fast keeps float32 at 3 and bfloat16 at 16.
@pytest.mark.parametrize(
    "chunk,dtype",
    [
        (c, d) if (c, d) in {(3, jnp.float32), (16, jnp.bfloat16)} else pytest.param(c, d, marks=pytest.mark.slow)
        for d in (jnp.float32, jnp.bfloat16)
        for c in (0, 1, 3, 7, 16)
    ],
)
def test_sparse_kd_from_hidden_equals_logits_loss(chunk, dtype):
    h, w, ids, wt, where = _hidden_inputs(dtype=dtype)
    ref = lambda h_, w_: sparse_kd_loss(_ref_logits(h_, w_), ids, wt, where=where)
    got = lambda h_, w_: sparse_kd_loss_from_hidden(h_, w_, ids, wt, chunk_size=chunk, where=where)
    (l0, g0), (l1, g1) = _value_and_grads(ref, h, w), _value_and_grads(got, h, w)
    assert l1.shape == h.shape[:2] and l1.dtype == jnp.float32
    assert float(jnp.abs(l1 * ~where).max()) == 0.0  # masked positions give exactly 0
    np.testing.assert_allclose(l1, l0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        assert a.dtype == dtype
        # bf16: both are bfloat16 roundings of float32 gradients summed in another order
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol)
    if dtype == jnp.float32:  # and against a float64 numpy reference of the value
        x = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
        np.testing.assert_allclose(l1, np_sparse_kd(x, np.asarray(ids), wt) * where, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 2, 5])
def test_cross_entropy_from_hidden_equals_logits_loss(chunk):
    h, w, _, _, where = _hidden_inputs()
    labels = jnp.asarray(np.random.default_rng(3).integers(0, w.shape[1], h.shape[:2]))
    ref = lambda h_, w_: cross_entropy(_ref_logits(h_, w_), labels, where=where)
    got = lambda h_, w_: cross_entropy_from_hidden(h_, w_, labels, chunk_size=chunk, where=where)
    (l0, g0), (l1, g1) = _value_and_grads(ref, h, w), _value_and_grads(got, h, w)
    np.testing.assert_allclose(l1, l0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 3])
def test_ragged_entries_equal_dense_slots(chunk):
    h, w, ids, wt, where = _hidden_inputs()
    pos, ids_e, wt_e = _dense_to_ragged(ids, wt)
    # padding entries (weight 0) at arbitrary valid positions and ids change nothing
    pos = jnp.concatenate([pos, jnp.array([0, 5, 13])])
    ids_e = jnp.concatenate([ids_e, jnp.array([12, 0, 3])])
    wt_e = jnp.concatenate([wt_e, jnp.zeros(3)])
    perm = np.random.default_rng(5).permutation(pos.shape[0])  # any entry order
    pos, ids_e, wt_e = pos[perm], ids_e[perm], wt_e[perm]
    ref = lambda h_, w_: sparse_kd_loss(_ref_logits(h_, w_), ids, wt, where=where)
    got = lambda h_, w_: sparse_kd_loss_from_hidden_ragged(h_, w_, pos, ids_e, wt_e, chunk_size=chunk, where=where)
    (l0, g0), (l1, g1) = _value_and_grads(ref, h, w), _value_and_grads(got, h, w)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_from_hidden_detects_a_wrong_target():
    """The equality tests can fail: moving one entry's weight to another id changes the loss."""
    h, w, ids, wt, _ = _hidden_inputs()
    base = sparse_kd_loss_from_hidden(h, w, ids, wt, chunk_size=3)
    moved = ids.at[0, 0, 0].set((ids[0, 0, 0] + 1) % w.shape[1])
    other = sparse_kd_loss_from_hidden(h, w, moved, wt, chunk_size=3)
    assert abs(float(other[0, 0] - base[0, 0])) > 1e-3
    np.testing.assert_array_equal(other[1:], base[1:])


def test_chunked_loss_never_holds_full_logits():
    """Memory: the chunked loss's compiled temporaries stay far below B * L * V floats."""
    b, l, d, v = 2, 512, 16, 4096
    h = jax.ShapeDtypeStruct((b, l, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    ids = jax.ShapeDtypeStruct((b, l, 4), jnp.int32)
    wt = jax.ShapeDtypeStruct((b, l, 4), jnp.float32)

    def temp_bytes(chunk):
        f = jax.grad(
            lambda h_, w_, i, t: sparse_kd_loss_from_hidden(h_, w_, i, t, chunk_size=chunk).sum(), argnums=(0, 1)
        )
        return jax.jit(f).lower(h, w, ids, wt).compile().memory_analysis().temp_size_in_bytes

    full = b * l * v * 4
    assert temp_bytes(0) >= full
    assert temp_bytes(32) < full / 4


def test_map_logit_chunks_applies_the_final_softcap():
    """Gemma 2's final soft-cap in the chunked path equals cap * tanh(h @ w / cap) on whole rows."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 7, 4)) * 3, jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 11)) * 3, jnp.float32)
    want = 5.0 * np.tanh(np.einsum("bld,dv->blv", np.asarray(h), np.asarray(w)) / 5.0)
    for chunk in (0, 3):
        got = losses.map_logit_chunks(lambda x, _: x, h, w, chunk_size=chunk, softcap=5.0)
        got = np.moveaxis(np.asarray(got), 0, 1).reshape(2, -1, 11)[:, :7]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.abs(got).max() <= 5.0 < np.abs(np.asarray(h) @ np.asarray(w)).max()
