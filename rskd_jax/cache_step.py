"""The teacher cache's jitted step: forward, mask, sample every output, diagnostics.

One teacher forward feeds every configured output (the forward is the cost), so comparing
methods never means re-running the teacher. Randomness depends only on (seed, split, row):

    key(row r of split s) = fold_in(fold_in(key(seed), split_code(s)), r)

and each position is sampled on its own with fold_in(row key, position) (folded once more with
the output's `stream` when it is > 0: independent draws of the same positions).

Batch invariance by construction: the step runs the teacher on a fixed per-device micro-batch
of `device_batch` rows (a lax.map over the rows each device holds), so every forward has the
same shape whatever `cache.batch_size`, the data-parallel width or the process count, and
rounds the same way. A store's bytes depend on the tokens, teacher, outputs, seed,
device_batch and the fsdp/tensor layout (which reorder the matmuls' reductions), nothing else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rskd_jax import sampling
from rskd_jax.config import OutputConfig

SPLIT_CODES = {"train": 0, "val": 1}
CHUNK_BYTES = 16 << 20  # float32 logits per lax.map iteration where the device has no memory figure (CPU)
MAX_CHUNK_BYTES = 1 << 30
MEMORY_FRACTION = 64  # the logits chunk's share of device memory (the samplers hold a few copies)
KEY_RULE = (
    "fold_in(fold_in(key(seed), split_code), row), then fold_in(position); split_code: "
    "train 0, val 1, any other name the first 4 bytes (little-endian) of sha256(name)"
)


def split_code(split: str) -> int:
    """A stable 32-bit code per split name: train 0, val 1, any other name a 32-bit hash.

    >>> split_code("train"), split_code("val"), split_code("val_stdlib") != split_code("val_docs")
    (0, 1, True)
    """
    if split in SPLIT_CODES:
        return SPLIT_CODES[split]
    return int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:4], "little")


def check_split_codes(splits: Iterable[str]) -> dict[str, int]:
    """{split: code} for the splits of one store; ValueError if two of them share a code (their
    rows would share PRNG keys)."""
    codes: dict[int, str] = {}
    for split in splits:
        code = split_code(split)
        if code in codes and codes[code] != split:
            raise ValueError(
                f"splits {codes[code]!r} and {split!r} hash to the same key code {code}; rename one of them"
            )
        codes[code] = split
    return {split: code for code, split in codes.items()}


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


def output_targets(
    out: OutputConfig,
    keys_xC: jax.Array,
    logits_xCxV: jax.Array,
    vocab_size: int,
    tree_P: sampling.MassTree | None = None,
) -> dict[str, jax.Array]:
    """The arrays one output stores for positions [..., C] (position i sampled with keys_xC[i],
    so a position's targets depend on its key and logits alone). Logits of padded vocabulary
    rows (ids >= vocab_size) must already be -inf. tree_P: the positions' sampling trees at
    temperature 1 (vmap(sampling.mass_tree) of the flattened logits), reused by the `sample`
    and `systematic` outputs at temperature 1 (the same draws as without it)."""
    n = out.num_draws
    lead = logits_xCxV.shape[:-1]
    keys_P = keys_xC.reshape(-1)
    if out.stream:  # an independent draw stream of the same positions
        keys_P = jax.vmap(lambda k: jax.random.fold_in(k, out.stream))(keys_P)
    logits_PxV = logits_xCxV.reshape(-1, logits_xCxV.shape[-1])

    def per_position(fn, data=logits_PxV):
        res = jax.vmap(fn)(keys_P, data)
        return jax.tree.map(lambda a: a.reshape(*lead, *a.shape[1:]), res)

    shared = tree_P is not None and out.temperature == 1.0
    if out.method == "sample":
        if shared:
            sc = per_position(lambda k, t: sampling.sample_counts_from_tree(k, t, n), tree_P)
        else:
            sc = per_position(lambda k, lg: sampling.sample_counts(k, lg, n, temperature=out.temperature))
        res = {"ids": sc.ids, "counts": sc.counts}
        if out.temperature != 1.0:  # importance weights t/q are no longer bare counts
            res["weights"] = sc.weights
        return res
    if out.method == "systematic":
        if shared:
            sc = per_position(lambda k, t: sampling.systematic_counts_from_tree(k, t, n), tree_P)
        else:
            sc = per_position(lambda k, lg: sampling.systematic_counts(k, lg, n, temperature=out.temperature))
        res = {"ids": sc.ids, "counts": sc.counts}
        if out.temperature != 1.0:
            res["weights"] = sc.weights
        return res
    if out.method == "head_tail":
        st = per_position(lambda k, lg: sampling.head_tail_targets(k, lg, out.head, n, temperature=out.temperature))
        return {"ids": st.ids, "weights": st.weights}
    if out.method == "sample_wor":
        st = per_position(
            lambda k, lg: sampling.sample_tokens(
                k, lg, n, temperature=out.temperature, replace=False, normalize=out.normalize
            )
        )
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


def diagnostics(
    logits_xV: jax.Array, next_x: jax.Array, tree_P: sampling.MassTree | None = None
) -> dict[str, jax.Array]:
    """Per position, float32: the teacher's log-prob of the next token ("gold_logprob"), its
    entropy in nats, and the log-partition "log_z" (NaN/inf iff a logit is NaN or +inf: the
    finiteness check). tree_P: the positions' sampling trees (vmap(sampling.mass_tree) of the
    flattened logits), built here if None.

    PERF: from the sampling tree, whose one pass over V after the max also sums
    e_v x_v (e = exp(x - max)): H = log Z - sum_v e_v x_v / Z, log t(y) = x_y - log Z. The
    cache step builds the tree once for these and its temperature-1 samplers.
    """
    lead = logits_xV.shape[:-1]
    logits_PxV = logits_xV.reshape(-1, logits_xV.shape[-1])
    if tree_P is None:
        tree_P = jax.vmap(sampling.mass_tree)(logits_PxV)
    log_z_P = tree_P.log_z
    entropy_P = log_z_P - tree_P.moment / tree_P.root
    gold_P = jnp.take_along_axis(logits_PxV, next_x.reshape(-1, 1), axis=-1)[:, 0] - log_z_P
    out = {"gold_logprob": gold_P, "entropy": entropy_P, "log_z": log_z_P}
    return {k: v.reshape(lead) for k, v in out.items()}


def position_chunk(seq_len: int, rows: int, vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Positions per row handled at once: the largest divisor C of seq_len whose float32
    logits [rows, C, V] fit in budget_bytes (at least 1)."""
    best = 1
    for c in range(1, seq_len + 1):
        if seq_len % c == 0 and rows * c * vocab * 4 <= budget_bytes:
            best = c
    return best


