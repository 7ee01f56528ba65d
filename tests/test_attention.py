"""Attention implementations agree on CPU: the chunked path, jax.nn.dot_product_attention
("xla"; cudnn's traced-window lax.cond) and Pallas splash attention (interpreted), with
causal, sliding-window (static and traced) masks, soft-capping and GQA; the fallback choice
(choose_attention) as a pure function; model.attention."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rskd_jax.documents import segments_and_positions
from rskd_jax.models import LlamaConfig, init_model
from rskd_jax.models import attention as attention_module
from rskd_jax.models.attention import (
    ATTENTION_KINDS,
    causal_attention,
    choose_attention,
    dot_product_attention,
    resolve_attention,
    splash_attention,
    xla_attention,
)

forward = nnx.jit(lambda model, tokens: model(tokens))


def _qkv(b=2, kh=2, l=45, g=3, e=8, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal((b, kh, l, g, e)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, kh, l, e)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, kh, l, e)), jnp.float32),
    )


@pytest.mark.parametrize("window", [None, 1, 7, 100])
def test_xla_matches_chunked(window):
    q, k, v = _qkv()
    chunked = jax.jit(lambda q, k, v: causal_attention(q, k, v, 16, window=window))(q, k, v)
    xla = jax.jit(lambda q, k, v: xla_attention(q, k, v, window=window))(q, k, v)
    np.testing.assert_allclose(xla, chunked, rtol=1e-5, atol=1e-5)
    if window is not None:  # traced window: a mask instead of local_window_size
        traced = jax.jit(lambda q, k, v, w: xla_attention(q, k, v, window=w))
        np.testing.assert_allclose(traced(q, k, v, jnp.int32(window)), chunked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kind, backend, dtype, softcap, length, want, reason",
    [
        ("auto", "cpu", "float32", False, None, "chunked", None),
        ("auto", "cpu", "bfloat16", True, None, "chunked", None),
        ("auto", "gpu", "bfloat16", False, None, "cudnn", None),
        ("auto", "gpu", "float16", False, 512, "cudnn", None),
        ("auto", "gpu", "float32", False, None, "xla", "needs bfloat16 or float16, not float32"),
        ("auto", "gpu", "bfloat16", True, None, "chunked", "no attention logit soft-capping"),
        ("auto", "tpu", "float32", True, 256, "splash", None),
        ("auto", "tpu", "bfloat16", False, 100, "xla", "multiple of 128, not 100"),
        ("cudnn", "gpu", "bfloat16", False, 4096, "cudnn", None),
        ("cudnn", "cpu", "bfloat16", False, None, "xla", "GPU only, not cpu"),
        ("cudnn", "tpu", "float32", True, None, "chunked", "GPU only, not tpu"),
        ("splash", "tpu", "bfloat16", True, 512, "splash", None),
        ("splash", "cpu", "float32", False, 512, "chunked", "TPU only, not cpu"),
        ("splash", "gpu", "bfloat16", False, 512, "cudnn", "TPU only, not gpu"),
        ("splash", "gpu", "float32", True, 512, "chunked", "TPU only, not gpu"),
        ("xla", "gpu", "bfloat16", False, None, "xla", None),
        ("xla", "tpu", "float32", True, None, "chunked", "soft-capping is not supported"),
        ("chunked", "gpu", "bfloat16", True, None, "chunked", None),
    ],
)
def test_choose_attention(kind, backend, dtype, softcap, length, want, reason):
    impl, why = choose_attention(kind, backend=backend, dtype=dtype, softcap=softcap, length=length)
    assert impl == want
    assert (why is None) if reason is None else (reason in why)


def test_resolve_attention_logs_each_reason_once(caplog):
    attention_module._LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="rskd_jax.models.attention"):
        for _ in range(3):
            assert resolve_attention("xla", softcap=50.0, backend="cpu") == "chunked"
            assert resolve_attention("splash", backend="cpu") == "chunked"
        assert resolve_attention("chunked", backend="cpu") == "chunked"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "soft-capping" in messages[0] and "using the chunked path" in messages[0]
    assert "TPU only" in messages[1]
    with pytest.raises(ValueError, match="attention"):
        resolve_attention("flash")
    with pytest.raises(ValueError, match="attention"):
        LlamaConfig(
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            attention="flash",
        )


@pytest.mark.parametrize("window", [None, 7])
def test_dot_product_attention_traced_window_by_cond(window):
    """cudnn's traced-window path (lax.cond between two static kernels), run with jax's default
    implementation (cuDNN itself needs a GPU: tools/gpu_bench.sh)."""
    q, k, v = _qkv()
    chunked = jax.jit(lambda q, k, v: causal_attention(q, k, v, 16, window=window))(q, k, v)
    traced = jax.jit(lambda q, k, v, w: dot_product_attention(q, k, v, window=w, implementation=None, local_window=7))
    w = jnp.int32(window if window is not None else q.shape[2] + 1)
    np.testing.assert_allclose(traced(q, k, v, w), chunked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, softcap, traced", [(None, None, False), (7, 5.0, False), (7, None, True)])
def test_splash_matches_chunked(window, softcap, traced):
    """Pallas splash attention in the interpreter (CPU) against the chunked path; L = 256."""
    q, k, v = _qkv(b=1, kh=2, l=256, g=2, e=16)
    q = q * 0.3
    want = jax.jit(lambda q, k, v: causal_attention(q, k, v, window=window, softcap=softcap))(q, k, v)
    if traced:
        fn = jax.jit(
            lambda q, k, v, w: splash_attention(q, k, v, window=w, softcap=softcap, local_window=7, interpret=True)
        )
        got = fn(q, k, v, jnp.int32(window))
        full = fn(q, k, v, jnp.int32(257))  # a full layer of the same scan
        np.testing.assert_allclose(full, causal_attention(q, k, v), rtol=1e-5, atol=1e-5)
    else:
        got = jax.jit(lambda q, k, v: splash_attention(q, k, v, window=window, softcap=softcap, interpret=True))(
            q, k, v
        )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _segments(b, l, seed=0):
    """int32 [B, L] segment ids: documents of random lengths 1..99, boundaries inside blocks."""
    rng = np.random.default_rng(seed)
    starts = np.zeros((b, l), bool)
    for row in starts:
        ends = np.cumsum(rng.integers(1, 100, l))
        row[ends[ends < l]] = True
    return jnp.asarray(segments_and_positions(starts)[0])


@pytest.mark.parametrize(
    "window, traced",
    [pytest.param(None, False, marks=pytest.mark.slow), pytest.param(7, False, marks=pytest.mark.slow), (7, True)],
)
def test_splash_and_the_cudnn_path_mask_segments_like_chunked(window, traced):
    """Document masking on the accelerator paths: splash's SegmentIds (interpreted) and
    dot_product_attention's same-segment mask (cudnn's code path, jax's default implementation
    here) equal the chunked path with the same segment ids; L = 256, 2 rows, windows static
    and traced (lax.cond between two kernels)."""
    q, k, v = _qkv(b=2, kh=2, l=256, g=2, e=16)
    q = q * 0.3
    seg = _segments(2, 256)
    assert min(len(np.unique(np.asarray(r))) for r in seg) > 3
    want = jax.jit(lambda q, k, v: causal_attention(q, k, v, window=window, segment_ids=seg))(q, k, v)
    unmasked = causal_attention(q, k, v, window=window)
    assert np.abs(np.asarray(want - unmasked)).max() > 0.1  # the segments change the output

    def splash(q, k, v, w):
        return splash_attention(q, k, v, window=w, local_window=7, segment_ids=seg, interpret=True)

    def dpa(q, k, v, w):
        return dot_product_attention(q, k, v, window=w, implementation=None, local_window=7, segment_ids=seg)

    for fn in (splash, dpa):
        if traced:
            got = jax.jit(fn)(q, k, v, jnp.int32(window))
        else:
            got = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, window))(q, k, v)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=fn.__name__)


def test_attention_kinds_are_one_list():
    from rskd_jax import config

    assert config.ATTENTION_KINDS == ATTENTION_KINDS


MIXED = LlamaConfig(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=96,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    sliding_window=12,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    rope_local_theta=1e4,
    rope_theta=1e6,
    qk_norm=True,
)


@pytest.mark.parametrize(
    "config",
    [
        MIXED,  # Gemma 3-like: traced window per layer
        pytest.param(  # Mistral-like
            MIXED.replace(layer_types=None, rope_local_theta=None, qk_norm=False), marks=pytest.mark.slow
        ),
        pytest.param(
            MIXED.replace(sliding_window=None, layer_types=None, rope_local_theta=None), marks=pytest.mark.slow
        ),
    ],  # test-fast keeps the mixed layers (both window kinds in one model)
    ids=["mixed", "all_sliding", "full"],
)
def test_model_attention_paths_agree(config):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (2, 40)), jnp.int32)
    chunked = init_model(config.replace(attention="chunked"), seed=0)
    xla = nnx.merge(nnx.graphdef(init_model(config.replace(attention="xla"), 0)), nnx.state(chunked))
    want = np.asarray(forward(chunked, tokens))
    np.testing.assert_allclose(forward(xla, tokens), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert config.replace(attention="xla").to_dict()["attention"] == "xla"
    assert "attention" not in config.to_dict()  # "auto" keeps the old fingerprint


def test_model_spec_attention_reaches_the_model():
    from rskd_jax.config import ConfigError, ModelSpec
    from rskd_jax.model_spec import build_model

    assert build_model(ModelSpec(attention="xla"), 64).config.attention == "xla"
    assert build_model(ModelSpec(), 64).config.attention == "auto"
    with pytest.raises(ConfigError, match="attention"):
        ModelSpec(attention="flash")
