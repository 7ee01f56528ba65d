"""Causal grouped-query attention with optional sliding window and logit soft-capping.

Shape letters: B batch, KV key/value heads, G query heads per kv head, L positions, E head
dim, C query rows of one chunk, M key positions.

Mask: query i sees key m iff m <= i and, with a window W, i - m < W (transformers'
`sliding_window_overlay`: kv_idx > q_idx - W), and, with segment ids (document masking),
seg[i] == seg[m]: attention never crosses a document boundary. Soft-capping (Gemma 2): scores
s -> cap * tanh(s / cap) before the mask.

Two implementations, chosen by `attention(kind, ...)`: the chunked einsum path below (CPU's
default) and jax.nn.dot_product_attention ("xla"; XLA's fused attention elsewhere).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp


def attention_chunk(length: int) -> int:
    """Query-chunk size for causal attention: 64, or L/16 for long sequences (<= 16 chunks)."""
    return max(64, -(-length // 16))


def causal_attention(
    q_BxKVxLxGxE: jax.Array,
    k_BxKVxLxE: jax.Array,
    v_BxKVxLxE: jax.Array,
    chunk: int | None = None,
    *,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Exact causal grouped-query attention, o[..., i, :] = softmax(q_i k_{<=i}^T) v_{<=i}.

    q is already scaled (E^-1/2 or the family's scale); query head (kv, g) reads kv head kv.
    Returns [B, KV, L, G, E]. Scores and softmax are float32; the probabilities are cast back
    to q's dtype for the PV dot.

    window: None (plain causal), a Python int (static: key blocks left of every query's
    window are skipped too) or a traced int32 scalar (one scan over layers of mixed kinds;
    masked, not skipped). softcap: None or the Gemma 2 attention logit cap. segment_ids:
    None or int [B, L]; query i then sees only keys of its own segment (document).

    PERF: queries are processed in chunks of `chunk` rows and chunk i only scores the keys
    0..end_i, which skips the masked upper triangle (~40% of the score work at L=512) and
    keeps each score block cache-sized. The G query heads sharing a kv head are folded into
    the rows of one matmul per (batch, kv head), with no copy of k/v per query head. On 2 CPU
    cores this is ~5x faster than one masked [L, L] block per head.
    """
    b, kh, l, g, e = q_BxKVxLxGxE.shape
    chunk = chunk or attention_chunk(l)
    static_window = isinstance(window, int)
    outs = []
    for start in range(0, l, chunk):  # static, unrolled: L / chunk blocks
        stop = min(start + chunk, l)
        c = stop - start
        lo = max(0, start - window + 1) if static_window else 0  # first key any row here sees
        q_BxKVxCGxE = q_BxKVxLxGxE[:, :, start:stop].reshape(b, kh, c * g, e)
        s_BxKVxCGxM = jnp.einsum(
            "bkqe,bkme->bkqm", q_BxKVxCGxE, k_BxKVxLxE[:, :, lo:stop], preferred_element_type=jnp.float32
        )
        s_BxKVxCxGxM = s_BxKVxCGxM.reshape(b, kh, c, g, stop - lo)
        if softcap is not None:
            s_BxKVxCxGxM = jnp.tanh(s_BxKVxCxGxM / softcap) * softcap
        key_M, query_C = jnp.arange(lo, stop), jnp.arange(start, stop)
        visible_CxM = key_M[None, :] <= query_C[:, None]
        if window is not None:
            visible_CxM = visible_CxM & (key_M[None, :] > query_C[:, None] - window)
        visible_BxCxM = visible_CxM[None]
        if segment_ids is not None:
            same_BxCxM = segment_ids[:, start:stop, None] == segment_ids[:, None, lo:stop]
            visible_BxCxM = visible_BxCxM & same_BxCxM
        s_BxKVxCxGxM = jnp.where(visible_BxCxM[:, None, :, None, :], s_BxKVxCxGxM, jnp.finfo(jnp.float32).min)
        p_BxKVxCGxM = jax.nn.softmax(s_BxKVxCxGxM, axis=-1).astype(q_BxKVxLxGxE.dtype)
        o_BxKVxCGxE = jnp.einsum(
            "bkqm,bkme->bkqe", p_BxKVxCGxM.reshape(b, kh, c * g, stop - lo), v_BxKVxLxE[:, :, lo:stop]
        )
        outs.append(o_BxKVxCGxE.reshape(b, kh, c, g, e))
    return jnp.concatenate(outs, axis=2)


