"""The Flax Llama: shapes, causality, an independent numpy reference, remat, dtypes, metadata."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rskd_jax.models import Llama, LlamaConfig, init_model, model_fingerprint
from rskd_jax.models.llama import causal_attention

TINY = LlamaConfig(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_layers=3,
    num_heads=6,
    num_kv_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
)
# One jitted forward for all tests: eager mode would compile every primitive separately.
forward = nnx.jit(lambda model, tokens: model(tokens))
hidden_states = nnx.jit(lambda model, tokens: model.hidden_states(tokens))
LOGICAL_NAMES = {"layers", "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm"}


def _tokens(b, l, v=TINY.vocab_size, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, v, (b, l)), jnp.int32)


def _randomize(model: Llama, seed=0, scale=0.2) -> Llama:
    """Give every parameter (norm scales and biases too) O(1)-effect random values."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            x = np.asarray(var[...])
            base = 1.0 if "norm" in str(path[-1]) else 0.0
            var.set_value(jnp.asarray(base + scale * rng.standard_normal(x.shape), x.dtype))
    return model


@pytest.fixture(scope="module")
def tiny():
    return _randomize(init_model(TINY, seed=0))


def _numpy_reference(model: Llama, tokens: np.ndarray) -> np.ndarray:
    """An unrolled float64 numpy forward, written from the HF Llama definition."""
    c = model.config
    p = {k: np.asarray(v, np.float64) for k, v in model.layers.weights().items()}
    h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
    b, l = tokens.shape

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.rms_norm_eps) * w

    def rope(x):  # x [B, L, heads, E], rotate-half
        inv = 1.0 / c.rope_theta ** (np.arange(0, e, 2) / e)
        ang = np.arange(l)[:, None] * inv[None]
        cos = np.concatenate([np.cos(ang)] * 2, -1)[None, :, None]
        sin = np.concatenate([np.sin(ang)] * 2, -1)[None, :, None]
        rot = np.concatenate([-x[..., e // 2 :], x[..., : e // 2]], -1)
        return x * cos + rot * sin

    x = np.asarray(model.embed[...], np.float64)[tokens]
    for i in range(c.num_layers):
        y = norm(x, p["attn_norm"][i])
        q = rope(np.einsum("bld,od->blo", y, p["q_proj"][i].reshape(h * e, -1)).reshape(b, l, h, e))
        kk = rope(np.einsum("bld,od->blo", y, p["k_proj"][i].reshape(k * e, -1)).reshape(b, l, k, e))
        v = np.einsum("bld,od->blo", y, p["v_proj"][i].reshape(k * e, -1)).reshape(b, l, k, e)
        kk, v = np.repeat(kk, h // k, axis=2), np.repeat(v, h // k, axis=2)
        s = np.einsum("blhe,bmhe->bhlm", q, kk) / np.sqrt(e)
        s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("bhlm,bmhe->blhe", a, v).reshape(b, l, h * e)
        x = x + o @ p["o_proj"][i].reshape(-1, h * e).T
        y = norm(x, p["mlp_norm"][i])
        gate, up = y @ p["gate_proj"][i].T, y @ p["up_proj"][i].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p["down_proj"][i].T
    x = norm(x, np.asarray(model.final_norm[...], np.float64))
    return x @ np.asarray(model.lm_head_weight(), np.float64)


def test_shapes_and_dtypes(tiny):
    tokens = _tokens(2, 10)
    logits = forward(tiny, tokens)
    assert logits.shape == (2, 10, TINY.vocab_size) and logits.dtype == jnp.float32
    hidden = hidden_states(tiny, tokens)
    assert hidden.shape == (2, 10, TINY.hidden_size) and hidden.dtype == jnp.float32
    assert tiny.lm_head_weight().shape == (TINY.hidden_size, TINY.vocab_size)
    np.testing.assert_allclose(hidden @ tiny.lm_head_weight(), logits, rtol=1e-5, atol=1e-5)


def test_scan_matches_unrolled_numpy_reference(tiny):
    # L = 80 > the 64-row attention chunk, so the chunked causal path (and its tail) is covered.
    tokens = _tokens(2, 80, seed=1)
    want = _numpy_reference(tiny, np.asarray(tokens))
    got = np.asarray(forward(tiny, tokens))
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def _dense_attention(q, k, v, window=None, softcap=None):
    """numpy reference: [B, KV, L, G, E] queries (pre-scaled), one masked [L, L] block."""
    l = q.shape[2]
    s = np.einsum("bklge,bkme->bkglm", q, k)
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    i, m = np.arange(l)[:, None], np.arange(l)[None, :]
    visible = (m <= i) & ((i - m < window) if window is not None else True)
    s = np.where(visible, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bkglm,bkme->bklge", a / a.sum(-1, keepdims=True), v)


@pytest.mark.parametrize(
    "chunk, window, softcap",
    [(3, None, None), (16, None, None), (64, None, None), (3, 5, None), (16, 16, 2.0), (64, 40, None)],
)
def test_causal_attention_chunks_match_dense(chunk, window, softcap):
    b, kh, l, g, e = 2, 2, 37, 3, 8
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, kh, l, g, e)).astype(np.float32)
    k = rng.standard_normal((b, kh, l, e)).astype(np.float32)
    v = rng.standard_normal((b, kh, l, e)).astype(np.float32)
    want = _dense_attention(q, k, v, window, softcap)
    attend = jax.jit(causal_attention, static_argnames=("chunk", "window", "softcap"))
    got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk=chunk, window=window, softcap=softcap)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if window is not None:  # a traced window (mixed layer kinds in one scan) masks the same
        traced = jax.jit(lambda q, k, v, w: causal_attention(q, k, v, chunk, window=w, softcap=softcap))
        got = traced(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(window))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_causal_mask(tiny):
    tokens = _tokens(1, 70, seed=2)
    changed = tokens.at[0, 50].set((tokens[0, 50] + 1) % TINY.vocab_size)
    a, b = np.asarray(forward(tiny, tokens)), np.asarray(forward(tiny, changed))
    np.testing.assert_allclose(a[:, :50], b[:, :50], rtol=0, atol=1e-6)
    assert np.abs(a[:, 50:] - b[:, 50:]).max() > 1e-3


def _loss(model, tokens):
    logp = jax.nn.log_softmax(model(tokens[:, :-1]))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


@pytest.mark.slow
def test_remat_same_logits_and_grads():
    plain = _randomize(init_model(TINY, seed=3))
    remat = nnx.merge(nnx.graphdef(init_model(TINY.replace(remat=True), seed=3)), nnx.state(plain))
    assert remat.config.remat
    tokens = _tokens(2, 12, seed=3)
    np.testing.assert_allclose(forward(plain, tokens), forward(remat, tokens), rtol=1e-6, atol=1e-6)
    grad = nnx.jit(nnx.grad(_loss))
    g_plain, g_remat = nnx.state(grad(plain, tokens)), nnx.state(grad(remat, tokens))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_plain, g_remat)
    assert float(jnp.abs(g_plain["layers"]["q_proj"][...]).max()) > 0


@pytest.mark.slow  # test-fast keeps tests/test_families.py's bfloat16 checks
def test_bfloat16_compute(tiny):
    tokens = _tokens(2, 16, seed=4)
    bf16 = nnx.merge(nnx.graphdef(init_model(TINY.replace(dtype="bfloat16"), 0)), nnx.state(tiny))
    assert hidden_states(bf16, tokens).dtype == jnp.bfloat16
    assert bf16.lm_head_weight().dtype == jnp.bfloat16
    logits, ref = forward(bf16, tokens), forward(tiny, tokens)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert float(jnp.abs(logits - ref).max()) < 0.05 * float(jnp.abs(ref).max())
    stored = init_model(TINY.replace(dtype="bfloat16", param_dtype="bfloat16"), 0)
    assert stored.layers.q_proj[...].dtype == jnp.bfloat16
    assert forward(stored, tokens).dtype == jnp.float32


def test_tied_and_untied():
    untied = init_model(TINY, 0)
    tied = init_model(TINY.replace(tie_embeddings=True), 0)
    assert not hasattr(tied, "lm_head") and hasattr(untied, "lm_head")
    np.testing.assert_array_equal(tied.lm_head_weight(), tied.embed[...].T)
    np.testing.assert_array_equal(untied.lm_head_weight(), untied.lm_head[...].T)
    n = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n(untied) - n(tied) == TINY.vocab_size * TINY.hidden_size
    assert forward(tied, _tokens(1, 4)).shape == (1, 4, TINY.vocab_size)


@pytest.mark.parametrize(
    "changes, extra",
    [
        ({}, 0),
        ({"qkv_bias": True}, 3),
        ({"qk_norm": True, "sandwich_norms": True, "norm_plus_one": True}, 4),  # Gemma 3's params
    ],
)
def test_every_param_has_logical_axis_names(changes, extra):
    model = init_model(TINY.replace(**changes), 0)
    params = list(nnx.iter_graph(model))
    params = [(path, v) for path, v in params if isinstance(v, nnx.Param)]
    assert len(params) == 12 + extra
    for path, var in params:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, path
        assert set(names) <= LOGICAL_NAMES, (path, names)
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["layers"]["q_proj"].get_value()) == ("layers", "heads", "head_dim", "embed")


