"""GGUF (llama.cpp) import: metadata -> HF config dict, tensors -> HF-named float32 numpy.

Every tensor is dequantized to float32 with `gguf.quants.dequantize` (so a Q4_1 file gives
exactly the weights llama.cpp and transformers' GGUF loader compute with). llama.cpp stores
attn_q / attn_k rows permuted for its interleaved RoPE; `unpermute_qk` undoes that so the
rotate-half RoPE of the model applies. Architectures: llama (Llama 2/3.x, SmolLM2; a
Llama 3.1+ `rope_freqs` tensor becomes its llama3 rope_scaling), qwen2, qwen3.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from rskd_jax.models.hf import config_from_hf, model_from_hf_tensors, source_fingerprint
from rskd_jax.models.llama import Llama

_GGUF_TO_HF = {  # per-layer GGUF name -> HF name
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",  # qwen2
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_GLOBAL_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_qk(w_OxI: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows (head, E/2, 2) -> (head, 2, E/2)."""
    o = w_OxI.shape[0]
    e = o // num_heads
    return w_OxI.reshape(num_heads, e // 2, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _reader(path):
    import gguf

    class Reader(gguf.GGUFReader):
        # PERF: GGUFReader parses ~100k tokenizer strings by slicing an np.memmap, whose
        # Python-level subclass hooks dominate (6.5 s for SmolLM2). The same mapping viewed
        # as a plain ndarray parses identically in ~1.3 s.
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)

    return Reader(str(path))


# GGUF architecture -> (HF architecture, q/k rows permuted by llama.cpp's converter). Qwen
# models use llama.cpp's NEOX RoPE, which is HF's rotate-half: their rows are stored as is.
GGUF_ARCHS = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}


def llama3_from_rope_freqs(rope_freqs: np.ndarray, head_dim: int, theta: float) -> dict:
    """The llama3 rope_scaling whose per-frequency divisors are `rope_freqs` (what
    convert_hf_to_gguf.py writes for Llama 3.1+). Searched over the factor (the largest
    divisor) and a grid of low/high frequency factors and original context lengths; an
    exact match or a ValueError naming rope_freqs."""
    from rskd_jax.models.rope import rope_inv_freq

    base, _ = rope_inv_freq(head_dim, theta)
    want = base / rope_freqs.astype(np.float32)
    # (old, low, high) and (c old, c low, c high) give the same frequencies: prefer low = 1.
    for low in (1.0, 0.5, 2.0):
        for high in (4.0, 2.0, 8.0):
            for old in (2**k for k in range(4, 21)):
                cand = {
                    "rope_type": "llama3",
                    "factor": float(rope_freqs.max()),
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": old,
                }
                if np.allclose(rope_inv_freq(head_dim, theta, cand)[0], want, rtol=1e-5, atol=0):
                    return cand
    raise ValueError("GGUF rope_freqs do not match a llama3 RoPE scaling; other frequency factors are not implemented")


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF config dict, HF-named float32 tensors) from a llama, qwen2 or qwen3 GGUF file."""
    import gguf

    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only {sorted(GGUF_ARCHS)})")
    hf_arch, permuted = GGUF_ARCHS[arch]

    def meta(key, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    names = {t.name for t in reader.tensors}
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"{path}: GGUF RoPE scaling {scaling!r} is not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rot_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rot_dim != head_dim:
        raise ValueError(
            f"{path}: partial RoPE (rope.dimension_count {rot_dim} != head dim {head_dim}) is not supported"
        )
    hf = dict(
        architectures=[hf_arch],
        model_type=arch,
        vocab_size=len(tokens.data) if tokens is not None else int(meta("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
    )

    tensors = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name == "rope_freqs.weight":
            try:
                hf["rope_scaling"] = llama3_from_rope_freqs(w, head_dim, hf["rope_theta"])
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            continue
        if t.name in _GLOBAL_TO_HF:
            tensors[_GLOBAL_TO_HF[t.name]] = w
            continue
        parts = t.name.split(".", 2)  # blk, i, rest
        if parts[0] != "blk" or len(parts) != 3 or parts[2] not in _GGUF_TO_HF:
            raise ValueError(f"{path}: unexpected GGUF tensor {t.name!r}")
        if permuted and parts[2] == "attn_q.weight":
            w = unpermute_qk(w, hf["num_attention_heads"])
        elif permuted and parts[2] == "attn_k.weight":
            w = unpermute_qk(w, hf["num_key_value_heads"])
        tensors[f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}"] = w
    return hf, tensors


def load_gguf(path: str | os.PathLike, *, mesh=None, **overrides) -> Llama:
    """A Llama from a GGUF file; overrides: LlamaConfig fields (dtype, param_dtype, remat).

    mesh: place each parameter straight into its sharding (models.hf.model_from_hf_tensors);
    the dequantised tensors are in host memory either way."""
    hf, tensors = read_gguf(path)
    config = config_from_hf(hf, **overrides)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return model_from_hf_tensors(config, tensors, source_fingerprint(h.hexdigest(), config), mesh)
