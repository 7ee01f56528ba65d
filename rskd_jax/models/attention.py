"""Causal grouped-query attention with optional sliding window and logit soft-capping.

Shape letters: B batch, KV key/value heads, G query heads per kv head, L positions, E head
dim, C query rows of one chunk, M key positions.

Mask: query i sees key m iff m <= i and, with a window W, i - m < W (transformers'
`sliding_window_overlay`: kv_idx > q_idx - W), and, with segment ids (document masking),
seg[i] == seg[m]: attention never crosses a document boundary. Soft-capping (Gemma 2): scores
s -> cap * tanh(s / cap) before the mask.

Four implementations, chosen by `attention(kind, ...)` (choose_attention: a pure function of
backend, dtype and features, with a logged reason for every fallback): the chunked einsum
path below (CPU's default; the only one besides splash with soft-capping),
jax.nn.dot_product_attention's XLA path ("xla"), its cuDNN flash attention ("cudnn": GPU,
bfloat16/float16; auto's GPU pick) and Pallas splash attention ("splash": TPU; auto's pick there).
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


ATTENTION_KINDS = ("auto", "xla", "cudnn", "splash", "chunked")
PREFERRED = {"gpu": "cudnn", "tpu": "splash"}  # auto's pick by backend (else chunked)
CUDNN_DTYPES = ("bfloat16", "float16")
SPLASH_BLOCKS = (512, 256, 128)  # splash's q / kv tile sizes; L must be a multiple of one
_log = logging.getLogger(__name__)
_LOGGED: set[str] = set()


def _fallback(backend: str, dtype: str, softcap: bool) -> str:
    """The best path other than splash for these features: chunked is the only one with soft-capping."""
    if softcap:
        return "chunked"
    if backend == "gpu" and dtype in CUDNN_DTYPES:
        return "cudnn"
    return "chunked" if backend == "cpu" else "xla"


def choose_attention(
    kind: str, *, backend: str, dtype: str = "float32", softcap: bool = False, length: int | None = None
) -> tuple[str, str | None]:
    """(implementation, reason): what attention `kind` runs as, and why it is not what was asked
    (None when it is). A pure function of the backend ("cpu" / "gpu" / "tpu"), q's dtype, whether
    scores are soft-capped and the sequence length (None: not known yet).

    auto asks for the backend's fastest path: cudnn on GPU, splash on TPU, chunked on CPU.
    cudnn (cuDNN flash attention through jax.nn.dot_product_attention): GPU, bfloat16/float16,
    no soft-cap. splash (Pallas TPU splash attention): TPU, L a multiple of 128; it soft-caps.
    xla (jax.nn.dot_product_attention's XLA path): anywhere, no soft-cap. chunked: anything.
    A path that cannot run falls back to the best one that can (soft-cap: chunked).

    >>> choose_attention("auto", backend="gpu", dtype="bfloat16")
    ('cudnn', None)
    >>> choose_attention("cudnn", backend="gpu", dtype="float32")
    ('xla', 'cudnn attention needs bfloat16 or float16, not float32')
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention={kind!r}; use one of {ATTENTION_KINDS}")
    dtype = jnp.dtype(dtype).name
    want = PREFERRED.get(backend, "chunked") if kind == "auto" else kind
    reason = None
    if want == "splash":
        if backend != "tpu":
            reason = f"splash attention runs on TPU only, not {backend}"
        elif length is not None and length % SPLASH_BLOCKS[-1]:
            reason = f"splash attention needs a sequence length that is a multiple of 128, not {length}"
        if reason:
            return _fallback(backend, dtype, softcap), reason
    elif want == "cudnn":
        if backend != "gpu":
            reason = f"cudnn attention runs on GPU only, not {backend}"
        elif dtype not in CUDNN_DTYPES:
            reason = f"cudnn attention needs bfloat16 or float16, not {dtype}"
        elif softcap:
            reason = "cudnn attention has no attention logit soft-capping"
        if reason:
            return ("chunked" if softcap else "xla"), reason
    elif want == "xla" and softcap:
        return "chunked", "attention logit soft-capping is not supported by jax.nn.dot_product_attention"
    return want, None


def resolve_attention(
    kind: str,
    softcap: float | None = None,
    backend: str | None = None,
    dtype: str = "float32",
    length: int | None = None,
) -> str:
    """choose_attention's implementation for the current backend (default), logging the reason
    for a fallback once per distinct reason (logging.warning)."""
    impl, reason = choose_attention(
        kind, backend=backend or jax.default_backend(), dtype=dtype, softcap=softcap is not None, length=length
    )
    if reason is not None:
        _log_once(f"attention={kind}: {reason}; using the {impl} path")
    return impl


def _log_once(message: str) -> None:
    """logging.warning, once per distinct message."""
    if message not in _LOGGED:
        _LOGGED.add(message)
        _log.warning("%s", message)


def dot_product_attention(
    q_BxKVxLxGxE: jax.Array,
    k_BxKVxLxE: jax.Array,
    v_BxKVxLxE: jax.Array,
    *,
    window: int | jax.Array | None,
    implementation: str,
    local_window: int | None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """causal_attention through jax.nn.dot_product_attention's `implementation` ("xla",
    "cudnn", None: jax's default). A static window is local_window_size=(W - 1, 0); a traced
    one a boolean mask on XLA, else lax.cond between local_window's kernel and the causal one.
    segment_ids: a boolean [B, 1, L, L] same-segment mask, and-ed with the window's."""
    b, kh, l, g, e = q_BxKVxLxGxE.shape
    q_BxLxHxE = jnp.moveaxis(q_BxKVxLxGxE, 2, 1).reshape(b, l, kh * g, e)
    k_BxLxKVxE, v_BxLxKVxE = jnp.moveaxis(k_BxKVxLxE, 2, 1), jnp.moveaxis(v_BxKVxLxE, 2, 1)

    same = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]

    def run(local, mask=None):
        if same is not None:
            mask = same if mask is None else mask & same
        return jax.nn.dot_product_attention(
            q_BxLxHxE,
            k_BxLxKVxE,
            v_BxLxKVxE,
            mask=mask,
            scale=1.0,
            is_causal=True,
            local_window_size=local,
            implementation=implementation,
        )

    if window is None or isinstance(window, int):
        o_BxLxHxE = run(None if window is None else (window - 1, 0))
    elif implementation == "xla":  # traced window: a boolean [L, L] mask
        i, m = jnp.arange(l)[:, None], jnp.arange(l)[None, :]
        o_BxLxHxE = run(None, (m > i - window)[None, None])
    else:  # cuDNN builds its mask from static sizes: one kernel per layer kind
        o_BxLxHxE = jax.lax.cond(window == _static(local_window), lambda: run((local_window - 1, 0)), lambda: run(None))
    return jnp.moveaxis(o_BxLxHxE.reshape(b, l, kh, g, e), 1, 2)


def _static(local_window: int | None) -> int:
    if local_window is None:
        raise ValueError("a traced window needs local_window (the sliding layers' static window)")
    return local_window


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
    return dot_product_attention(
        q_BxKVxLxGxE,
        k_BxKVxLxE,
        v_BxKVxLxE,
        window=window,
        implementation="xla",
        local_window=None,
        segment_ids=segment_ids,
    )


def cudnn_attention(
    q_BxKVxLxGxE: jax.Array,
    k_BxKVxLxE: jax.Array,
    v_BxKVxLxE: jax.Array,
    *,
    window: int | jax.Array | None = None,
    local_window: int | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """xla_attention with implementation="cudnn" (cuDNN flash attention; GPU, bf16/fp16).

    A traced window (mixed layer kinds) selects between the local_window kernel and the plain
    causal one with lax.cond: cuDNN takes its window as a static size. segment_ids: the
    same-segment mask [B, 1, L, L], which jax hands cuDNN as an additive bias (B L^2 values
    of q's dtype: 64 MB for 8 rows of 2,048 in bfloat16).
    """
    return dot_product_attention(
        q_BxKVxLxGxE,
        k_BxKVxLxE,
        v_BxKVxLxE,
        window=window,
        implementation="cudnn",
        local_window=local_window,
        segment_ids=segment_ids,
    )


def splash_attention(
    q_BxKVxLxGxE: jax.Array,
    k_BxKVxLxE: jax.Array,
    v_BxKVxLxE: jax.Array,
    *,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    local_window: int | None = None,
    segment_ids: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """causal_attention through Pallas TPU splash attention (same arguments, same result).

    The mask is CausalMask, or LocalMask((W - 1, 0)) for a window W (causal too); soft-capping
    is the kernel's attn_logits_soft_cap. One kernel per batch row (vmap), query head
    h = kv * G + g reads kv head h // G (splash's MHA with fewer kv heads). A traced window
    selects the local_window kernel or the causal one with lax.cond. segment_ids (int [B, L]):
    the kernel's own SegmentIds, and-ed with the mask (blocks stay skipped by the static mask
    only). interpret=True runs the kernel in the Pallas interpreter (CPU; the tests). L must
    be a multiple of 128.

    PERF: under a multi-device jit the kernel is not partitioned by GSPMD (a Pallas call):
    its inputs are gathered to each device. Wrap it in shard_map over the batch / heads axes
    for pods.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, kh, l, g, e = q_BxKVxLxGxE.shape
    block = next((s for s in SPLASH_BLOCKS if l % s == 0), None)
    if block is None:
        raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, not {l}")
    q_BxHxLxE = jnp.moveaxis(q_BxKVxLxGxE, 3, 2).reshape(b, kh * g, l, e)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )

    def run(w):
        mask = sa.CausalMask((l, l)) if w is None else sa.LocalMask((l, l), (w - 1, 0), 0)
        kernel = sa.make_splash_mha(
            sa.MultiHeadMask([mask] * (kh * g)),
            block_sizes=sizes,
            head_shards=1,
            q_seq_shards=1,
            attn_logits_soft_cap=softcap,
            interpret=interpret,
        )
        if segment_ids is None:
            return jax.vmap(kernel)(q_BxHxLxE, k_BxKVxLxE, v_BxKVxLxE)
        segments = lambda q, k, v, seg: kernel(q, k, v, segment_ids=sa.SegmentIds(q=seg, kv=seg))
        return jax.vmap(segments)(q_BxHxLxE, k_BxKVxLxE, v_BxKVxLxE, segment_ids)

    if window is None or isinstance(window, int):
        o_BxHxLxE = run(window)
    else:
        w = _static(local_window)
        o_BxHxLxE = jax.lax.cond(window == w, lambda: run(w), lambda: run(None))
    return jnp.moveaxis(o_BxHxLxE.reshape(b, kh, g, l, e), 3, 2)


def attention(
    kind: str,
    q_BxKVxLxGxE: jax.Array,
    k_BxKVxLxE: jax.Array,
    v_BxKVxLxE: jax.Array,
    *,
    window: int | jax.Array | None = None,
    softcap: float | None = None,
    local_window: int | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Causal attention by implementation kind (resolve_attention for this backend, q's dtype,
    soft-cap and length); [B, KV, L, G, E] out. local_window: the static size a traced
    `window` takes on sliding layers (cudnn and splash build one kernel per mask).
    segment_ids (int [B, L], optional): attend only within a segment (document masking), on
    every path (splash: its SegmentIds; xla and cudnn: a same-segment mask)."""
    impl = resolve_attention(kind, softcap, dtype=q_BxKVxLxGxE.dtype, length=q_BxKVxLxGxE.shape[2])
    q, k, v = q_BxKVxLxGxE, k_BxKVxLxE, v_BxKVxLxE
    if impl == "xla":
        return xla_attention(q, k, v, window=window, segment_ids=segment_ids)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, window=window, local_window=local_window, segment_ids=segment_ids)
    if impl == "splash":
        return splash_attention(
            q, k, v, window=window, softcap=softcap, local_window=local_window, segment_ids=segment_ids
        )
    return causal_attention(q, k, v, window=window, softcap=softcap, segment_ids=segment_ids)
