"""Attention implementations agree on CPU: the chunked path and jax.nn.dot_product_attention
("xla"), with causal, sliding-window (static and traced) masks and GQA; model.attention."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rskd_jax.models import LlamaConfig, init_model
from rskd_jax.models.attention import causal_attention, resolve_attention, xla_attention

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


def test_resolve_attention(caplog):
    assert resolve_attention("auto", backend="cpu") == "chunked"
    assert resolve_attention("auto", backend="gpu") == "xla"
    assert resolve_attention("chunked", backend="gpu") == "chunked"
    with caplog.at_level(logging.WARNING, logger="rskd_jax.models.attention"):
        assert resolve_attention("xla", softcap=50.0) == "chunked"
    assert "soft-capping" in caplog.text
    with pytest.raises(ValueError, match="splash"):
        resolve_attention("splash")
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
        MIXED.replace(layer_types=None, rope_local_theta=None, qk_norm=False),  # Mistral-like
        MIXED.replace(sliding_window=None, layer_types=None, rope_local_theta=None),  # plain
    ],
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
        ModelSpec(attention="splash")