ATTENTION_KINDS = ("auto", "xla", "chunked")
_log = logging.getLogger(__name__)


def resolve_attention(kind: str, softcap: float | None = None, backend: str | None = None) -> str:
    """The implementation `kind` runs as: "chunked" or "xla" (jax.nn.dot_product_attention).

    auto: chunked on CPU (it skips the masked triangle; ~5x faster there), xla elsewhere (XLA's
    fused attention). Soft-capped scores (Gemma 2) are not expressible in
    jax.nn.dot_product_attention: those fall back to chunked, with the reason logged.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention={kind!r}; use one of {ATTENTION_KINDS}")
    if kind == "auto":
        kind = "chunked" if (backend or jax.default_backend()) == "cpu" else "xla"
    if kind == "xla" and softcap is not None:
        _log.warning(
            "attention: attention logit soft-capping is not supported by "
            "jax.nn.dot_product_attention; using the chunked path"
        )
        kind = "chunked"
    return kind


def xla_attention(
    q_BxKVxLxGxE: jax.Array,
    k_BxKVxLxE: jax.Array,
    v_BxKVxLxE: jax.Array,
    *,
    window: int | jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """causal_attention through jax.nn.dot_product_attention (same arguments, same result).

    A static window becomes local_window_size=(W - 1, 0); a traced one (mixed layer kinds)
    a boolean [L, L] mask; segment ids a boolean [B, 1, L, L] same-segment mask (and-ed with
    the window's). Head h = kv * G + g reads kv head h // G, as jax's GQA does.
    """
    b, kh, l, g, e = q_BxKVxLxGxE.shape
    q_BxLxHxE = jnp.moveaxis(q_BxKVxLxGxE, 2, 1).reshape(b, l, kh * g, e)
    k_BxLxKVxE, v_BxLxKVxE = jnp.moveaxis(k_BxKVxLxE, 2, 1), jnp.moveaxis(v_BxKVxLxE, 2, 1)
    local, mask = None, None
    if isinstance(window, int):
        local = (window - 1, 0)
    elif window is not None:
        i, m = jnp.arange(l)[:, None], jnp.arange(l)[None, :]
        mask = (m > i - window)[None, None]
    if segment_ids is not None:
        same_Bx1xLxL = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        mask = same_Bx1xLxL if mask is None else mask & same_Bx1xLxL
    o_BxLxHxE = jax.nn.dot_product_attention(
        q_BxLxHxE, k_BxLxKVxE, v_BxLxKVxE, mask=mask, scale=1.0, is_causal=True, local_window_size=local
    )
    return jnp.moveaxis(o_BxLxHxE.reshape(b, l, kh, g, e), 1, 2)


def attention(
    kind: str,
    q_BxKVxLxGxE: jax.Array,
    k_BxKVxLxE: jax.Array,
    v_BxKVxLxE: jax.Array,
    *,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Causal attention by implementation kind (see resolve_attention); [B, KV, L, G, E] out.
    segment_ids (int [B, L], optional): attend only within a segment (document masking)."""
    if resolve_attention(kind, softcap) == "xla":
        return xla_attention(q_BxKVxLxGxE, k_BxKVxLxE, v_BxKVxLxE, window=window, segment_ids=segment_ids)
    return causal_attention(
        q_BxKVxLxGxE, k_BxKVxLxE, v_BxKVxLxE, window=window, softcap=softcap, segment_ids=segment_ids
    )
