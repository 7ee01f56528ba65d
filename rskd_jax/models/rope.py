"""Rotary position embeddings: inverse frequencies (default, linear, llama3, YaRN) and the
rotate-half rotation, computed as transformers computes them.

A RoPE is described by (theta, scaling): scaling is None or a canonical dict with a
"rope_type" key and that type's fields (see SCALING_KEYS). `rope_tables` returns the
cos / sin tables [L, E/2] (float32) the decoder applies to q and k.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# rope_type -> (required keys, optional keys). Types not listed are refused by name.
SCALING_KEYS = {
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}


def canonical_scaling(scaling: dict | None) -> dict | None:
    """None for no scaling / "default"; else {"rope_type", required and given optional keys}.

    Raises ValueError naming an unsupported type or a missing key.
    """
    rs = dict(scaling or {})
    rope_type = rs.get("rope_type", rs.get("type"))
    if scaling is None or rope_type in ("default", None):
        return None
    if rope_type not in SCALING_KEYS:
        raise ValueError(
            f"unsupported rope_scaling type {rope_type!r}: only {sorted(SCALING_KEYS)} (or default) are implemented"
        )
    required, optional = SCALING_KEYS[rope_type]
    missing = [k for k in required if rs.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type} lacks {missing}")
    return {
        "rope_type": rope_type,
        **{k: rs[k] for k in required},
        **{k: rs[k] for k in optional if rs.get(k) is not None},
    }


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq: np.ndarray, theta: float, dim: int, rs: dict) -> tuple[np.ndarray, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies by `factor`, keep high ones, with a
    linear ramp between the beta_fast / beta_slow rotation counts; cos/sin scaled by mscale."""
    factor, old_len = rs["factor"], rs["original_max_position_embeddings"]
    attention = rs.get("attention_factor")
    if attention is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention = _yarn_mscale(factor, rs["mscale"]) / _yarn_mscale(factor, rs["mscale_all_dim"])
        else:
            attention = _yarn_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    pos_freqs = (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)
    interpolated = (1.0 / (factor * pos_freqs)).astype(np.float32)
    out = interpolated * (1 - extrapolation) + inv_freq * extrapolation
    return out.astype(np.float32), float(attention)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[np.ndarray, float]:
    """(inverse frequencies [E/2] float32, cos/sin multiplier), as transformers computes them."""
    e = head_dim
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, e, 2, dtype=np.float32) / e))).astype(np.float32)
    if scaling is None:
        return inv_freq, 1.0
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32), 1.0
    if rope_type == "yarn":
        return _yarn(inv_freq, theta, e, scaling)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]  # llama3
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


def rope_tables(
    length: int, head_dim: int, theta: float, scaling: dict | None = None, positions: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [L, E/2] float32 for positions 0..L-1 (YaRN's multiplier folded in), or
    [B, L, E/2] for explicit per-row `positions` int [B, L] (document masking: they restart
    at 0 at each document start)."""
    inv_freq, mult = rope_inv_freq(head_dim, theta, scaling)
    pos = jnp.arange(length) if positions is None else positions
    angles_LxE2 = pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos_LxE2, sin_LxE2 = jnp.cos(angles_LxE2), jnp.sin(angles_LxE2)
    if mult != 1.0:
        cos_LxE2, sin_LxE2 = cos_LxE2 * mult, sin_LxE2 * mult
    return cos_LxE2, sin_LxE2


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on the last axis: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s), where x1, x2
    are the two halves of x and cos/sin [..., E/2] broadcast against them. float32 inside."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
