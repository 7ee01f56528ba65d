"""A Llama-family decoder in Flax NNX (Llama 2/3, SmolLM2, Qwen2).

Shape letters (README's B, L, D, V, H, C, plus): NL layers, KV key/value heads, G = H / KV query
heads per kv head, E head dim, F MLP (intermediate) width, M key positions.

Per-layer weights are stacked along a leading layers axis and run with one `jax.lax.scan`,
so a 30-layer model compiles as fast as a 1-layer one. Parameters (param_dtype) and their
logical axis names (nnx variable metadata `out_sharding`; map them to mesh axes with
`nnx.get_partition_spec` under logical-axis rules):

    embed             [V, D]         ("vocab", "embed")
    layers.attn_norm  [NL, D]        ("layers", "norm")
    layers.q_proj     [NL, H, E, D]  ("layers", "heads", "head_dim", "embed")
    layers.k_proj     [NL, KV, E, D] ("layers", "kv_heads", "head_dim", "embed")
    layers.v_proj     [NL, KV, E, D] ("layers", "kv_heads", "head_dim", "embed")
    layers.q_bias     [NL, H, E]     ("layers", "heads", "head_dim")           qkv_bias only
    layers.k_bias     [NL, KV, E]    ("layers", "kv_heads", "head_dim")        qkv_bias only
    layers.v_bias     [NL, KV, E]    ("layers", "kv_heads", "head_dim")        qkv_bias only
    layers.o_proj     [NL, D, H, E]  ("layers", "embed", "heads", "head_dim")
    layers.mlp_norm   [NL, D]        ("layers", "norm")
    layers.gate_proj  [NL, F, D]     ("layers", "mlp", "embed")
    layers.up_proj    [NL, F, D]     ("layers", "mlp", "embed")
    layers.down_proj  [NL, D, F]     ("layers", "embed", "mlp")
    final_norm        [D]            ("norm",)
    lm_head           [V, D]         ("vocab", "embed")                        untied only

Projection weights keep the Hugging Face / PyTorch [out, in] order (the dots contract the
last axis), so loading and exporting never transpose a matrix.

Logical names used: layers, vocab, embed, norm, heads, kv_heads, head_dim, mlp.
Variables are created with eager_sharding=False: a model can be built without a mesh, and
sharding is applied once, at jit, from these names.

Numerics: matmuls in config.dtype; RMSNorm, RoPE and softmax in float32; logits float32.
RoPE uses the Hugging Face rotate-half convention (pairs (i, i + E/2)).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ROPE_TYPES = ("llama3",)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a Llama-family decoder.

    rope_scaling: None (or {"rope_type": "default"}) or {"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}; other types
    raise. dtype is the compute dtype,
    param_dtype the storage dtype ("float32" / "bfloat16"). remat wraps each layer in
    jax.checkpoint (activations recomputed in the backward pass).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads "
                    f"{self.num_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; use one of {sorted(_DTYPES)}")
        rs = dict(self.rope_scaling or {})
        if rs.get("rope_type", rs.get("type")) == "default":
            object.__setattr__(self, "rope_scaling", None)
        elif self.rope_scaling is not None:
            rope_type = rs.get("rope_type", rs.get("type"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(
                    f"unsupported rope_scaling type {rope_type!r}: only {_ROPE_TYPES} (or None) "
                    "is implemented"
                )
            missing = [k for k in _LLAMA3_KEYS if k not in rs]
            if missing:
                raise ValueError(f"rope_scaling of type llama3 lacks {missing}")
            canon = {"rope_type": "llama3", **{k: rs[k] for k in _LLAMA3_KEYS}}
            object.__setattr__(self, "rope_scaling", canon)

    def __hash__(self):  # rope_scaling is a dict; hash the canonical JSON instead
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "LlamaConfig":
        """From a Hugging Face config.json dict (LlamaForCausalLM or Qwen2ForCausalLM)."""
        from rskd_jax.models.hf import config_from_hf  # noqa: PLC0415 (avoid an import cycle)

        return config_from_hf(hf, **overrides)

    def to_hf(self, arch: str | None = None) -> dict:
        """To a Hugging Face config.json dict; arch defaults by qkv_bias (Qwen2 / Llama)."""
        from rskd_jax.models.hf import config_to_hf  # noqa: PLC0415

        return config_to_hf(self, arch)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [E/2] float32, computed as transformers does (incl. llama3 scaling)."""
    e = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, e, 2, dtype=np.float32) / e))
    inv_freq = inv_freq.astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) * scale, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on the last axis: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), where x1, x2
    are the two halves of x and cos/sin [..., E/2] broadcast against them. float32 inside."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_chunk(length: int) -> int:
    """Query-chunk size for causal attention: 64, or L/16 for long sequences (<= 16 chunks)."""
    return max(64, -(-length // 16))


def causal_attention(q_BxKVxLxGxE: jax.Array, k_BxKVxLxE: jax.Array, v_BxKVxLxE: jax.Array,
                     chunk: int | None = None) -> jax.Array:
    """Exact causal grouped-query attention, o[..., i, :] = softmax(q_i k_{<=i}^T) v_{<=i}.

    q is already scaled by E^-1/2; query head (kv, g) reads kv head kv. Returns [B, KV, L, G, E].
    Scores and softmax are float32; the probabilities are cast back to q's dtype for the PV dot.

    PERF: queries are processed in chunks of `chunk` rows and chunk i only scores the keys
    0..end_i, which skips the masked upper triangle (~40% of the score work at L=512) and
    keeps each score block cache-sized. The G query heads sharing a kv head are folded into
    the rows of one matmul per (batch, kv head), with no copy of k/v per query head. On 2 CPU
    cores this is ~5x faster than one masked [L, L] block per head.
    """
    b, kh, l, g, e = q_BxKVxLxGxE.shape
    chunk = chunk or attention_chunk(l)
    outs = []
    for start in range(0, l, chunk):  # static, unrolled: L / chunk blocks
        stop = min(start + chunk, l)
        c = stop - start
        q_BxKVxCGxE = q_BxKVxLxGxE[:, :, start:stop].reshape(b, kh, c * g, e)
        s_BxKVxCGxM = jnp.einsum("bkqe,bkme->bkqm", q_BxKVxCGxE, k_BxKVxLxE[:, :, :stop],
                                preferred_element_type=jnp.float32)
        s_BxKVxCxGxM = s_BxKVxCGxM.reshape(b, kh, c, g, stop)
        causal_CxM = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]
        s_BxKVxCxGxM = jnp.where(causal_CxM[:, None, :], s_BxKVxCxGxM, jnp.finfo(jnp.float32).min)
        p_BxKVxCGxM = jax.nn.softmax(s_BxKVxCxGxM, axis=-1).astype(q_BxKVxLxGxE.dtype)
        o_BxKVxCGxE = jnp.einsum("bkqm,bkme->bkqe", p_BxKVxCGxM.reshape(b, kh, c * g, stop),
                                v_BxKVxLxE[:, :, :stop])
        outs.append(o_BxKVxCGxE.reshape(b, kh, c, g, e))
    return jnp.concatenate(outs, axis=2)


def _param(value, names) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class LlamaLayers(nnx.Module):
    """The N decoder layers, weights stacked along a leading "layers" axis."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        n, d, h, k, e, f = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
                            c.head_dim, c.intermediate_size)
        pd = _DTYPES[c.param_dtype]
        normal = nnx.initializers.normal(0.02)

        def w(shape, names):
            return _param(normal(rngs.params(), shape, pd), names)

        self.attn_norm = _param(jnp.ones((n, d), pd), ("layers", "norm"))
        self.q_proj = w((n, h, e, d), ("layers", "heads", "head_dim", "embed"))
        self.k_proj = w((n, k, e, d), ("layers", "kv_heads", "head_dim", "embed"))
        self.v_proj = w((n, k, e, d), ("layers", "kv_heads", "head_dim", "embed"))
        if c.qkv_bias:
            self.q_bias = _param(jnp.zeros((n, h, e), pd), ("layers", "heads", "head_dim"))
            self.k_bias = _param(jnp.zeros((n, k, e), pd), ("layers", "kv_heads", "head_dim"))
            self.v_bias = _param(jnp.zeros((n, k, e), pd), ("layers", "kv_heads", "head_dim"))
        self.o_proj = w((n, d, h, e), ("layers", "embed", "heads", "head_dim"))
        self.mlp_norm = _param(jnp.ones((n, d), pd), ("layers", "norm"))
        self.gate_proj = w((n, f, d), ("layers", "mlp", "embed"))
        self.up_proj = w((n, f, d), ("layers", "mlp", "embed"))
        self.down_proj = w((n, d, f), ("layers", "embed", "mlp"))

    def weights(self) -> dict[str, jax.Array]:
        """The stacked arrays by name (what the scan iterates over)."""
        names = ["attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_norm",
                 "gate_proj", "up_proj", "down_proj"]
        if hasattr(self, "q_bias"):
            names += ["q_bias", "k_bias", "v_bias"]
        return {name: getattr(self, name)[...] for name in names}


def decoder_layer(config: LlamaConfig, x_BxLxD: jax.Array, w: dict[str, jax.Array],
                  cos_LxE2: jax.Array, sin_LxE2: jax.Array) -> jax.Array:
    """One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)). w: one layer's weights."""
    c = config
    dt = _DTYPES[c.dtype]
    k, g, e = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim

    # Projections straight into the attention layout (XLA folds the transposes into the dots).
    h_BxLxD = rms_norm(x_BxLxD, w["attn_norm"], c.rms_norm_eps)
    wq_KVxGxExD = w["q_proj"].astype(dt).reshape(k, g, e, -1)
    q = jnp.einsum("bld,kged->bklge", h_BxLxD, wq_KVxGxExD)
    kk = jnp.einsum("bld,ked->bkle", h_BxLxD, w["k_proj"].astype(dt))
    v = jnp.einsum("bld,ked->bkle", h_BxLxD, w["v_proj"].astype(dt))
    if "q_bias" in w:
        q = q + w["q_bias"].astype(dt).reshape(k, 1, g, e)
        kk = kk + w["k_bias"].astype(dt)[:, None, :]
        v = v + w["v_bias"].astype(dt)[:, None, :]
    q_BxKVxLxGxE = apply_rope(q * jnp.asarray(e**-0.5, dt), cos_LxE2[:, None], sin_LxE2[:, None])
    k_BxKVxLxE = apply_rope(kk, cos_LxE2, sin_LxE2)
    o_BxKVxLxGxE = causal_attention(q_BxKVxLxGxE, k_BxKVxLxE, v)
    wo_DxKVxGxE = w["o_proj"].astype(dt).reshape(-1, k, g, e)
    x_BxLxD = x_BxLxD + jnp.einsum("bklge,dkge->bld", o_BxKVxLxGxE, wo_DxKVxGxE)

    h_BxLxD = rms_norm(x_BxLxD, w["mlp_norm"], c.rms_norm_eps)
    gate_BxLxF = jnp.einsum("bld,fd->blf", h_BxLxD, w["gate_proj"].astype(dt))
    up_BxLxF = jnp.einsum("bld,fd->blf", h_BxLxD, w["up_proj"].astype(dt))
    act_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
    return x_BxLxD + jnp.einsum("blf,df->bld", act_BxLxF, w["down_proj"].astype(dt))


