"""The teacher cache's jitted step: forward, mask, sample every output, diagnostics.

One teacher forward feeds every configured output (the forward is the cost), so comparing
methods never means re-running the teacher. Randomness depends only on (seed, split, row):

    key(row r of split s) = fold_in(fold_in(key(seed), s), r)

and each position is sampled on its own with fold_in(row key, position), so a store's bytes
do not depend on the batch size, the mesh or the number of processes.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from rskd_jax import sampling
from rskd_jax.config import OutputConfig

SPLIT_CODES = {"train": 0, "val": 1}
CHUNK_BYTES = 16 << 20  # float32 logits per lax.map iteration of the step


def split_code(split: str) -> int:
    """A stable small integer per split name (train 0, val 1, others hashed)."""
    if split in SPLIT_CODES:
        return SPLIT_CODES[split]
    return 2 + int.from_bytes(split.encode("utf-8")[:3].ljust(3, b"\0"), "little")


def row_keys(seed: int, split: int, rows_B: jax.Array) -> jax.Array:
    """One PRNG key per global row index: fold_in(fold_in(key(seed), split), row)."""
    base = jax.random.fold_in(jax.random.key(seed), split)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(rows_B.astype(jnp.uint32))


def mask_padded_vocab(logits_BxLxV: jax.Array, vocab_size: int) -> jax.Array:
    """-inf on model vocabulary rows beyond the tokenizer's (never sampled, zero mass)."""
    if logits_BxLxV.shape[-1] == vocab_size:
        return logits_BxLxV
    valid_V = jnp.arange(logits_BxLxV.shape[-1]) < vocab_size
    return jnp.where(valid_V, logits_BxLxV, -jnp.inf)


def position_keys(keys_B: jax.Array, seq_len: int) -> jax.Array:
    """[B] row keys -> [B, L] position keys fold_in(row_key, position)."""
    positions_L = jnp.arange(seq_len)
    return jax.vmap(lambda k: jax.vmap(lambda p: jax.random.fold_in(k, p))(positions_L))(keys_B)


def output_targets(out: OutputConfig, keys_xC: jax.Array, logits_xCxV: jax.Array,
                   vocab_size: int) -> dict[str, jax.Array]:
    """The arrays one output stores for positions [..., C] (position i sampled with keys_xC[i],
    so a position's targets depend on its key and logits alone). Logits of padded vocabulary
    rows (ids >= vocab_size) must already be -inf."""
    n = out.num_draws
    lead = logits_xCxV.shape[:-1]
    keys_P = keys_xC.reshape(-1)
    logits_PxV = logits_xCxV.reshape(-1, logits_xCxV.shape[-1])

    def per_position(fn):
        res = jax.vmap(fn)(keys_P, logits_PxV)
        return jax.tree.map(lambda a: a.reshape(*lead, *a.shape[1:]), res)

    if out.method == "sample":
        sc = per_position(lambda k, lg: sampling.sample_counts(k, lg, n, temperature=out.temperature))
        res = {"ids": sc.ids, "counts": sc.counts}
        if out.temperature != 1.0:  # importance weights t/q are no longer bare counts
            res["weights"] = sc.weights
        return res
    if out.method == "sample_wor":
        st = per_position(lambda k, lg: sampling.sample_tokens(
            k, lg, n, temperature=out.temperature, replace=False, normalize=out.normalize))
        return {"ids": st.ids, "weights": st.weights}
    if out.method == "top_k":
        st = sampling.top_k_targets(logits_xCxV, n, renormalize=out.renormalize)
        return {"ids": st.ids, "weights": st.weights}
    if out.method == "ghost":
        gt = sampling.ghost_targets(logits_xCxV, n)
        return {"ids": gt.ids, "weights": gt.probs, "tail_mass": gt.tail_mass}
    if out.method == "full":
        logprobs_xCxV = jax.nn.log_softmax(logits_xCxV, axis=-1)[..., :vocab_size]
        return {"logprobs": logprobs_xCxV.astype(jnp.float16)}
    raise ValueError(f"unknown method {out.method!r}")


