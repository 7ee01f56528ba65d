"""Hugging Face config.json <-> LlamaConfig's fields, per family.

Imports go one way: models.config (LlamaConfig, `config_from_hf`) imports this module, which
works on plain field dicts and on any LlamaConfig it is handed, and never imports it back.

ARCHS lists the architectures read and written. Each family's fixed variations (q/k norm,
Gemma's norms and scales) come from FAMILY_FEATURES; the configurable ones (sliding window,
layer types, RoPE scaling, soft-caps) from config.json. A field that would change the math and
is not implemented is refused with an error naming it, never ignored.

Both config.json generations are read: transformers >= 5 (`rope_parameters`, `layer_types`)
and 4.x (`rope_theta` / `rope_scaling`, Gemma 3's `rope_local_base_freq` and
`sliding_window_pattern`, Qwen's `use_sliding_window` / `max_window_layers`).
"""

from __future__ import annotations

from typing import Any

from rskd_jax.models.rope import canonical_scaling

ARCHS = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
}
FAMILY_ARCH = {family: arch for arch, family in ARCHS.items()}
_GEMMA = dict(norm_plus_one=True, sandwich_norms=True, embed_scale=True)
FAMILY_FEATURES = {
    "llama": {},
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "mistral": {},
    "gemma2": _GEMMA,
    "gemma3_text": dict(_GEMMA, qk_norm=True),
}
_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_HF_ACTS = {ours: theirs for theirs, ours in _ACTS.items()}


def _unsupported(what: str) -> ValueError:
    return ValueError(f"unsupported model config: {what}")


def _family(hf: dict) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch is not None and arch not in ARCHS:
        raise _unsupported(f"architecture {arch!r}; supported: {sorted(ARCHS)}")
    family = ARCHS.get(arch) or hf.get("model_type")
    if family not in FAMILY_ARCH:
        raise _unsupported(f"model_type {family!r}; supported: {sorted(FAMILY_ARCH)}")
    return family


def _rope(params: dict, hf: dict, default_theta: float) -> tuple[float, dict | None]:
    """(theta, canonical scaling) of one RoPE parameter dict (v5) or of the legacy fields."""
    theta = params.get("rope_theta", default_theta)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported("partial_rotary_factor != 1 (partial RoPE) is not implemented")
    scaling.pop("partial_rotary_factor", None)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in ("llama3", "yarn") and scaling.get("original_max_position_embeddings") is None:
        # transformers' default (standardize_rope_params)
        scaling["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = hf["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    try:
        return float(theta), canonical_scaling(scaling)
    except ValueError as e:
        raise _unsupported(f"rope type {rope_type!r}: {e}") from None


def _ropes(hf: dict, family: str) -> dict:
    """rope_theta, rope_scaling and (Gemma 3) rope_local_theta from either config generation."""
    params = hf.get("rope_parameters") or {}
    if family == "gemma3_text":
        if "full_attention" in params or "sliding_attention" in params:
            full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        else:  # transformers 4.x fields
            full = dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 1e6))
            local = {"rope_theta": hf.get("rope_local_base_freq", 1e4)}
        theta, scaling = _rope(full, hf, 1e6)
        local_theta, local_scaling = _rope(local, hf, 1e4)
        if local_scaling is not None:
            raise _unsupported(
                f"rope_parameters.sliding_attention type "
                f"{local_scaling['rope_type']!r} (the local RoPE must be default)"
            )
        return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta)
    if not params:
        params = dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 10000.0))
    theta, scaling = _rope(params, hf, 10000.0)
    return dict(rope_theta=theta, rope_scaling=scaling)


def _layer_types(hf: dict, family: str, n: int) -> tuple[list[str] | None, int | None]:
    """(layer_types, sliding_window) as transformers derives them for the family."""
    window = hf.get("sliding_window")
    kinds = hf.get("layer_types")
    if family == "llama":  # transformers' Llama has no sliding window: refuse, never ignore
        if hf.get("use_sliding_window"):
            raise _unsupported("use_sliding_window=True (LlamaForCausalLM has no sliding window)")
        if kinds is not None and set(kinds) != {"full_attention"}:
            raise _unsupported(f"layer_types {sorted(set(kinds))} in a LlamaForCausalLM config")
        return None, None
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window"):
            window = None
        if kinds is None and window is not None:
            first = hf.get("max_window_layers", 28)
            kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    elif family == "mistral":
        if kinds is not None and window is not None:
            raise _unsupported(
                "layer_types in a MistralForCausalLM config (transformers ignores "
                "them and slides every layer; convert to Ministral)"
            )
        kinds = None
    elif family == "gemma2" and kinds is None:
        kinds = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    elif family == "gemma3_text" and kinds is None:
        period = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        kinds = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    if window is None:  # transformers: a sliding layer without a window attends to everything
        kinds = None
    return kinds, window


