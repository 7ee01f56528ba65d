"""An open teacher store (`TeacherStore`): validating, encoding and writing rows, reading and
decoding them, checksum scans and stats. The format is described in store/teacher.py; the
arrays come from store/teacher_layout.py, the entry codec from store/entries.py. Made by
`create_teacher_store` / `open_teacher_store` (store/teacher_create.py).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np
import tensorstore as ts

from rskd_jax.methods import COUNT_METHODS
from rskd_jax.store import common, entries
from rskd_jax.store.common import StoreError
from rskd_jax.store.entries import token_hash
from rskd_jax.store.teacher_layout import DIAGNOSTICS, KIND, layout_arrays, open_array


class TeacherStore:
    """An open teacher store. Made by `create_teacher_store` (writable) or `open_teacher_store`."""

    def __init__(self, url: str, manifest: dict[str, Any], *, writable: bool):
        self.url = common.store_url(url)
        self.manifest = manifest
        layout = manifest["layout"]
        self.layout = layout
        self.method: str = layout["method"]
        self.k: int = layout["k"]
        self.vocab_size: int = layout["vocab_size"]
        self.seq_len: int = layout["seq_len"]
        self.chunk_rows: int = layout["chunk_rows"]
        self.splits: tuple[str, ...] = tuple(sorted(layout["num_rows"]))
        self.writable = writable
        self._arrays: dict[str, dict[str, ts.TensorStore]] = {}
        for split in self.splits:
            self._arrays[split] = {}
            for name, spec in layout_arrays(layout, split).items():
                arr = open_array(self.url, f"{split}/{name}", write=writable, missing_ok=name == "done")
                if tuple(arr.shape) != spec.shape or np.dtype(arr.dtype.numpy_dtype) != spec.dtype:
                    raise StoreError(
                        f"{self.url}{split}/{name} is {tuple(arr.shape)} {arr.dtype.name}, the manifest "
                        f"implies {spec.shape} {spec.dtype.name}: the store is corrupt or truncated. "
                        "Re-create it with overwrite=true."
                    )
                self._arrays[split][name] = arr
        self._rank_to_id = self._id_to_rank = None
        if layout["rank_table"] is not None:
            table = common.read_rows_checked(
                {"rank_to_id": open_array(self.url, "rank_to_id", write=False, missing_ok=False)},
                np.arange(self.vocab_size),
                url=self.url,
            )["rank_to_id"]
            if table.shape != (self.vocab_size,) or common.fingerprint(table.tolist()) != layout["rank_table"]:
                raise StoreError(f"{self.url}rank_to_id does not match the manifest: the store is corrupt")
            self._rank_to_id = table.astype(np.int32)
            self._id_to_rank = entries.invert_rank_table(self._rank_to_id)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2) if writable else None

    def num_rows(self, split: str) -> int:
        return int(self._split(split)["done"].shape[0])

    def _split(self, split: str) -> dict[str, ts.TensorStore]:
        if split not in self._arrays:
            raise StoreError(f"no split {split!r} in {self.url}; splits: {', '.join(self.splits)}")
        return self._arrays[split]

    def arrays(self, split: str) -> tuple[str, ...]:
        """The names of the arrays `split` stores (e.g. done, num_ids, ids, counts, token_hash)."""
        return tuple(self._split(split))

    def done_mask(self, split: str) -> np.ndarray:
        """bool [S]: rows whose data is completely written."""
        done = self._split(split)["done"]
        return common.read_rows_checked({f"{split}/done": done}, np.arange(done.shape[0]), url=self.url)[
            f"{split}/done"
        ].astype(bool)

    def scan(self) -> dict[str, dict[str, list[int]]]:
        """Reads every chunk of every done row (and every `done` chunk): {split: {array: rows
        that fail their checksum or cannot be decoded}}; empty lists everywhere = all good."""
        out = {}
        for split, arrays in self._arrays.items():
            bad = {"done": common.scan_array(arrays["done"])}
            if bad["done"]:
                done = np.zeros(arrays["done"].shape[0], bool)
            else:
                done = self.done_mask(split)
            rows = np.flatnonzero(done)
            for name, arr in arrays.items():
                if name != "done":
                    bad[name] = common.scan_array(arr, rows)
            out[split] = bad
        return out

    # ------------------------------------------------------------------------------ writing

    def write_rows(self, split: str, start_row: int, rows: dict[str, np.ndarray]) -> concurrent.futures.Future:
        """Writes rows [start_row, start_row + b) of `split`, then marks them done.

        rows (b = rows in the block, a whole number of chunk_rows blocks, or up to S):
          sample, systematic: ids int [b, L, K], counts int [b, L, K] (sum N = K per
                       position), and weights float [b, L, K] if the proposal temperature != 1
          head_tail, sample_wor, top_k: ids, weights [b, L, K];  ghost: + tail_mass [b, L]
          full:        logprobs float [b, L, V]
          diagnostics: gold_logprob, entropy float [b, L] (NaN allowed: "not available")
          token_hash:  tokens int [b, L] (the rows' tokens; their `token_hash` is stored)
        Empty slots have count / weight 0; their id is ignored. Raises StoreError (naming the
        row) on invalid input before anything is written. Returns a Future; its result() is
        None once the data is durable and, after that, the done flags are written.
        """
        if not self.writable:
            raise StoreError(f"{self.url} was opened read-only (open_teacher_store); use create_teacher_store")
        arrays = self._split(split)
        s = self.num_rows(split)
        b = _block_rows(rows)
        stop = start_row + b
        if start_row < 0 or stop > s or start_row % self.chunk_rows or (stop % self.chunk_rows and stop != s):
            raise StoreError(
                f"write_rows({split!r}, {start_row}, b={b}): blocks must be whole chunks of "
                f"chunk_rows={self.chunk_rows} rows inside [0, {s}) (the last may end at {s})"
            )
        encoded = self._encode(split, start_row, b, rows)
        futures = [arrays[name][start_row:stop].write(value) for name, value in encoded.items()]
        assert self._pool is not None  # writable stores have one
        return self._pool.submit(self._commit, split, start_row, stop, futures)

    def _commit(self, split: str, start: int, stop: int, futures: list) -> None:
        try:
            for fut in futures:
                fut.result()  # durable: the file kvstore has renamed the chunk files in place
            self._arrays[split]["done"][start:stop].write(np.ones(stop - start, np.uint8)).result()
        except ValueError as err:
            raise StoreError(f"writing rows [{start}, {stop}) of {split!r} to {self.url} failed: {err}") from err

    def _encode(self, split: str, start: int, b: int, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        want = set(layout_arrays(self.layout, split)) - {"done", "num_ids", "token_hash"}
        if self.layout.get("token_hash", False):
            want.add("tokens")
        if set(rows) != want:
            raise StoreError(
                f"write_rows for method {self.method!r} (diagnostics="
                f"{self.layout['diagnostics']}, token_hash={self.layout.get('token_hash', False)}) "
                f"takes keys {sorted(want)}, got {sorted(rows)}"
            )
        length, k = self.seq_len, self.k
        where = lambda idx: entries.locate(split, start, idx)
        out: dict[str, np.ndarray] = {}
        if "tokens" in rows:
            out["token_hash"] = token_hash(_as(rows, "tokens", (b, length), np.integer))
        for name in set(rows) & {"tail_mass", *DIAGNOSTICS}:
            x = _as(rows, name, (b, length), np.floating)
            if name == "tail_mass" and (bad := entries.first_bad(~np.isfinite(x) | (x < 0))) is not None:
                raise StoreError(f"{where(bad)}: tail_mass {x[bad]} is not finite and >= 0")
            out[name] = x.astype(np.float32 if name == "tail_mass" else np.float16)
        if self.method == "full":
            x = _as(rows, "logprobs", (b, length, self.vocab_size), np.floating)
            if (bad := entries.first_bad(np.isnan(x) | (x == np.inf))) is not None:
                raise StoreError(f"{where(bad)}: log-prob {x[bad]} is NaN or +inf")
            out["logprobs"] = x.astype(np.float16)
            return out
        dtypes = {name: arr.dtype.numpy_dtype for name, arr in self._arrays[split].items()}
        out.update(
            entries.encode(
                _as(rows, "ids", (b, length, k), np.integer),
                _as(rows, "counts", (b, length, k), np.integer) if "counts" in rows else None,
                _as(rows, "weights", (b, length, k), np.floating) if "weights" in rows else None,
                vocab_size=self.vocab_size,
                id_to_rank=self._id_to_rank,
                split=split,
                start_row=start,
                dtypes=dtypes,
            )
        )
        return out

    # ------------------------------------------------------------------------------ reading

    def read_rows(self, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `indices` ([b] ints, any order, repeats allowed) of `split`, decoded.

        Returns ids int32 [b, L, K] and weights float32 [b, L, K] (sparse methods; canonical
        order, see the module doc), num_ids int32 [b, L], counts int32 [b, L, K] (sample, systematic),
        tail_mass float32 [b, L] (ghost), logprobs float32 [b, L, V] (full), gold_logprob and
        entropy float32 [b, L] (diagnostics), token_hash uint64 [b] (stores made with
        token_hash=True; compare with `token_hash(tokens)`). One batched TensorStore read per array.
        Raises StoreError if a row is not done, or the store is corrupt.
        """
        arrays = self._split(split)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        s = self.num_rows(split)
        if idx.size and (idx.min() < 0 or idx.max() >= s):
            raise StoreError(
                f"row indices {idx[(idx < 0) | (idx >= s)][:5].tolist()} out of range for split {split!r} with {s} rows"
            )
        raw: dict[str, np.ndarray] = {}
        if idx.size:
            done = common.read_rows_checked({f"{split}/done": arrays["done"]}, idx, url=self.url)[f"{split}/done"]
            if not done.all():
                bad = idx[done == 0][:5].tolist()
                raise StoreError(
                    f"rows {bad} of split {split!r} in {self.url} are not done (not written "
                    "yet, or their write was interrupted); finish the cache run first"
                )
            data = {f"{split}/{name}": arr for name, arr in arrays.items() if name != "done"}
            raw = {name.split("/", 1)[1]: x for name, x in common.read_rows_checked(data, idx, url=self.url).items()}
        return self._decode(raw, idx.size, split)

    def read_rows_as(
        self, split: str, indices: np.ndarray, form: str = "trimmed", *, bucket: int | None = None
    ) -> dict[str, np.ndarray]:
        """read_rows in a compact form: "dense", "trimmed" or "ragged" (see store/forms.py)."""
        from rskd_jax.store import forms

        return forms.to_form(self.read_rows(split, indices), form, bucket=bucket)

    def _decode(self, raw: dict[str, np.ndarray], b: int, split: str) -> dict[str, np.ndarray]:
        length, k = self.seq_len, self.k
        out: dict[str, np.ndarray] = {}
        for name in ("tail_mass", "logprobs", *DIAGNOSTICS):
            if name in self._arrays[split]:
                shape = (b, length, self.vocab_size) if name == "logprobs" else (b, length)
                out[name] = raw[name].astype(np.float32) if b else np.zeros(shape, np.float32)
        if "token_hash" in self._arrays[split]:
            out["token_hash"] = raw["token_hash"].astype(np.uint64) if b else np.zeros(0, np.uint64)
        if self.method == "full":
            return out
        empty = np.zeros((b, length * k), np.int64)  # only used when b = 0 (nothing was read)
        out.update(
            entries.decode(
                raw.get("num_ids", np.zeros((b, length), np.int64)),
                raw.get("ids", empty),
                raw.get("counts", empty) if self.method in COUNT_METHODS else None,
                raw.get("weights"),
                k=k,
                vocab_size=self.vocab_size,
                rank_to_id=self._rank_to_id,
                where=f"{self.url}{split}",
            )
        )
        return out

    # ------------------------------------------------------------------------------ summary

    def stats(self, sample_rows: int | None = 1024) -> dict[str, Any]:
        """Summary for inspection: rows/positions done, bytes on disk, bytes per token (all
        files / positions done), per-array bytes per token, and mean unique ids per position
        (from up to `sample_rows` evenly spaced done rows per split; None = all)."""
        splits, total_done, uniq_sum, uniq_n = {}, 0, 0.0, 0
        array_bytes: dict[str, int] = {}
        for split in self.splits:
            done = self.done_mask(split)
            rows = np.flatnonzero(done)
            if sample_rows is not None and rows.size > sample_rows:
                rows = rows[np.linspace(0, rows.size - 1, sample_rows).round().astype(np.int64)]
            mean = None
            if rows.size and "num_ids" in self._arrays[split]:
                n = common.read_rows_checked({f"{split}/num_ids": self._arrays[split]["num_ids"]}, rows, url=self.url)[
                    f"{split}/num_ids"
                ]
                uniq_sum, uniq_n, mean = uniq_sum + float(n.sum()), uniq_n + n.size, float(n.mean())
            for name in self._arrays[split]:
                array_bytes[name] = array_bytes.get(name, 0) + common.bytes_on_disk(self.url, f"{split}/{name}/")
            splits[split] = {
                "num_sequences": int(done.size),
                "rows_done": int(done.sum()),
                "positions_done": int(done.sum()) * self.seq_len,
                "mean_unique_ids": mean,
            }
            total_done += int(done.sum()) * self.seq_len
        total = common.bytes_on_disk(self.url)
        per_tok = lambda x: x / total_done if total_done else None
        mean_unique = uniq_sum / uniq_n if uniq_n else None
        entry_bytes = sum(array_bytes.get(a, 0) for a in ("num_ids", "ids", "counts", "weights"))
        return {
            "kind": KIND,
            "method": self.method,
            "k": self.k,
            "vocab_size": self.vocab_size,
            "num_sequences": sum(v["num_sequences"] for v in splits.values()),
            "seq_len": self.seq_len,
            "chunk_rows": self.chunk_rows,
            "positions_done": total_done,
            "bytes_on_disk": total,
            "bytes_per_token": per_tok(total),
            "bytes_per_token_by_array": {a: per_tok(v) for a, v in sorted(array_bytes.items())},
            "mean_unique_ids": mean_unique,
            "bytes_per_entry": (entry_bytes / (mean_unique * total_done) if mean_unique and total_done else None),
            "splits": splits,
        }

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __repr__(self) -> str:
        rows = ", ".join(f"{s}={self.num_rows(s)}" for s in self.splits)
        return f"TeacherStore({self.url!r}, method={self.method!r}, k={self.k}, seq_len={self.seq_len}, {rows})"


def _block_rows(rows: dict[str, np.ndarray]) -> int:
    sizes = {name: np.shape(x)[0] if np.ndim(x) else None for name, x in rows.items()}
    if not rows or len(set(sizes.values())) != 1 or None in sizes.values() or not next(iter(sizes.values())):
        raise StoreError(f"write_rows needs arrays with one non-zero leading row count, got {sizes}")
    return int(next(iter(sizes.values())) or 0)


def _as(rows: dict[str, np.ndarray], name: str, shape: tuple[int, ...], kind: type) -> np.ndarray:
    x = np.asarray(rows[name])
    if x.shape != shape or not np.issubdtype(x.dtype, kind):
        raise StoreError(f"write_rows: {name} must be {kind.__name__} {list(shape)}, got {x.dtype} {list(x.shape)}")
    return x
