"""The decoder in Flax NNX: Llama 2/3, SmolLM2, Qwen2/2.5, Qwen3, Mistral, Gemma 2, Gemma 3 text.

One decoder with a few explicit variations (models.config.LlamaConfig fields, defaults = Llama):

    qkv_bias                 q/k/v projection biases (Qwen2)
    qk_norm                  per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    sliding_window, layer_types
                             per-layer "full_attention" / "sliding_attention" (Mistral: all
                             sliding; Gemma 2: alternating; Gemma 3: 5 local : 1 global)
    rope_scaling             None, linear, llama3 or yarn (Qwen2.5 long context)
    rope_local_theta         RoPE base of the sliding layers (Gemma 3; None: rope_theta)
    hidden_act               "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    norm_plus_one            RMSNorm scales by (1 + w) (Gemma)
    sandwich_norms           norms after attention and after the MLP too (Gemma 2/3)
    embed_scale              embeddings times sqrt(D) (Gemma)
    query_pre_attn_scalar    attention scale s^-1/2 instead of E^-1/2 (Gemma)
    attn_softcap, final_softcap
                             cap * tanh(x / cap) on attention scores / logits (Gemma 2)
    family                   the Hugging Face architecture it exports as (tensor names only)
    attention                "auto" | "xla" | "cudnn" | "splash" | "chunked": the implementation
                             (models.attention.resolve_attention; same math)

Shape letters (README's B, L, D, V, H, C, plus): NL layers, KV key/value heads, G = H / KV query
heads per kv head, E head dim, F MLP (intermediate) width, M key positions.

Per-layer weights are stacked along a leading layers axis and run with one `jax.lax.scan`,
so a 30-layer model compiles as fast as a 1-layer one. Parameters (param_dtype) and their
logical axis names (nnx variable metadata `out_sharding`; map them to mesh axes with
`nnx.get_partition_spec` under logical-axis rules):

    embed               [V, D]         ("vocab", "embed")
    layers.attn_norm    [NL, D]        ("layers", "norm")
    layers.q_proj       [NL, H, E, D]  ("layers", "heads", "head_dim", "embed")
    layers.k_proj       [NL, KV, E, D] ("layers", "kv_heads", "head_dim", "embed")
    layers.v_proj       [NL, KV, E, D] ("layers", "kv_heads", "head_dim", "embed")
    layers.q_bias       [NL, H, E]     ("layers", "heads", "head_dim")       qkv_bias only
    layers.k_bias       [NL, KV, E]    ("layers", "kv_heads", "head_dim")    qkv_bias only
    layers.v_bias       [NL, KV, E]    ("layers", "kv_heads", "head_dim")    qkv_bias only
    layers.q_norm       [NL, E]        ("layers", "norm")                    qk_norm only
    layers.k_norm       [NL, E]        ("layers", "norm")                    qk_norm only
    layers.o_proj       [NL, D, H, E]  ("layers", "embed", "heads", "head_dim")
    layers.post_attn_norm [NL, D]      ("layers", "norm")                    sandwich_norms only
    layers.mlp_norm     [NL, D]        ("layers", "norm")
    layers.gate_proj    [NL, F, D]     ("layers", "mlp", "embed")
    layers.up_proj      [NL, F, D]     ("layers", "mlp", "embed")
    layers.down_proj    [NL, D, F]     ("layers", "embed", "mlp")
    layers.post_mlp_norm [NL, D]       ("layers", "norm")                    sandwich_norms only
    final_norm          [D]            ("norm",)
    lm_head             [V, D]         ("vocab", "embed")                    untied only

Projection weights keep the Hugging Face / PyTorch [out, in] order (the dots contract the
last axis), so loading and exporting never transpose a matrix. Norm weights are stored as the
checkpoint stores them (Gemma's are offsets from 1).

Logical names used: layers, vocab, embed, norm, heads, kv_heads, head_dim, mlp.
Variables are created with eager_sharding=False: a model can be built without a mesh, and
sharding is applied once, at jit, from these names.

Numerics: matmuls in config.dtype; RMSNorm, RoPE and softmax in float32; logits float32.
RoPE uses the Hugging Face rotate-half convention (pairs (i, i + E/2)).
"""

from __future__ import annotations

import hashlib
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx

