"""The teacher store's entry codec: pure numpy, no I/O (store/teacher_store.py lays the result out).

Letters: b rows of a block, L positions per row, K slots per position, C = L*K packed slots
per row, V vocabulary.

Encoding (lossless): the entries of a position are sorted by frequency rank (`rank_table`;
identity if there is none) and stored as gaps: the first as its rank, the next ones as
rank - previous rank - 1 (>= 0). Each row's positions are concatenated ("packed") at the front
of its C slots, the rest is 0; num_ids says where a position's entries start. Counts are stored
as c - 1, except the first entry of each position, stored as 0 and restored as N - sum(others).

    >>> ids = np.array([[[7, 2, 0], [5, 0, 0]]])   # b=1, L=2, K=N=3
    >>> counts = np.array([[[1, 2, 0], [3, 0, 0]]])
    >>> enc = encode(ids, counts, None, vocab_size=10, id_to_rank=None, split="train", start_row=0)
    >>> enc["num_ids"].tolist(), enc["ids"].tolist(), enc["counts"].tolist()
    ([[2, 1]], [[2, 4, 5, 0, 0, 0]], [[0, 0, 0, 0, 0, 0]])
    >>> dec = decode(enc["num_ids"], enc["ids"], enc["counts"], None, k=3, vocab_size=10,
    ...              rank_to_id=None, where="store/train")
    >>> dec["ids"].tolist(), dec["counts"].tolist()
    ([[[2, 7, 0], [5, 0, 0]]], [[[2, 1, 0], [3, 0, 0]]])
"""

from __future__ import annotations

import numpy as np

from rskd_jax.store.common import StoreError

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64 with full avalanche), elementwise."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def token_hash(tokens_BxL: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of tokens: int [B, L] -> uint64 [B] (ids taken as int32).

    h = mix(L xor sum_i mix(i << 32 | uint32(token_i)) mod 2^64), mix = splitmix64's
    finaliser: every (position, token) pair is hashed on its own, so any change of a token,
    of the order or of the length changes h except with probability ~2^-64. Vectorised
    numpy (wrapping uint64 arithmetic), ~10 passes over the tokens.

    >>> h = token_hash(np.array([[1, 2, 3], [1, 2, 3], [3, 2, 1]]))
    >>> h.dtype.name, bool(h[0] == h[1]), bool(h[0] == h[2])
    ('uint64', True, False)
    """
    x = np.asarray(tokens_BxL)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"token_hash takes integer tokens [B, L], got {x.dtype} {list(x.shape)}")
    length = x.shape[1]
    token = x.astype(np.int64).astype(np.uint64) & np.uint64(0xFFFFFFFF)  # int32 bits as uint32
    v_BxL = _mix64(token | (np.arange(length, dtype=np.uint64) << np.uint64(32)))
    return _mix64(v_BxL.sum(axis=1, dtype=np.uint64) ^ np.uint64(length))


def uint_for(max_value: int) -> np.dtype:
    """The smallest of uint8/16/32 holding [0, max_value].

    >>> uint_for(255).name, uint_for(256).name
    ('uint8', 'uint16')
    """
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise StoreError(f"value range {max_value} does not fit in uint32")


def rank_table(id_frequencies: np.ndarray, vocab_size: int) -> np.ndarray:
    """rank -> id int32 [V], most frequent first; ties by id (a stable sort, so deterministic).

    >>> rank_table(np.array([1, 5, 0, 5]), 4).tolist()
    [1, 3, 0, 2]
    """
    freq = np.asarray(id_frequencies)
    if freq.shape != (vocab_size,) or not np.all(np.isfinite(freq)) or np.any(freq < 0):
        raise StoreError(
            f"id_frequencies must be {vocab_size} finite non-negative numbers "
            f"(e.g. np.bincount(tokens.ravel(), minlength={vocab_size})), got shape {freq.shape}"
        )
    return np.argsort(-freq.astype(np.float64), kind="stable").astype(np.int32)


def invert_rank_table(rank_to_id: np.ndarray) -> np.ndarray:
    """id -> rank int64 [V], the inverse permutation of `rank_table`'s."""
    id_to_rank = np.empty(rank_to_id.shape[0], np.int64)
    id_to_rank[rank_to_id] = np.arange(rank_to_id.shape[0])
    return id_to_rank


