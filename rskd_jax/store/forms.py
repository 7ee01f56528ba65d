"""Compact forms of decoded teacher rows for the host -> device copy: trimmed slots, flat entries.

`TeacherStore.read_rows` returns dense slots: ids / weights [b, L, K] with K = the store's
slot count (N = 50 draws -> 50 slots) although a position holds num_ids <= K entries (~12 at
N = 50 on real text), the rest id 0 / weight 0. Two lossless forms of the same targets:

  trimmed   ids, weights (and counts) [b, L, K'] with K' = the batch's largest num_ids
            rounded up to a multiple of `bucket` (so a jitted step compiles for at most
            K / bucket shapes). Any `sparse_kd_loss` consumer takes it unchanged: the cut
            slots all had weight 0.
  ragged    flat entries in (row, position, canonical) order: entry_pos [E] int32 (flat
            position b * L + l of the batch), entry_ids [E] int32, entry_weights [E] float32
            (and entry_counts [E] int32 for `sample` stores), E = sum(num_ids) rounded up to a
            multiple of `bucket` with padding entries (position 0, id 0, weight 0). Feeds
            `rskd_jax.losses.sparse_kd_loss_from_hidden_ragged`.

Other fields (num_ids, token_hash, diagnostics, tail_mass) pass through unchanged. Pure
numpy: importable with numpy (+ tensorstore for the store itself) only.

    rows = open_teacher_store(url).read_rows("train", idx)
    batch = trimmed(rows)        # or ragged(rows); or store.read_rows_as("train", idx, "ragged")
"""

from __future__ import annotations

import numpy as np

FORMS = ("dense", "trimmed", "ragged")
SLOT_FIELDS = ("ids", "weights", "counts")  # the per-slot [b, L, K] fields of read_rows


def _round_up(n: int, bucket: int) -> int:
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    return -(-n // bucket) * bucket


def trimmed(rows: dict[str, np.ndarray], *, bucket: int = 8) -> dict[str, np.ndarray]:
    """Slots cut to the batch's largest entry count, rounded up to `bucket` (at most K).

    >>> rows = {"ids": np.array([[[5, 7, 0, 0]]]), "weights": np.array([[[.5, .5, 0, 0]]]),
    ...         "num_ids": np.array([[2]])}
    >>> trimmed(rows, bucket=1)["ids"].tolist()
    [[[5, 7]]]
    """
    k = rows["ids"].shape[-1]
    n = rows["num_ids"]
    keep = min(k, _round_up(int(n.max()) if n.size else 0, bucket))
    return {name: (x[..., :keep] if name in SLOT_FIELDS else x) for name, x in rows.items()}


def ragged(rows: dict[str, np.ndarray], *, bucket: int = 1024) -> dict[str, np.ndarray]:
    """Flat entries: entry_pos / entry_ids / entry_weights [E] (+ entry_counts), see the module.

    >>> rows = {"ids": np.array([[[5, 7], [3, 0]]]), "weights": np.array([[[.5, .5], [1., 0]]]),
    ...         "num_ids": np.array([[2, 1]])}
    >>> r = ragged(rows, bucket=4)
    >>> r["entry_pos"].tolist(), r["entry_ids"].tolist(), r["entry_weights"].tolist()
    ([0, 0, 1, 0], [5, 7, 3, 0], [0.5, 0.5, 1.0, 0.0])
    """
    ids_BxLxK = rows["ids"]
    b, length, k = ids_BxLxK.shape
    valid_BxLxK = np.arange(k) < rows["num_ids"][..., None]  # entries are a prefix of the slots
    pos_BxLxK = np.broadcast_to(np.arange(b * length, dtype=np.int32).reshape(b, length, 1), ids_BxLxK.shape)
    e = int(valid_BxLxK.sum())
    size = _round_up(max(e, 1), bucket)
    out = {name: x for name, x in rows.items() if name not in SLOT_FIELDS}
    for name, src, dtype in (
        ("entry_pos", pos_BxLxK, np.int32),
        ("entry_ids", ids_BxLxK, np.int32),
        ("entry_weights", rows["weights"], np.float32),
        ("entry_counts", rows.get("counts"), np.int32),
    ):
        if src is None:
            continue
        flat = np.zeros(size, dtype)
        flat[:e] = src[valid_BxLxK]
        out[name] = flat
    return out


def to_form(rows: dict[str, np.ndarray], form: str, *, bucket: int | None = None) -> dict[str, np.ndarray]:
    """rows in `form` (one of FORMS); bucket: None = the form's default."""
    if form == "dense":
        return rows
    if form == "trimmed":
        return trimmed(rows, bucket=8 if bucket is None else bucket)
    if form == "ragged":
        return ragged(rows, bucket=1024 if bucket is None else bucket)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def nbytes_per_token(rows: dict[str, np.ndarray], fields: tuple[str, ...], tokens: int) -> float:
    """Bytes of `fields` (those present) per token: what a host -> device copy moves."""
    return sum(rows[f].nbytes for f in fields if f in rows) / tokens