from rskd_jax.models.attention import attention, attention_chunk, causal_attention  # noqa: F401 (re-export)
from rskd_jax.models.config import DTYPES, FAMILIES, HIDDEN_ACTS, LAYER_TYPES, LlamaConfig, rope_inv_freq  # noqa: F401 (re-exported: models.llama was their home)
from rskd_jax.models.rope import apply_rope, rope_tables


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """x / rms(x) * scale (or * (1 + scale), Gemma), in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    scale32 = scale.astype(jnp.float32)
    if plus_one:
        scale32 = 1.0 + scale32
    return (x32 * jax.lax.rsqrt(var + eps) * scale32).astype(x.dtype)


def _param(value, names) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class LlamaLayers(nnx.Module):
    """The N decoder layers, weights stacked along a leading "layers" axis."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        n, d, h, k, e, f = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size)
        pd = DTYPES[c.param_dtype]
        normal = nnx.initializers.normal(0.02)
        norm_init = jnp.zeros if c.norm_plus_one else jnp.ones  # both mean "scale 1"

        def w(shape, names):
            return _param(normal(rngs.params(), shape, pd), names)

        def norm(size):
            return _param(norm_init((n, size), pd), ("layers", "norm"))

        self.attn_norm = norm(d)
        self.q_proj = w((n, h, e, d), ("layers", "heads", "head_dim", "embed"))
        self.k_proj = w((n, k, e, d), ("layers", "kv_heads", "head_dim", "embed"))
        self.v_proj = w((n, k, e, d), ("layers", "kv_heads", "head_dim", "embed"))
        if c.qkv_bias:
            self.q_bias = _param(jnp.zeros((n, h, e), pd), ("layers", "heads", "head_dim"))
            self.k_bias = _param(jnp.zeros((n, k, e), pd), ("layers", "kv_heads", "head_dim"))
            self.v_bias = _param(jnp.zeros((n, k, e), pd), ("layers", "kv_heads", "head_dim"))
        if c.qk_norm:
            self.q_norm, self.k_norm = norm(e), norm(e)
        self.o_proj = w((n, d, h, e), ("layers", "embed", "heads", "head_dim"))
        if c.sandwich_norms:
            self.post_attn_norm, self.post_mlp_norm = norm(d), norm(d)
        self.mlp_norm = norm(d)
        self.gate_proj = w((n, f, d), ("layers", "mlp", "embed"))
        self.up_proj = w((n, f, d), ("layers", "mlp", "embed"))
        self.down_proj = w((n, d, f), ("layers", "embed", "mlp"))

    def weights(self) -> dict[str, jax.Array]:
        """The stacked arrays by name (what the scan iterates over)."""
        names = [
            "attn_norm",
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "mlp_norm",
            "gate_proj",
            "up_proj",
            "down_proj",
            "q_bias",
            "k_bias",
            "v_bias",
            "q_norm",
            "k_norm",
            "post_attn_norm",
            "post_mlp_norm",
        ]
        return {name: getattr(self, name)[...] for name in names if hasattr(self, name)}