def first_bad(bad: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first True of `bad` (row-major), or None."""
    hits = np.argwhere(bad)
    return tuple(int(i) for i in hits[0]) if len(hits) else None


def locate(split: str, start_row: int, idx: tuple[int, ...]) -> str:
    """Names an index (row, position, slot) of a block written at `start_row`, for errors.

    >>> locate("train", 8, (1, 4, 2))
    "split 'train' row 9 position 4 slot 2"
    """
    return (
        f"split {split!r} row {start_row + idx[0]}"
        + (f" position {idx[1]}" if len(idx) > 1 else "")
        + (f" slot {idx[2]}" if len(idx) > 2 else "")
    )


def pack(values_BxLxK: np.ndarray, present_BxLxK: np.ndarray, used_BxC: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Each row's present entries (a prefix of every position), in row-major [L, K] order, at
    the front of its L*K slots (used_BxC marks them); the rest is 0. [b, L, K] -> [b, L*K]."""
    out_BxC = np.zeros(used_BxC.shape, dtype)
    out_BxC[used_BxC] = values_BxLxK[present_BxLxK]
    return out_BxC


def unpack(x_BxC: np.ndarray, valid_BxLxK: np.ndarray, used_BxC: np.ndarray, dtype: type) -> np.ndarray:
    """`pack`'s inverse: [b, L*K] -> [b, L, K], the slots outside valid_BxLxK 0."""
    dense_BxLxK: np.ndarray = np.zeros(valid_BxLxK.shape, dtype)
    dense_BxLxK[valid_BxLxK] = x_BxC[used_BxC]
    return dense_BxLxK


def encode(
    ids_BxLxK: np.ndarray,
    counts_BxLxK: np.ndarray | None,
    weights_BxLxK: np.ndarray | None,
    *,
    vocab_size: int,
    id_to_rank: np.ndarray | None,
    split: str,
    start_row: int,
    dtypes: dict[str, np.dtype] | None = None,
) -> dict[str, np.ndarray]:
    """Validates and encodes a block of entries: -> num_ids [b, L], ids [b, L*K] (gaps),
    counts [b, L*K] (c - 1, first 0; if counts given), weights float32 [b, L*K] (if given).

    counts (method sample, N = K draws: each position sums to K) or weights (> 0 marks an
    entry) or both (weights > 0 only where counts > 0). Empty slots' ids are ignored.
    id_to_rank: `invert_rank_table(table)` or None (identity). dtypes: the stored dtypes of
    num_ids / ids / counts (default `uint_for` of K, V - 1, K - 1). Raises StoreError naming
    split, row (start_row + block index), position and slot of the first invalid entry.
    """
    b, length, k = ids_BxLxK.shape
    dtypes = dtypes or {"num_ids": uint_for(k), "ids": uint_for(vocab_size - 1), "counts": uint_for(k - 1)}
    where = lambda idx: locate(split, start_row, idx)
    ids = ids_BxLxK.astype(np.int64)
    if counts_BxLxK is None and weights_BxLxK is None:
        raise StoreError("encode needs counts or weights (or both)")
    if counts_BxLxK is not None:
        counts = counts_BxLxK.astype(np.int64)
        if (bad := first_bad(counts < 0)) is not None:
            raise StoreError(f"{where(bad)}: negative count {counts[bad]}")
        if (bad := first_bad(counts.sum(-1) != k)) is not None:
            raise StoreError(f"{where(bad)}: counts sum to {counts[bad].sum()}, expected N = {k}")
        present = counts > 0
    if weights_BxLxK is not None:
        weights = weights_BxLxK.astype(np.float32)
        if (bad := first_bad(~np.isfinite(weights) | (weights < 0))) is not None:
            raise StoreError(f"{where(bad)}: weight {weights[bad]} is not finite and >= 0")
        if counts_BxLxK is not None:
            if (bad := first_bad((weights > 0) & ~present)) is not None:
                raise StoreError(f"{where(bad)}: weight {weights[bad]} > 0 on a slot with count 0")
        else:
            present = weights > 0
    if (bad := first_bad(present & ((ids < 0) | (ids >= vocab_size)))) is not None:
        raise StoreError(f"{where(bad)}: id {ids[bad]} outside [0, {vocab_size})")
    # Sort each position's entries by rank, absent slots (key = V) last.
    key_t = np.int64 if vocab_size >= 2**31 - 1 else np.int32
    key = np.where(present, ids if id_to_rank is None else id_to_rank[np.where(present, ids, 0)], vocab_size).astype(
        key_t
    )
    order = np.argsort(key, axis=-1, kind="stable")
    key = np.take_along_axis(key, order, -1)
    num = present.sum(-1)
    present = np.arange(k) < num[..., None]  # sorted: a prefix of each position
    gaps: np.ndarray = key.copy()
    gaps[..., 1:] = gaps[..., 1:] - (key[..., :-1] + 1)
    if (bad := first_bad(present[..., 1:] & (gaps[..., 1:] < 0))) is not None:
        raise StoreError(f"{where(bad)}: id {np.take_along_axis(ids, order, -1)[bad]} appears twice")
    used = np.arange(length * k) < num.sum(-1)[:, None]
    out = {"num_ids": num.astype(dtypes["num_ids"]), "ids": pack(gaps, present, used, dtypes["ids"])}
    if counts_BxLxK is not None:
        c = np.take_along_axis(counts, order, -1) - 1
        c[..., 0] = 0  # restored on read as N - sum(others)
        out["counts"] = pack(c, present, used, dtypes["counts"])
    if weights_BxLxK is not None:
        out["weights"] = pack(np.take_along_axis(weights, order, -1), present, used, np.dtype(np.float32))
    return out


def decode(
    num_ids_BxL: np.ndarray,
    ids_BxC: np.ndarray,
    counts_BxC: np.ndarray | None,
    weights_BxC: np.ndarray | None,
    *,
    k: int,
    vocab_size: int,
    rank_to_id: np.ndarray | None,
    where: str,
) -> dict[str, np.ndarray]:
    """`encode`'s inverse, checked: -> ids int32 [b, L, K], num_ids int32 [b, L], weights float32
    [b, L, K] (stored, or counts / N), counts int32 [b, L, K] (if counts_BxC is given).

    Entries come in canonical order (ascending rank; ascending id when rank_to_id is None),
    empty slots last with id 0, weight 0, count 0. Raises StoreError "{where}: ... the store
    is corrupt" if num_ids, the ids or the counts are out of range.
    """
    b, length = num_ids_BxL.shape
    out: dict[str, np.ndarray] = {}
    if not b:
        z = np.zeros((0, length, k))
        out.update(ids=z.astype(np.int32), weights=z.astype(np.float32), num_ids=np.zeros((0, length), np.int32))
        if counts_BxC is not None:
            out["counts"] = z.astype(np.int32)
        return out
    n = num_ids_BxL
    if n.max() > k or (counts_BxC is not None and n.min() < 1):
        raise StoreError(f"{where}: num_ids outside [1, {k}]: the store is corrupt")
    # Packed order is row-major [L, K] order of the present slots, so two boolean masks
    # move entries between the packed [b, L*K] and the dense [b, L, K] layout.
    valid = np.arange(k) < n[..., None]
    used = np.arange(length * k) < n.sum(1, dtype=np.int64)[:, None]
    int_t = np.int64 if vocab_size > 2**30 else np.int32
    gaps = unpack(ids_BxC, valid, used, int_t)
    gaps[..., 1:] += valid[..., 1:]
    ranks = np.cumsum(gaps, axis=-1, dtype=int_t)  # non-decreasing: max is the largest valid rank
    if ranks.max() >= vocab_size:
        raise StoreError(f"{where}: decoded id outside [0, {vocab_size}): the store is corrupt")
    ids = ranks if rank_to_id is None else rank_to_id[ranks]
    out["ids"] = (ids * valid).astype(np.int32)
    out["num_ids"] = n.astype(np.int32)
    if counts_BxC is not None:
        counts = unpack(counts_BxC, valid, used, np.int32) + valid
        counts[..., 0] = k - counts[..., 1:].sum(-1)
        if counts[..., 0].min() < 1:
            raise StoreError(f"{where}: counts exceed N = {k}: the store is corrupt")
        out["counts"] = counts
        if weights_BxC is None:
            out["weights"] = counts.astype(np.float32) / np.float32(k)
    if weights_BxC is not None:
        out["weights"] = unpack(weights_BxC, valid, used, np.float32)
    return out
