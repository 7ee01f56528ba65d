"""Causal grouped-query attention with optional sliding window and logit soft-capping.

Shape letters: B batch, KV key/value heads, G query heads per kv head, L positions, E head
dim, C query rows of one chunk, M key positions.

Mask: query i sees key m iff m <= i and, with a window W, i - m < W (transformers'
`sliding_window_overlay`: kv_idx > q_idx - W). Soft-capping (Gemma 2): scores
s -> cap * tanh(s / cap) before the mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_chunk(length: int) -> int:
    """Query-chunk size for causal attention: 64, or L/16 for long sequences (<= 16 chunks)."""
    return max(64, -(-length // 16))


def causal_attention(q_BxKVxLxGxE: jax.Array, k_BxKVxLxE: jax.Array, v_BxKVxLxE: jax.Array,
                     chunk: int | None = None, *, window: int | jax.Array | None = None,
                     softcap: float | None = None) -> jax.Array:
    """Exact causal grouped-query attention, o[..., i, :] = softmax(q_i k_{<=i}^T) v_{<=i}.

    q is already scaled (E^-1/2 or the family's scale); query head (kv, g) reads kv head kv.
    Returns [B, KV, L, G, E]. Scores and softmax are float32; the probabilities are cast back
    to q's dtype for the PV dot.

    window: None (plain causal), a Python int (static: key blocks left of every query's
    window are skipped too) or a traced int32 scalar (one scan over layers of mixed kinds;
    masked, not skipped). softcap: None or the Gemma 2 attention logit cap.

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
        s_BxKVxCGxM = jnp.einsum("bkqe,bkme->bkqm", q_BxKVxCGxE, k_BxKVxLxE[:, :, lo:stop],
                                 preferred_element_type=jnp.float32)
        s_BxKVxCxGxM = s_BxKVxCGxM.reshape(b, kh, c, g, stop - lo)
        if softcap is not None:
            s_BxKVxCxGxM = jnp.tanh(s_BxKVxCxGxM / softcap) * softcap
        key_M, query_C = jnp.arange(lo, stop), jnp.arange(start, stop)
        visible_CxM = key_M[None, :] <= query_C[:, None]
        if window is not None:
            visible_CxM = visible_CxM & (key_M[None, :] > query_C[:, None] - window)
        s_BxKVxCxGxM = jnp.where(visible_CxM[:, None, :], s_BxKVxCxGxM, jnp.finfo(jnp.float32).min)
        p_BxKVxCGxM = jax.nn.softmax(s_BxKVxCxGxM, axis=-1).astype(q_BxKVxLxGxE.dtype)
        o_BxKVxCGxE = jnp.einsum("bkqm,bkme->bkqe", p_BxKVxCGxM.reshape(b, kh, c * g, stop - lo),
                                 v_BxKVxLxE[:, :, lo:stop])
        outs.append(o_BxKVxCGxE.reshape(b, kh, c, g, e))
    return jnp.concatenate(outs, axis=2)