def decoder_layer(
    config: LlamaConfig,
    x_BxLxD: jax.Array,
    w: dict[str, jax.Array],
    cos_LxE2: jax.Array,
    sin_LxE2: jax.Array,
    window: int | jax.Array | None = None,
    segment_ids_BxL: jax.Array | None = None,
) -> jax.Array:
    """One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)). w: one layer's weights.

    With sandwich_norms the attention and MLP outputs are normed too before the residual add.
    window: this layer's sliding window (None: full causal attention). cos/sin: [L, E/2], or
    [B, L, E/2] for per-row positions. segment_ids_BxL: attend only within a segment.
    """
    c = config
    dt = DTYPES[c.dtype]
    k, g, e = c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim
    p1 = c.norm_plus_one

    # Projections straight into the attention layout (XLA folds the transposes into the dots).
    h_BxLxD = rms_norm(x_BxLxD, w["attn_norm"], c.rms_norm_eps, p1)
    wq_KVxGxExD = w["q_proj"].astype(dt).reshape(k, g, e, -1)
    q = jnp.einsum("bld,kged->bklge", h_BxLxD, wq_KVxGxExD)
    kk = jnp.einsum("bld,ked->bkle", h_BxLxD, w["k_proj"].astype(dt))
    v = jnp.einsum("bld,ked->bkle", h_BxLxD, w["v_proj"].astype(dt))
    if "q_bias" in w:
        q = q + w["q_bias"].astype(dt).reshape(k, 1, g, e)
        kk = kk + w["k_bias"].astype(dt)[:, None, :]
        v = v + w["v_bias"].astype(dt)[:, None, :]
    if c.qk_norm:  # per head, over E, before RoPE
        q = rms_norm(q, w["q_norm"], c.rms_norm_eps, p1)
        kk = rms_norm(kk, w["k_norm"], c.rms_norm_eps, p1)
    scale = (c.query_pre_attn_scalar or e) ** -0.5
    if cos_LxE2.ndim == 2:  # positions 0..L-1, shared by every row
        cos_q, sin_q, cos_k, sin_k = cos_LxE2[:, None], sin_LxE2[:, None], cos_LxE2, sin_LxE2
    else:  # [B, L, E/2]: per-row positions (document masking)
        cos_k, sin_k = cos_LxE2[:, None], sin_LxE2[:, None]
        cos_q, sin_q = cos_k[..., None, :], sin_k[..., None, :]
    q_BxKVxLxGxE = apply_rope(q * jnp.asarray(scale, dt), cos_q, sin_q)
    k_BxKVxLxE = apply_rope(kk, cos_k, sin_k)
    o_BxKVxLxGxE = attention(
        c.attention,
        q_BxKVxLxGxE,
        k_BxKVxLxE,
        v,
        window=window,
        softcap=c.attn_softcap,
        local_window=c.sliding_window,
        segment_ids=segment_ids_BxL,
    )
    wo_DxKVxGxE = w["o_proj"].astype(dt).reshape(-1, k, g, e)
    attn_BxLxD = jnp.einsum("bklge,dkge->bld", o_BxKVxLxGxE, wo_DxKVxGxE)
    if c.sandwich_norms:
        attn_BxLxD = rms_norm(attn_BxLxD, w["post_attn_norm"], c.rms_norm_eps, p1)
    x_BxLxD = x_BxLxD + attn_BxLxD

    h_BxLxD = rms_norm(x_BxLxD, w["mlp_norm"], c.rms_norm_eps, p1)
    gate_BxLxF = jnp.einsum("bld,fd->blf", h_BxLxD, w["gate_proj"].astype(dt))
    up_BxLxF = jnp.einsum("bld,fd->blf", h_BxLxD, w["up_proj"].astype(dt))
    act_BxLxF = HIDDEN_ACTS[c.hidden_act](gate_BxLxF) * up_BxLxF
    mlp_BxLxD = jnp.einsum("blf,df->bld", act_BxLxF, w["down_proj"].astype(dt))
    if c.sandwich_norms:
        mlp_BxLxD = rms_norm(mlp_BxLxD, w["post_mlp_norm"], c.rms_norm_eps, p1)
    return x_BxLxD + mlp_BxLxD


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (identity for cap None)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class Llama(nnx.Module):
    """Decoder-only causal LM. `model(tokens[B, L] int32) -> logits[B, L, V] float32`.

    Positions are 0..L-1 for every row (packed sequences, plain causal mask), unless the call
    gives `segment_ids` [B, L] (attend only within a document) and `positions` [B, L] (RoPE
    positions, restarting at 0 per document): document masking (rskd_jax.documents).

    >>> model = init_model(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                num_layers=2, num_heads=4, num_kv_heads=2), seed=0)
    >>> model(jnp.zeros((1, 8), jnp.int32)).shape
    (1, 8, 64)
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, fingerprint: str = ""):
        c = config
        pd = DTYPES[c.param_dtype]
        normal = nnx.initializers.normal(0.02)
        self.config = c
        # Identifies the source weights + config (sha256 hex); not updated by training.
        self.fingerprint = fingerprint
        self.embed = _param(normal(rngs.params(), (c.vocab_size, c.hidden_size), pd), ("vocab", "embed"))
        self.layers = LlamaLayers(c, rngs=rngs)
        norm_init = jnp.zeros if c.norm_plus_one else jnp.ones
        self.final_norm = _param(norm_init((c.hidden_size,), pd), ("norm",))
        if not c.tie_embeddings:
            self.lm_head = _param(normal(rngs.params(), (c.vocab_size, c.hidden_size), pd), ("vocab", "embed"))

    def hidden_states(
        self, tokens_BxL: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """Final-norm hidden states [B, L, D] in config.dtype. segment_ids / positions: int
        [B, L] or None (one sequence per row, positions 0..L-1)."""
        c = self.config
        dt = DTYPES[c.dtype]
        l = tokens_BxL.shape[1]
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0)
        if c.embed_scale:  # in the parameter dtype, as transformers' Gemma scales it
            x_BxLxD = x_BxLxD * jnp.asarray(math.sqrt(c.hidden_size), x_BxLxD.dtype)
        x_BxLxD = x_BxLxD.astype(dt)

        cos_LxE2, sin_LxE2 = rope_tables(l, c.head_dim, c.rope_theta, c.rope_scaling, positions)
        sliding = c.sliding_layers
        xs = self.layers.weights()
        if len(set(sliding)) == 1:  # one kind of layer: the window and RoPE are static
            window = c.sliding_window if sliding[0] else None
            if sliding[0] and c.rope_local_theta is not None:
                cos_LxE2, sin_LxE2 = rope_tables(l, c.head_dim, c.rope_local_theta, positions=positions)

            def body(x, w):
                return decoder_layer(c, x, w, cos_LxE2, sin_LxE2, window, segment_ids), None
        else:  # PERF: mixed kinds share one scan, so the window is masked, not skipped
            xs = (xs, jnp.asarray(sliding))
            local = None
            if c.rope_local_theta is not None:
                local = rope_tables(l, c.head_dim, c.rope_local_theta, positions=positions)

            def body(x, w_and_sliding):
                w, is_sliding = w_and_sliding
                window = jnp.where(is_sliding, c.sliding_window, l + 1)
                cos, sin = cos_LxE2, sin_LxE2
                if local is not None:
                    cos, sin = jnp.where(is_sliding, local[0], cos), jnp.where(is_sliding, local[1], sin)
                return decoder_layer(c, x, w, cos, sin, window, segment_ids), None

        if c.remat:
            body = jax.checkpoint(body, prevent_cse=False)
        x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, xs)
        return rms_norm(x_BxLxD, self.final_norm[...], c.rms_norm_eps, c.norm_plus_one)

    def lm_head_weight(self) -> jax.Array:
        """The output projection [D, V] in config.dtype (the embedding transposed when tied).

        logits = logits_from_hidden(hidden_states(tokens), lm_head_weight()); the transpose is
        free inside a jit (XLA folds it into the dot), so a chunked loss can slice V without
        copying.
        """
        w_VxD = self.embed[...] if self.config.tie_embeddings else self.lm_head[...]
        return w_VxD.astype(DTYPES[self.config.dtype]).T

    def logits_from_hidden(self, h_BxCxD: jax.Array, w_DxV: jax.Array) -> jax.Array:
        """Logits [B, C, V'] float32 of hidden states and (a vocabulary slice of) lm_head_weight:
        h @ w accumulated in float32, then the final soft-cap where the family has one (Gemma 2).
        A chunked loss must use this, not a bare h @ w, or it misses the cap."""
        logits = jnp.einsum("bld,dv->blv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
        return softcap(logits, self.config.final_softcap)

    def __call__(
        self, tokens_BxL: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> jax.Array:
        """Logits [B, L, V] float32 (accumulated in float32 whatever the compute dtype)."""
        return self.logits_from_hidden(self.hidden_states(tokens_BxL, segment_ids, positions), self.lm_head_weight())


def random_fingerprint(config: LlamaConfig, seed: int) -> str:
    """sha256 of the config and seed of a random initialisation."""
    blob = json.dumps({"init": "normal(0.02)", "seed": int(seed), "config": config.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def init_model(config: LlamaConfig, seed: int = 0) -> Llama:
    """A randomly initialised model (weights normal(0.02), norms 1 (Gemma: 0), biases 0, as in HF)."""
    return Llama(config, rngs=nnx.Rngs(params=seed), fingerprint=random_fingerprint(config, seed))


def model_fingerprint(model: Llama) -> str:
    """The model's fingerprint (sha256 hex of source weights/config, or of config + seed)."""
    return model.fingerprint