def test_fingerprint():
    assert model_fingerprint(init_model(TINY, 1)) == init_model(TINY, 1).fingerprint
    assert model_fingerprint(init_model(TINY, 1)) != model_fingerprint(init_model(TINY, 2))
    assert len(model_fingerprint(init_model(TINY, 1))) == 64


def test_config_validation():
    with pytest.raises(ValueError, match="longrope"):
        TINY.replace(rope_scaling={"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(ValueError, match="yarn lacks .*original_max_position_embeddings"):
        TINY.replace(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="sliding_window"):
        TINY.replace(layer_types=("sliding_attention",) * 3)
    with pytest.raises(ValueError, match="chunked_attention"):
        TINY.replace(sliding_window=8, layer_types=("chunked_attention",) * 3)
    with pytest.raises(ValueError, match="2 entries for 3 layers"):
        TINY.replace(sliding_window=8, layer_types=("sliding_attention",) * 2)
    with pytest.raises(ValueError, match="hidden_act"):
        TINY.replace(hidden_act="relu")
    assert TINY.replace(sliding_window=8).layer_types == ("sliding_attention",) * 3
    full = TINY.replace(sliding_window=8, layer_types=("full_attention",) * 3)
    assert full == TINY and full.to_dict() == TINY.to_dict()  # no sliding layer: plain causal
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        TINY.replace(
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        )
    with pytest.raises(ValueError, match="num_kv_heads"):
        TINY.replace(num_kv_heads=4)
    with pytest.raises(ValueError, match="dtype"):
        TINY.replace(dtype="float64")
    assert TINY.replace(rope_scaling={"rope_type": "default"}).rope_scaling is None
    assert hash(
        TINY.replace(
            rope_scaling={
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        )
    )


HF_BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 97,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["Gemma3ForConditionalGeneration"]}, "Gemma3ForConditionalGeneration"),
        ({"architectures": None, "model_type": "gemma"}, "gemma"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "longrope"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "dynamic"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
    ],
)
def test_unsupported_hf_configs_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**HF_BASE, **change})


def test_hf_config_round_trip():
    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    v4 = LlamaConfig.from_hf({**HF_BASE, "rope_theta": 5e5, "rope_scaling": llama3})
    v5 = LlamaConfig.from_hf({**HF_BASE, "rope_parameters": {**llama3, "rope_theta": 5e5}})
    assert v4 == v5 and v4.rope_scaling == llama3 and v4.rope_theta == 5e5
    assert LlamaConfig.from_hf(v4.to_hf()) == v4
    qwen = LlamaConfig.from_hf(
        {**HF_BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False}
    )
    assert qwen.qkv_bias and qwen.to_hf()["architectures"] == ["Qwen2ForCausalLM"]
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        qwen.to_hf("LlamaForCausalLM")
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        v4.to_hf("Qwen2ForCausalLM")
    assert LlamaConfig.from_hf(HF_BASE, dtype="bfloat16").dtype == "bfloat16"
