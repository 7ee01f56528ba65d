"""A grain RandomAccessDataSource over a token store joined with its teacher store.

The only module of rskd_jax.store that imports grain (the readers need numpy and tensorstore
only). Record i is row i of `split`: the tokens the teacher saw and the teacher's targets,

    {"tokens": int32 [L], "ids": int32 [L, K], "weights": float32 [L, K], "num_ids": int32 [L],
     + "counts" (sample stores), "index": int64 (the row)}

read with one batched TensorStore read per array when grain asks for several records
(`_getitems`, grain's batched-read protocol). Every read checks that the tokens are the
ones the teacher's targets were computed on: the teacher store's manifest must name this
token store's content fingerprint and seq_len (checked once, at construction), and each row's
`token_hash` (stores written with token_hash=True, as the cache program writes them) must
equal `token_hash(tokens)`; a mismatch raises TokenMismatch naming the row.

    import grain
    from rskd_jax.store import forms
    from rskd_jax.store.grain_source import TeacherSource

    src = TeacherSource(tokens_url, teacher_url, "train")
    ds = (grain.MapDataset.source(src).shuffle(seed=0).batch(8)
          .map(lambda b: forms.to_form(b, "ragged")))   # or "trimmed", or dense as is
    for batch in ds.to_iter_dataset(): ...

Batches stacked by grain keep the dense [b, L, K] slots; `forms.trimmed` / `forms.ragged`
then cut what the host -> device copy moves (see store/forms.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain  # noqa: F401  (this module is the grain adapter; fail here if grain is missing)
import numpy as np

from rskd_jax.store.common import StoreError
from rskd_jax.store.teacher import open_teacher_store, token_hash
from rskd_jax.store.tokens import open_token_store

TARGET_FIELDS = ("ids", "weights", "num_ids", "counts", "tail_mass", "gold_logprob", "entropy")


class TokenMismatch(StoreError):
    """The tokens of a row are not the ones the teacher store's targets were computed on."""


class TeacherSource:
    """grain RandomAccessDataSource: row i of `split` = tokens joined with teacher targets.

    tokens / teacher: store URLs (or already opened stores). fields: the teacher fields each
    record carries (default: ids, weights, num_ids and counts where the store has them).
    """

    def __init__(self, tokens: Any, teacher: Any, split: str, *, fields: Sequence[str] | None = None):
        self.tokens = open_token_store(tokens) if isinstance(tokens, str) else tokens
        self.teacher = open_teacher_store(teacher) if isinstance(teacher, str) else teacher
        self.split = split
        self._check_manifests()
        have = set(self.teacher.arrays(split))
        have |= {"weights"} if "counts" in have or "weights" in have else set()
        self.fields = (
            tuple(fields)
            if fields is not None
            else tuple(f for f in ("ids", "weights", "num_ids", "counts") if f in have)
        )
        unknown = [f for f in self.fields if f not in TARGET_FIELDS]
        if unknown:
            raise StoreError(f"fields {unknown} are not teacher fields; choose from {TARGET_FIELDS}")
        self._hashed = "token_hash" in have
        self._len = self.teacher.num_rows(split)
        if self._len > self.tokens.num_rows(split):
            raise TokenMismatch(
                f"teacher store {self.teacher.url} has {self._len} {split} rows, the "
                f"token store {self.tokens.url} only {self.tokens.num_rows(split)}"
            )

    def _check_manifests(self) -> None:
        theirs = (self.teacher.manifest.get("tokens") or {}).get("fingerprint")
        if theirs != self.tokens.fingerprint or self.teacher.seq_len != self.tokens.seq_len:
            raise TokenMismatch(
                f"teacher store {self.teacher.url} was computed on token store fingerprint {theirs!r} "
                f"(seq_len {self.teacher.seq_len}), not on {self.tokens.url} "
                f"({self.tokens.fingerprint!r}, seq_len {self.tokens.seq_len}); re-run the cache "
                "program on this token store"
            )

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._getitems([index])[0]

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Records for `indices`, with one batched read per array (grain's batched reads)."""
        batch = self.read_batch(np.asarray(indices, np.int64))
        return [{k: v[i] for k, v in batch.items()} for i in range(len(indices))]

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The records of `indices` stacked: tokens [b, L], index [b] and the fields [b, ...]."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(
                f"rows {idx[(idx < 0) | (idx >= self._len)][:5].tolist()} outside "
                f"[0, {self._len}) of split {self.split!r}"
            )
        tokens = np.asarray(self.tokens.read(self.split, idx), np.int32)
        rows = self.teacher.read_rows(self.split, idx)
        if self._hashed:
            bad = np.flatnonzero(token_hash(tokens) != rows["token_hash"])
            if bad.size:
                raise TokenMismatch(
                    f"{self.split} row {int(idx[bad[0]])}: its tokens differ from the ones the teacher "
                    f"store {self.teacher.url} was computed on ({bad.size} of {idx.size} rows); the token "
                    "store changed after caching. Re-run the data and cache programs"
                )
        out: dict[str, np.ndarray] = {"tokens": tokens, "index": idx}
        out.update({f: rows[f] for f in self.fields})
        return out

    def __repr__(self) -> str:  # grain checkpoints name the source by its repr
        return (
            f"TeacherSource(tokens={self.tokens.url!r}, teacher={self.teacher.url!r}, "
            f"split={self.split!r}, fields={self.fields})"
        )