def diagnostics(logits_xV: jax.Array, next_x: jax.Array) -> dict[str, jax.Array]:
    """Per position, float32: the teacher's log-prob of the next token ("gold_logprob"), its
    entropy in nats, and the log-partition "log_z" (NaN/inf iff a logit is NaN or +inf: the
    finiteness check).

    PERF: one exp pass over V (no log-softmax is materialised):
    H = log Z - sum_v e_v x_v / Z with e = exp(x - max), log t(y) = x_y - log Z.
    """
    m_x = jnp.max(logits_xV, axis=-1)
    e_xV = jnp.exp(logits_xV - m_x[..., None])
    z_x = jnp.sum(e_xV, axis=-1)
    log_z_x = m_x + jnp.log(z_x)
    entropy_x = log_z_x - jnp.sum(jnp.where(e_xV > 0, e_xV * logits_xV, 0.0), axis=-1) / z_x
    gold_x = jnp.take_along_axis(logits_xV, next_x[..., None], axis=-1)[..., 0] - log_z_x
    return {"gold_logprob": gold_x, "entropy": entropy_x, "log_z": log_z_x}


def position_chunk(seq_len: int, rows: int, vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Positions per row handled at once: the largest divisor C of seq_len whose float32
    logits [rows, C, V] fit in budget_bytes (at least 1)."""
    best = 1
    for c in range(1, seq_len + 1):
        if seq_len % c == 0 and rows * c * vocab * 4 <= budget_bytes:
            best = c
    return best


def make_step(graphdef: Any, outputs: Sequence[OutputConfig], *, seed: int, vocab_size: int,
              with_diagnostics: bool, chunk: int) -> Callable:
    """step(state, tokens_BxL, rows_B, split) -> {"finite": [B] bool, "<output>": {...},
    "diagnostics": {...}}; jit it with the shardings of the caller's mesh.

    PERF: the [B, L, V] logits are never materialised: the LM head, the samplers and the
    diagnostics run over `chunk` positions of every row at a time (lax.map). Buffers of a
    few MB stay in the allocator's cache; [B, L, V] ones are fresh mmaps whose page faults
    cost more than the math on CPU (x + 1 over 8 x 128 x 49,152 floats: 0.21 s at once,
    0.036 s as 8 row-sized pieces).
    """
    from flax import nnx

    def step(state, tokens_BxL, rows_B, split):
        model = nnx.merge(graphdef, state)
        h_BxLxD = model.hidden_states(tokens_BxL)
        w_DxV = model.lm_head_weight()
        B, L = tokens_BxL.shape
        n = L // chunk
        next_BxL = jnp.concatenate([tokens_BxL[:, 1:], tokens_BxL[:, -1:]], axis=1)
        keys_BxL = position_keys(row_keys(seed, split, rows_B), L)

        def to_chunks(a):  # [B, L, ...] -> [L/C, B, C, ...]
            return jnp.swapaxes(a.reshape(B, n, chunk, *a.shape[2:]), 0, 1)

        def from_chunks(a):  # [L/C, B, C, ...] -> [B, L, ...]
            return jnp.swapaxes(a, 0, 1).reshape(B, L, *a.shape[3:])

        def body(xs):
            h_BxCxD, keys_BxC, next_BxC = xs
            logits_BxCxV = jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
            logits_BxCxV = mask_padded_vocab(logits_BxCxV, vocab_size)
            res = {o.name: output_targets(o, keys_BxC, logits_BxCxV, vocab_size) for o in outputs}
            res["diagnostics"] = diagnostics(logits_BxCxV, next_BxC)
            return res

        res = jax.lax.map(body, (to_chunks(h_BxLxD), to_chunks(keys_BxL), to_chunks(next_BxL)))
        res = jax.tree.map(from_chunks, res)
        diag = res.pop("diagnostics")
        res["finite"] = jnp.all(jnp.isfinite(diag.pop("log_z")), axis=1)
        if with_diagnostics:  # the last position has no next token in its row: 0
            diag["gold_logprob"] = diag["gold_logprob"].at[:, -1].set(0.0)
            res["diagnostics"] = diag
        return res

    return step