def logits_budget(bytes_limit: int | None, override_mb: float = 0.0) -> int:
    """Bytes of float32 logits per LM-head iteration: override_mb when > 0, else bytes_limit /
    MEMORY_FRACTION clipped to [CHUNK_BYTES, MAX_CHUNK_BYTES], CHUNK_BYTES when the device
    reports no limit (CPU).

    >>> logits_budget(141 << 30) == MAX_CHUNK_BYTES, logits_budget(16 << 30) >> 20, logits_budget(None) >> 20
    (True, 256, 16)
    """
    if override_mb < 0:
        raise ValueError(f"cache.logits_chunk_mb={override_mb} must be >= 0 (0: from the device's memory)")
    if override_mb > 0:
        return max(1, int(override_mb * (1 << 20)))
    if not bytes_limit:
        return CHUNK_BYTES
    return int(min(MAX_CHUNK_BYTES, max(CHUNK_BYTES, bytes_limit // MEMORY_FRACTION)))


def device_bytes_limit(device: Any) -> int | None:
    """The device's memory limit (memory_stats()["bytes_limit"]), None where it has none (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def lm_head_once(graphdef: Any, state: Any, devices: Iterable[Any]) -> jax.Array | None:
    """The model's lm_head_weight() [D, V] as an array of its own where the devices are CPUs,
    for the step's `head_DxV`; None elsewhere (the step then takes it from the state).

    PERF: CPU XLA feeds its matmul a row-major [D, V] right-hand side, so a step that
    transposes the [V, D] embedding copies it into a fresh buffer on every call (V x D floats:
    600 MB at V = 262,144, D = 576), pays its page faults, and frees it after the step. Kept
    here, the step's logits are the same bit for bit and the step 13% / 10% faster at
    V = 151,936 / 262,144 (4-layer d = 576 teacher, 4 x 128 tokens, step + fetch, interleaved
    medians of 3).
    The price: the [D, V] copy stays in memory between steps, as it stood during each one.
    Accelerators read the transposed operand in place: nothing is kept there.
    """
    if not all(d.platform == "cpu" for d in devices):
        return None
    from flax import nnx

    return jax.jit(lambda s: nnx.merge(graphdef, s).lm_head_weight())(state)


def make_step(
    graphdef: Any,
    outputs: Sequence[OutputConfig],
    *,
    seed: int,
    vocab_size: int,
    with_diagnostics: bool,
    device_batch: int,
    batch_shards: int = 1,
    batch_sharding: Any = None,
    positions: int | None = None,
) -> Callable:
    """step(state, tokens_BxL, rows_B, split, docs=None, head_DxV=None) -> {"finite": [B] bool,
    "<output>": {...}, "diagnostics": {...}}; jit it with the shardings of the caller's mesh.
    docs: {} / None, or {"segment_ids", "positions"} int32 [B, L] (document masking,
    rskd_jax.documents). head_DxV: the model's lm_head_weight(), if the caller keeps it
    (`lm_head_once`); None: taken from the state in the step.

    The B rows are split over `batch_shards` devices (contiguous blocks, as the batch sharding
    lays them out); each device runs the teacher on `device_batch` of its rows at a time
    (lax.map), so B must be a multiple of batch_shards * device_batch. `batch_sharding`
    (a NamedSharding of the micro-batch's leading axis, e.g. sharding.batch_sharding(mesh, 2))
    pins each micro-batch to the devices that hold its rows. `positions`: positions per row
    per LM-head iteration (a divisor of L; None: position_chunk(L, device_batch, V)).

    PERF: the [B, L, V] logits are never materialised: the LM head, the samplers and the
    diagnostics run over a chunk of positions of every row at a time (lax.map, float32
    logits of ~logits_budget bytes per device: few iterations on a large-memory accelerator,
    16 MB on CPU). Buffers of a few MB stay in the allocator's cache;
    [B, L, V] ones are fresh mmaps whose page faults cost more than the math on CPU (x + 1
    over 8 x 128 x 49,152 floats: 0.21 s at once, 0.036 s as 8 row-sized pieces).
    """
    from flax import nnx

    def micro_step(model, w_DxV, tokens_BxL, keys_BxL, docs):
        h_BxLxD = model.hidden_states(tokens_BxL, docs.get("segment_ids"), docs.get("positions"))
        B, L = tokens_BxL.shape
        chunk = positions or position_chunk(L, device_batch, w_DxV.shape[-1])
        if L % chunk:
            raise ValueError(f"positions={chunk} does not divide the sequence length {L}")
        n = L // chunk
        next_BxL = jnp.concatenate([tokens_BxL[:, 1:], tokens_BxL[:, -1:]], axis=1)

        def to_chunks(a):  # [B, L, ...] -> [L/C, B, C, ...]
            return jnp.swapaxes(a.reshape(B, n, chunk, *a.shape[2:]), 0, 1)

        def from_chunks(a):  # [L/C, B, C, ...] -> [B, L, ...]
            return jnp.swapaxes(a, 0, 1).reshape(B, L, *a.shape[3:])

        def body(xs):
            h_BxCxD, keys_BxC, next_BxC = xs
            logits_BxCxV = model.logits_from_hidden(h_BxCxD, w_DxV)  # + the final soft-cap (Gemma 2)
            logits_BxCxV = mask_padded_vocab(logits_BxCxV, vocab_size)
            # the temperature-1 sampling trees: one pass over V for the diagnostics and samplers
            tree_P = jax.vmap(sampling.mass_tree)(logits_BxCxV.reshape(-1, logits_BxCxV.shape[-1]))
            res = {o.name: output_targets(o, keys_BxC, logits_BxCxV, vocab_size, tree_P) for o in outputs}
            res["diagnostics"] = diagnostics(logits_BxCxV, next_BxC, tree_P)
            return res

        res = jax.lax.map(body, (to_chunks(h_BxLxD), to_chunks(keys_BxL), to_chunks(next_BxL)))
        return jax.tree.map(from_chunks, res)

    def step(state, tokens_BxL, rows_B, split, docs=None, head_DxV=None):
        docs = docs or {}
        model = nnx.merge(graphdef, state)
        w_DxV = model.lm_head_weight() if head_DxV is None else head_DxV
        B, L = tokens_BxL.shape
        if B % (batch_shards * device_batch):
            raise ValueError(
                f"{B} rows do not split into {batch_shards} devices x micro-batches of device_batch={device_batch}"
            )
        m = B // (batch_shards * device_batch)
        keys_BxL = position_keys(row_keys(seed, split, rows_B), L)

        def to_micro(a):  # [B, ...] -> [m, shards * db, ...]: micro-batch j = rows j*db.. of every shard
            a = a.reshape(batch_shards, m, device_batch, *a.shape[1:])
            a = jnp.swapaxes(a, 0, 1).reshape(m, batch_shards * device_batch, *a.shape[3:])
            if batch_sharding is not None:
                a = jax.lax.with_sharding_constraint(
                    a,
                    jax.sharding.NamedSharding(
                        batch_sharding.mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec[:1])
                    ),
                )
            return a

        def from_micro(a):  # inverse of to_micro
            a = a.reshape(m, batch_shards, device_batch, *a.shape[2:])
            return jnp.swapaxes(a, 0, 1).reshape(B, *a.shape[3:])

        micro = (to_micro(tokens_BxL), to_micro(keys_BxL), jax.tree.map(to_micro, docs))
        res = jax.lax.map(lambda xs: micro_step(model, w_DxV, *xs), micro)
        res = jax.tree.map(from_micro, res)
        diag = res.pop("diagnostics")
        res["finite"] = jnp.all(jnp.isfinite(diag.pop("log_z")), axis=1)
        if with_diagnostics:  # the last position has no next token in its row: 0
            diag["gold_logprob"] = diag["gold_logprob"].at[:, -1].set(0.0)
            res["diagnostics"] = diag
        return res

    return step
