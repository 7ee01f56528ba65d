"""LlamaConfig: the decoder's architecture, its family variations and numerics (the fields are
described in models.llama's docstring), validated and canonicalised once."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rskd_jax.models import hf_config
from rskd_jax.models.attention import ATTENTION_KINDS
from rskd_jax.models.rope import canonical_scaling
from rskd_jax.models.rope import rope_inv_freq as _rope_inv_freq

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
LAYER_TYPES = ("full_attention", "sliding_attention")
HIDDEN_ACTS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")
# Fields added after turn 2: left out of to_dict() at their defaults, so the config (and the
# fingerprint) of every Llama / Qwen2 model stays what it was.
_VARIATION_DEFAULTS = dict(
    qk_norm=False,
    sliding_window=None,
    layer_types=None,
    rope_local_theta=None,
    hidden_act="silu",
    norm_plus_one=False,
    sandwich_norms=False,
    embed_scale=False,
    query_pre_attn_scalar=None,
    attn_softcap=None,
    final_softcap=None,
    family=None,
    attention="auto",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of the decoder (the variations are listed in the module doc).

    rope_scaling: None (or {"rope_type": "default"}) or a dict of type linear, llama3 or yarn
    with that type's fields (models.rope.SCALING_KEYS); other types raise. layer_types: None
    (every layer full, or every layer sliding when sliding_window is set) or one entry per
    layer. dtype is the compute dtype, param_dtype the storage dtype ("float32" / "bfloat16").
    remat wraps each layer in jax.checkpoint (activations recomputed in the backward pass).
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
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    hidden_act: str = "silu"
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    family: str | None = None
    attention: str = "auto"

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads "
                    f"{self.num_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; use one of {sorted(DTYPES)}")
        object.__setattr__(self, "rope_scaling", canonical_scaling(self.rope_scaling))
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; use one of {sorted(HIDDEN_ACTS)}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r}; use one of {ATTENTION_KINDS}")
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}; use one of {FAMILIES}")
        self._canonical_layer_types()

    def _canonical_layer_types(self):
        """layer_types: None when no layer slides (and then no window), else one per layer."""
        kinds = self.layer_types
        if kinds is None and self.sliding_window is not None:
            kinds = ("sliding_attention",) * self.num_layers
        if kinds is not None:
            kinds = tuple(kinds)
            bad = sorted(set(kinds) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer_types {bad} are not implemented; use {LAYER_TYPES}")
            if len(kinds) != self.num_layers:
                raise ValueError(f"layer_types has {len(kinds)} entries for {self.num_layers} layers")
            if "sliding_attention" not in kinds:
                kinds = None
            elif not self.sliding_window or self.sliding_window < 1:
                raise ValueError(
                    "layer_types has sliding_attention layers but sliding_window is "
                    f"{self.sliding_window!r}; set a positive window"
                )
        object.__setattr__(self, "layer_types", kinds)
        if kinds is None:
            object.__setattr__(self, "sliding_window", None)

    def __hash__(self):  # rope_scaling is a dict; hash the canonical JSON instead
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict; family variations at their defaults are left out."""
        d = dataclasses.asdict(self)
        for name, default in _VARIATION_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        if d.get("layer_types") is not None:
            d["layer_types"] = list(d["layer_types"])
        return d

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window?"""
        kinds = self.layer_types or ("full_attention",) * self.num_layers
        return tuple(k == "sliding_attention" for k in kinds)

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> LlamaConfig:
        """From a Hugging Face config.json dict (see models.hf_config.ARCHS for the families)."""
        return config_from_hf(hf, **overrides)

    def to_hf(self, arch: str | None = None) -> dict:
        """To a Hugging Face config.json dict; arch defaults by family (else Qwen2 / Llama)."""
        return hf_config.config_to_hf(self, arch)


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
    """LlamaConfig from an HF config.json dict; overrides (dtype=..., remat=...) win."""
    return LlamaConfig(**{**hf_config.fields_from_hf(hf), **overrides})


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [E/2] float32 of the (global) RoPE, as transformers computes them."""
    return _rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)[0]
