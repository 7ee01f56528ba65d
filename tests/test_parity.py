"""Parity with transformers: tiny random HF models (safetensors, sharded, GGUF), our HF export,
and the real SmolLM2-135M GGUF against transformers' own GGUF loader."""

import os
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rskd_jax.models import from_pretrained, model_fingerprint, save_pretrained  # noqa: E402
from rskd_jax.models.gguf import unpermute_qk  # noqa: E402

forward = nnx.jit(lambda model, tokens: model(tokens))
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
SHAPE = dict(
    vocab_size=131,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
CASES = {
    "llama_tied_gqa_llama3": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_scaling=LLAMA3)),
    "llama_untied_head_dim": (transformers.LlamaConfig, dict(tie_word_embeddings=False, head_dim=24, rope_theta=5e4)),
    "qwen2_bias": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
}


def _tokens(b=2, l=80, v=SHAPE["vocab_size"], seed=0):
    return np.random.default_rng(seed).integers(0, v, (b, l))


def _hf_logits(model, tokens):
    with torch.inference_mode():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def _ours(model, tokens):
    return np.asarray(forward(model, jnp.asarray(tokens, jnp.int32)))


@pytest.fixture(scope="module", params=list(CASES))
def hf_model(request, tmp_path_factory):
    """(transformers model with O(1) random weights, its safetensors dir, a sharded copy)."""
    cls, kw = CASES[request.param]
    torch.manual_seed(0)
    config = cls(**SHAPE, **kw)
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # HF init is N(0, 0.02) with unit norms, zero biases: too tame
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    plain = tmp_path_factory.mktemp(request.param)
    sharded = tmp_path_factory.mktemp(request.param + "_sharded")
    model.save_pretrained(plain)
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    return model, plain, sharded


def test_safetensors_parity(hf_model):
    ref, plain, sharded = hf_model
    tokens = _tokens()
    want = _hf_logits(ref, tokens)
    assert np.abs(want).max() > 1.0  # the comparison is not trivially small numbers
    ours = from_pretrained(plain)
    np.testing.assert_allclose(_ours(ours, tokens), want, rtol=0, atol=1e-4)
    ours_sharded = from_pretrained(sharded)
    np.testing.assert_array_equal(_ours(ours_sharded, tokens), _ours(ours, tokens))
    assert model_fingerprint(ours) == model_fingerprint(from_pretrained(plain))
    assert model_fingerprint(ours) != model_fingerprint(ours_sharded)


def test_export_round_trip(hf_model, tmp_path):
    _, plain, _ = hf_model
    ours = from_pretrained(plain)
    tokens = _tokens(seed=1)
    logits = _ours(ours, tokens)
    save_pretrained(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back).__name__ == ours.config.to_hf()["architectures"][0]
    np.testing.assert_allclose(_hf_logits(back, tokens), logits, rtol=0, atol=1e-4)
    reloaded = from_pretrained(tmp_path)
    assert reloaded.config == ours.config
    np.testing.assert_array_equal(_ours(reloaded, tokens), logits)


def test_dtype_overrides(hf_model):
    _, plain, _ = hf_model
    m = from_pretrained(plain, dtype="bfloat16", param_dtype="bfloat16", remat=True)
    assert (m.config.dtype, m.config.param_dtype, m.config.remat) == ("bfloat16", "bfloat16", True)
    assert m.embed[...].dtype == jnp.bfloat16


def _llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (the layout llama.cpp stores q/k in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_qk_inverts_llama_cpp():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
    np.testing.assert_array_equal(unpermute_qk(_llama_cpp_permute(w, 4), 4), w)
    assert not np.array_equal(_llama_cpp_permute(w, 4), w)


def test_tiny_gguf_parity(tmp_path):
    """A tiny Llama written as a llama.cpp-style GGUF (permuted q/k) loads to the HF logits."""
    import gguf

    torch.manual_seed(1)
    config = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False, rope_theta=1e4, rms_norm_eps=1e-5)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(3)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(1e4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(SHAPE["vocab_size"])])
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(3):
        for ours, theirs in names.items():
            t = sd[f"model.layers.{i}.{theirs}.weight"]
            if ours in ("attn_q", "attn_k"):
                t = _llama_cpp_permute(t, 4 if ours == "attn_q" else 2)
            w.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    model = from_pretrained(path)
    assert not model.config.tie_embeddings and model.config.vocab_size == SHAPE["vocab_size"]
    tokens = _tokens(seed=2)
    np.testing.assert_allclose(_ours(model, tokens), _hf_logits(ref, tokens), rtol=0, atol=1e-4)


def test_missing_and_unexpected_tensors(hf_model, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, plain, _ = hf_model
    tensors = load_file(plain / "model.safetensors")
    (tmp_path / "config.json").write_text((plain / "config.json").read_text())
    save_file(
        {**tensors, "model.layers.0.mlp.gate_proj.bias": np.zeros(96, np.float32)}, tmp_path / "model.safetensors"
    )
    with pytest.raises(ValueError, match="gate_proj.bias"):
        from_pretrained(tmp_path)
    tensors.pop("model.norm.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight"):
        from_pretrained(tmp_path)


# ------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    """(our model, transformers' model from the same GGUF, 160 tokens of stdlib source)."""
    from rskd_jax.models import smollm2_path

    try:
        path = smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    folder, name = os.path.split(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text = open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")).read()[:4000]
    ids = np.asarray([tokenizer(text)["input_ids"][:160]])
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return from_pretrained(path), ref, ids


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2):
    ours, ref, ids = smollm2
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and c.rope_theta == 1e5
    assert ids.shape[1] >= 64
    want = _hf_logits(ref, ids)
    got = _ours(ours, ids)
    assert np.abs(got - want).max() <= 1e-3
    # And it is a sensible LM on Python source (stdlib perplexity is ~6, DATA.md).
    logp = np.asarray(jax.nn.log_softmax(got[0, :-1]))
    nll = -np.mean(np.take_along_axis(logp, ids[0, 1:, None], -1))
    assert nll < 3.0