def fields_from_hf(hf: dict) -> dict[str, Any]:
    """LlamaConfig's fields from an HF config.json dict (`models.config.config_from_hf` makes
    the config; its overrides win)."""
    family = _family(hf)
    gemma = family.startswith("gemma")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act not in _ACTS:
        raise _unsupported(f"hidden_act={act!r} (only silu and gelu_pytorch_tanh are implemented)")
    if hf.get("mlp_bias"):
        raise _unsupported("mlp_bias=True (biases on the MLP projections)")
    if family != "qwen2" and hf.get("attention_bias"):
        raise _unsupported(
            "attention_bias=True (a bias on o_proj too; only q/k/v biases, as in Qwen2, are implemented)"
        )
    if hf.get("use_bidirectional_attention"):
        raise _unsupported("use_bidirectional_attention=True (only causal attention)")
    if family == "gemma3_text" and hf.get("attn_logit_softcapping") is not None:
        raise _unsupported(
            "attn_logit_softcapping in a Gemma 3 config (transformers' Gemma 3 does not apply it; drop the field)"
        )
    if not gemma and (hf.get("attn_logit_softcapping") or hf.get("final_logit_softcapping")):
        raise _unsupported("attn_logit_softcapping / final_logit_softcapping outside Gemma")
    n = hf["num_hidden_layers"]
    kinds, window = _layer_types(hf, family, n)
    if kinds is not None and set(kinds) - {"full_attention", "sliding_attention"}:
        raise _unsupported(f"layer_types {sorted(set(kinds))} (only full_attention and sliding_attention)")
    heads = hf["num_attention_heads"]
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=n,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or None,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        sliding_window=window if kinds is None or "sliding_attention" in kinds else None,
        layer_types=tuple(kinds) if kinds is not None else None,
        hidden_act=_ACTS[act],
        **_ropes(hf, family),
        **FAMILY_FEATURES[family],
    )
    if family == "mistral" and window is not None:
        fields["layer_types"] = ("sliding_attention",) * n
    if gemma:
        fields.update(
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            attn_softcap=hf.get("attn_logit_softcapping"),
            final_softcap=hf.get("final_logit_softcapping"),
        )
    if family not in ("llama", "qwen2"):  # those two keep the turn-2 config (and fingerprint)
        fields["family"] = family
    return fields


def _check_exportable(c: Any, family: str) -> None:
    """Refuse an export whose config.json could not express the model's math."""
    want = {k: v for k, v in FAMILY_FEATURES[family].items()}
    fixed = ("qkv_bias", "qk_norm", "norm_plus_one", "sandwich_norms", "embed_scale")
    for name in fixed:
        default = type(c).__dataclass_fields__[name].default
        if getattr(c, name) != want.get(name, default):
            raise _unsupported(f"{name}={getattr(c, name)!r} cannot be exported as {FAMILY_ARCH[family]}")
    if not family.startswith("gemma") and (c.attn_softcap or c.final_softcap or c.query_pre_attn_scalar):
        raise _unsupported(f"soft-caps / query_pre_attn_scalar cannot be exported as {FAMILY_ARCH[family]}")
    if c.rope_local_theta is not None and family != "gemma3_text":
        raise _unsupported(f"rope_local_theta cannot be exported as {FAMILY_ARCH[family]}")
    if family == "mistral" and c.layer_types is not None and not all(c.sliding_layers):
        raise _unsupported("mixed layer_types cannot be exported as MistralForCausalLM")


def _int_if_whole(x: float) -> int | float:  # transformers' config types it int
    return int(x) if float(x).is_integer() else x


def _rope_params(theta: float, scaling: dict | None) -> dict:
    return {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}


def config_to_hf(config: Any, arch: str | None = None) -> dict:
    """HF config.json dict of a LlamaConfig (typed Any: models.config imports this module).
    arch: one of ARCHS (default: the config's family, else Qwen2 when qkv_bias, else Llama)."""
    c = config
    arch = arch or FAMILY_ARCH.get(c.family) or ("Qwen2ForCausalLM" if c.qkv_bias else "LlamaForCausalLM")
    if arch not in ARCHS:
        raise _unsupported(f"export architecture {arch!r}; supported: {sorted(ARCHS)}")
    family = ARCHS[arch]
    if family == "llama" and c.qkv_bias:
        raise _unsupported("qkv_bias=True cannot be exported as LlamaForCausalLM; use Qwen2ForCausalLM")
    if family == "qwen2" and not c.qkv_bias:
        raise _unsupported("Qwen2ForCausalLM always has q/k/v biases; export as LlamaForCausalLM")
    _check_exportable(c, family)
    rope_parameters = _rope_params(c.rope_theta, c.rope_scaling)
    hf = dict(
        architectures=[arch],
        model_type=family,
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        hidden_act=_HF_ACTS[c.hidden_act],
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_embeddings,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta / rope_scaling.
        rope_parameters=rope_parameters,
        rope_theta=c.rope_theta,
        rope_scaling=c.rope_scaling,
        dtype=c.param_dtype,
    )
    kinds = list(c.layer_types) if c.layer_types is not None else None
    if family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
        if kinds is not None:
            raise _unsupported("sliding-window layers cannot be exported as LlamaForCausalLM")
    elif family in ("qwen2", "qwen3"):
        sliding = kinds is not None
        hf.update(
            use_sliding_window=sliding,
            sliding_window=c.sliding_window,
            layer_types=kinds or ["full_attention"] * c.num_layers,
            max_window_layers=c.sliding_layers.index(True) if sliding else c.num_layers,
        )
        if family == "qwen3":
            hf.update(attention_bias=False)
    elif family == "mistral":
        hf.update(sliding_window=c.sliding_window)
    else:  # gemma2, gemma3_text
        hf.update(
            hidden_activation=hf.pop("hidden_act"),
            attention_bias=False,
            query_pre_attn_scalar=_int_if_whole(c.query_pre_attn_scalar or c.head_dim),
            sliding_window=c.sliding_window or c.max_position_embeddings,
            layer_types=kinds or ["full_attention"] * c.num_layers,
            final_logit_softcapping=c.final_softcap,
            attn_logit_softcapping=c.attn_softcap,
            use_bidirectional_attention=False,
        )
        if family == "gemma3_text":
            local = c.rope_local_theta if c.rope_local_theta is not None else c.rope_theta
            hf.update(
                rope_parameters={"full_attention": rope_parameters, "sliding_attention": _rope_params(local, None)},
                rope_local_base_freq=local,
            )
            hf.pop("rope_theta")
    return hf
