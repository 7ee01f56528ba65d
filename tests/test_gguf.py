"""GGUF files of each supported architecture, written as llama.cpp's converter writes them
(q/k rows permuted for llama, Llama 3.1's rope_freqs tensor), load to transformers' logits."""

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from rskd_jax.models import from_pretrained  # noqa: E402

forward = nnx.jit(lambda model, tokens: model(tokens))
SHAPE = dict(
    vocab_size=131,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CASES = {  # name: (GGUF arch, HF config class, fields)
    "llama31": ("llama", transformers.LlamaConfig, dict(rope_theta=5e5, rope_scaling=LLAMA3)),
    "qwen2": ("qwen2", transformers.Qwen2Config, dict(rope_theta=1e6)),
    "qwen3": ("qwen3", transformers.Qwen3Config, dict(rope_theta=1e6, head_dim=24)),
}
NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    **{f"attn_{x}.{kind}": f"self_attn.{x}_proj.{kind}" for x in "qkv" for kind in ("weight", "bias")},
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}


def _llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (the layout llama.cpp stores q/k in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_factors(scaling, theta, dim):
    """convert_hf_to_gguf.py's LlamaModel rope_freqs: the llama3 divisor per frequency."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high = (
        scaling["original_max_position_embeddings"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
    )
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(scaling["factor"])
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.asarray(out, np.float32)


def write_gguf(name, path):
    """A random HF model of case `name` and the same weights as a GGUF file at `path`."""
    arch, cls, fields = CASES[name]
    torch.manual_seed(2)
    config = cls(**SHAPE, **copy.deepcopy(fields), tie_word_embeddings=False)  # HF edits dicts
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in pname else 0.0))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    head_dim = fields.get("head_dim", SHAPE["hidden_size"] // SHAPE["num_attention_heads"])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(SHAPE["num_hidden_layers"])
    w.add_context_length(256)
    w.add_embedding_length(SHAPE["hidden_size"])
    w.add_feed_forward_length(SHAPE["intermediate_size"])
    w.add_head_count(SHAPE["num_attention_heads"])
    w.add_head_count_kv(SHAPE["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(fields["rope_theta"])
    w.add_layer_norm_rms_eps(SHAPE["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(SHAPE["vocab_size"])])
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    if fields.get("rope_scaling"):
        w.add_tensor("rope_freqs.weight", _rope_factors(fields["rope_scaling"], fields["rope_theta"], head_dim))
    for i in range(SHAPE["num_hidden_layers"]):
        for ours, theirs in NAMES.items():
            t = sd.get(f"model.layers.{i}.{theirs}")
            if t is None:
                continue
            if arch == "llama" and ours in ("attn_q.weight", "attn_k.weight"):
                t = _llama_cpp_permute(
                    t, SHAPE["num_attention_heads"] if ours == "attn_q.weight" else SHAPE["num_key_value_heads"]
                )
            w.add_tensor(f"blk.{i}.{ours}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


@pytest.mark.parametrize("name", list(CASES))
def test_gguf_matches_transformers(name, tmp_path):
    ref = write_gguf(name, tmp_path / f"{name}.gguf")
    model = from_pretrained(tmp_path / f"{name}.gguf")
    tokens = np.random.default_rng(3).integers(0, SHAPE["vocab_size"], (2, 80))
    with torch.inference_mode():
        want = ref(torch.from_numpy(tokens)).logits.float().numpy()
    got = np.asarray(forward(model, jnp.asarray(tokens, jnp.int32)))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    if name == "llama31":
        assert model.config.rope_scaling == LLAMA3


def test_unknown_rope_freqs_are_refused():
    from rskd_jax.models.gguf import llama3_from_rope_freqs

    factors = np.linspace(1.0, 3.0, 8).astype(np.float32)
    with pytest.raises(ValueError, match="rope_freqs"):
        llama3_from_rope_freqs(factors, 16, 1e4)