class Llama(nnx.Module):
    """Llama-family causal LM. `model(tokens[B, L] int32) -> logits[B, L, V] float32`.

    Positions are 0..L-1 for every row (packed sequences, plain causal mask).

    >>> model = init_model(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                num_layers=2, num_heads=4, num_kv_heads=2), seed=0)
    >>> model(jnp.zeros((1, 8), jnp.int32)).shape
    (1, 8, 64)
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, fingerprint: str = ""):
        c = config
        pd = _DTYPES[c.param_dtype]
        normal = nnx.initializers.normal(0.02)
        self.config = c
        # Identifies the source weights + config (sha256 hex); not updated by training.
        self.fingerprint = fingerprint
        self.embed = _param(normal(rngs.params(), (c.vocab_size, c.hidden_size), pd),
                            ("vocab", "embed"))
        self.layers = LlamaLayers(c, rngs=rngs)
        self.final_norm = _param(jnp.ones((c.hidden_size,), pd), ("norm",))
        if not c.tie_embeddings:
            self.lm_head = _param(normal(rngs.params(), (c.vocab_size, c.hidden_size), pd),
                                  ("vocab", "embed"))

    def hidden_states(self, tokens_BxL: jax.Array) -> jax.Array:
        """Final-norm hidden states [B, L, D] in config.dtype."""
        c = self.config
        dt = _DTYPES[c.dtype]
        l = tokens_BxL.shape[1]
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(dt)

        angles_LxE2 = jnp.arange(l, dtype=jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(c))
        cos_LxE2, sin_LxE2 = jnp.cos(angles_LxE2), jnp.sin(angles_LxE2)

        def body(x, w):
            return decoder_layer(c, x, w, cos_LxE2, sin_LxE2), None

        if c.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, self.layers.weights())
        return rms_norm(x_BxLxD, self.final_norm[...], c.rms_norm_eps)

    def lm_head_weight(self) -> jax.Array:
        """The output projection [D, V] in config.dtype (the embedding transposed when tied).

        logits = hidden_states(tokens) @ lm_head_weight(); the transpose is free inside a jit
        (XLA folds it into the dot), so a chunked loss can slice V without copying.
        """
        w_VxD = self.embed[...] if self.config.tie_embeddings else self.lm_head[...]
        return w_VxD.astype(_DTYPES[self.config.dtype]).T

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Logits [B, L, V] float32 (accumulated in float32 whatever the compute dtype)."""
        h_BxLxD = self.hidden_states(tokens_BxL)
        return jnp.einsum("bld,dv->blv", h_BxLxD, self.lm_head_weight(),
                          preferred_element_type=jnp.float32)


def random_fingerprint(config: LlamaConfig, seed: int) -> str:
    """sha256 of the config and seed of a random initialisation."""
    blob = json.dumps({"init": "normal(0.02)", "seed": int(seed), "config": config.to_dict()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def init_model(config: LlamaConfig, seed: int = 0) -> Llama:
    """A randomly initialised model (weights normal(0.02), norms 1, biases 0, as in HF)."""
    return Llama(config, rngs=nnx.Rngs(params=seed), fingerprint=random_fingerprint(config, seed))


def model_fingerprint(model: Llama) -> str:
    """The model's fingerprint (sha256 hex of source weights/config, or of config + seed)."""
    return model.fingerprint
