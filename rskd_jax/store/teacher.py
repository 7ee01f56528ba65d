"""The teacher store: sparse teacher targets per (sequence, position), zarr3 via TensorStore.

Methods: `sample` (N draws with replacement: unique ids + exact integer counts, K = N slots),
`systematic` (N stratified draws, stored as `sample`), `head_tail` (exact top-h + N tail draws:
ids + weights, K = h + N), `sample_wor` (k ids + importance weights), `top_k` (k ids + probs), `ghost` (top-k + tail
mass), `full` (all V log-probs in float16, tiny runs only). Letters: S rows (sequences) of a
split, L positions per row, K slots per position, V vocabulary, b rows of a batch.

Layout (one store = one method; arrays per split; chunks of `chunk_rows` rows, so each
`write_rows` block owns its files and two processes never write the same one):

    manifest.json          the caller's manifest + kind "teacher", layout_version, layout
                           (its "provenance" section is informational, never compared)
    rank_to_id             int32 [V]: frequency rank -> id (only if id_frequencies was given)
    {split}/done           uint8 [S], chunks [chunk_rows]; set only after the row's data is durable
    {split}/num_ids        uint8|uint16 [S, L]: entries per position (n <= K)
    {split}/ids            uint16|uint32 [S, L*K]: entries packed per row (see below)
    {split}/counts         uint8|uint16 [S, L*K]  (sample, systematic)
    {split}/weights        float32 [S, L*K]        (sample / systematic at temperature != 1, others)
    {split}/tail_mass      float32 [S, L]          (ghost)
    {split}/gold_logprob   float16 [S, L]          (diagnostics: teacher log t(next token))
    {split}/entropy        float16 [S, L]          (diagnostics: teacher entropy, nats)
    {split}/logprobs       float16 [S, L, V]       (full)
    {split}/token_hash     uint64 [S], chunks [chunk_rows]  (if token_hash: `token_hash` of the
                           row's tokens as the teacher saw them, written with the row's data)

Entry encoding (the pure-numpy codec in store/entries.py; lossless, chosen by measurement:
tools/bench_store_codec.py): the entries of a position are sorted by frequency rank
(rank_to_id; identity if no table) and stored as gaps: the first as its rank, the next ones as
rank - previous rank - 1 (>= 0). Each row's positions are concatenated ("packed") at the front
of its L*K slots, the rest is 0; num_ids says where a position's entries start. Counts are
stored as c - 1, except the first entry of each position, stored as 0 and restored as N -
sum(others). Every array is a zarr3 shard of `chunk_rows` rows with one inner chunk per row (a
random row read decodes just that row), blosc(zstd, byte shuffle), then a crc32c of the chunk's
bytes (layout_version 2; every other chunk, `done`, `token_hash` and `rank_to_id` included,
carries one too): a flipped bit raises a StoreError naming the store, the array and the rows,
never decodes to other targets. Measured on real SmolLM2 draws at N = 50: stdlib source (11.8
unique ids per position) 20.1 B/token for ids + counts + num_ids = 1.70 B/entry; Python docs
(15.3 ids) 25.0 B/token = 1.64 B/entry; the float16 diagnostics add 4.2 B/token (raw int32: 400
B/token).

Token check: a store created with token_hash=True takes each block's `tokens` [b, L] in
write_rows and keeps token_hash(tokens) per row; read_rows returns it, so a reader (the
trainer) can check that a batch's tokens are the ones the teacher saw:
`token_hash(batch_tokens) == rows["token_hash"]` (~5 us per row of 512 tokens).

Reading returns entries in this canonical order (ascending rank; ascending id when there is
no table), empty slots last with id 0, weight 0, count 0. Weights for `sample` / `systematic` at
temperature 1 are counts / N (exact float32). A tempered one also stores the final float32 weights
(w = c/N * t/q) beside the exact counts.

    store = create_teacher_store("runs/teacher", manifest=m, num_rows={"train": 64, "val": 8},
                                 seq_len=512, method="sample", k=50, vocab_size=49152,
                                 chunk_rows=8, diagnostics=True, overwrite=False)
    store.write_rows("train", 0, {"ids": ids_BxLxK, "counts": c_BxLxK, "gold_logprob": g_BxL,
                                  "entropy": h_BxL}).result()   # + "tokens": tokens_BxL if token_hash
    batch = open_teacher_store("runs/teacher").read_rows("train", np.array([3, 0]))
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any, NamedTuple

import numpy as np
import tensorstore as ts

from rskd_jax.methods import COUNT_METHODS, STORE_METHODS
from rskd_jax.store import common, entries
from rskd_jax.store.common import StoreError
from rskd_jax.store.entries import token_hash as token_hash  # re-exported: the store's public hash
from rskd_jax.store.entries import uint_for as _uint_for

KIND = "teacher"
LAYOUT_VERSION = 2  # 2: a crc32c on every chunk, the rank table's too (1: none; read with a warning)
CHECKED_FROM = 2
METHODS = STORE_METHODS
DIAGNOSTICS = ("gold_logprob", "entropy")
PROVENANCE = "provenance"  # manifest section not compared on reopen (see create_teacher_store)
CREATING = "creating"  # manifest mark while create_teacher_store makes the arrays
DEFAULT_COMPRESSION_LEVEL = 5  # blosc clevel (zstd); 9 is ~4% smaller and ~3x slower to write
_FULL_CHUNK_BYTES = 64 << 20


class _Array(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: tuple[int, ...]  # rows are always chunk_rows; one shard (file) per chunk
    per_row: bool  # inner chunks of one row (sharding) for row-granular reads


def _layout_arrays(layout: dict[str, Any], split: str) -> dict[str, _Array]:
    """Every array of `split` with its shape, dtype and chunking, derived from the layout."""
    s, length, k, v = layout["num_rows"][split], layout["seq_len"], layout["k"], layout["vocab_size"]
    cr, method = layout["chunk_rows"], layout["method"]
    arrays = {"done": _Array((s,), np.dtype(np.uint8), (cr,), False)}
    per_pos = lambda dt: _Array((s, length), np.dtype(dt), (cr, length), True)
    if method == "full":
        lc = max(1, min(length, _FULL_CHUNK_BYTES // (cr * v * 2)))
        arrays["logprobs"] = _Array((s, length, v), np.dtype(np.float16), (cr, lc, v), False)
    else:
        packed = lambda dt: _Array((s, length * k), np.dtype(dt), (cr, length * k), True)
        arrays["num_ids"] = per_pos(_uint_for(k))
        arrays["ids"] = packed(_uint_for(v - 1))
        if method in COUNT_METHODS:
            arrays["counts"] = packed(_uint_for(k - 1))
        if method not in COUNT_METHODS or layout["temperature"] != 1.0:
            arrays["weights"] = packed(np.float32)
        if method == "ghost":
            arrays["tail_mass"] = per_pos(np.float32)
    if layout["diagnostics"]:
        arrays.update({name: per_pos(np.float16) for name in DIAGNOSTICS})
    if layout.get("token_hash", False):  # absent in stores made before it existed
        arrays["token_hash"] = _Array((s,), np.dtype(np.uint64), (cr,), False)
    return arrays


def _codecs(level: int, itemsize: int, inner: tuple[int, ...] | None) -> list[dict[str, Any]]:
    raw = {"name": "bytes", "configuration": {"endian": "little"}}
    blosc = {
        "name": "blosc",
        "configuration": {
            "cname": "zstd",
            "clevel": level,
            "shuffle": "shuffle" if itemsize > 1 else "noshuffle",
            "typesize": itemsize,
            "blocksize": 0,
        },
    }
    if inner is None:
        return [raw, blosc, common.CHECKSUM]
    return [
        {
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": list(inner),
                "codecs": [raw, blosc, common.CHECKSUM],
                "index_codecs": [raw, {"name": "crc32c"}],
                "index_location": "end",
            },
        }
    ]


def _open(url: str, name: str, *, write: bool, missing_ok: bool) -> ts.TensorStore:
    """Opens an existing array. Data arrays (missing_ok=False) raise on a missing chunk instead
    of reading fill values, and write every chunk even if it equals the fill value."""
    spec = {
        "driver": "zarr3",
        "kvstore": common.store_url(url) + name + "/",
        "fill_missing_data_reads": missing_ok,
        "store_data_equal_to_fill_value": True,
    }
    try:
        return ts.open(spec, open=True, read=True, write=write).result()
    except ValueError as err:
        raise StoreError(
            f"cannot open array {name!r} in {common.store_url(url)}: {err}. "
            "The store is corrupt or truncated; re-create it with overwrite=true."
        ) from err


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
            for name, spec in _layout_arrays(layout, split).items():
                arr = _open(self.url, f"{split}/{name}", write=writable, missing_ok=name == "done")
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
                {"rank_to_id": _open(self.url, "rank_to_id", write=False, missing_ok=False)},
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
        want = set(_layout_arrays(self.layout, split)) - {"done", "num_ids", "token_hash"}
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


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def create_teacher_store(
    url: str,
    *,
    manifest: dict[str, Any],
    num_rows: dict[str, int],
    seq_len: int,
    method: str,
    k: int,
    vocab_size: int,
    chunk_rows: int,
    diagnostics: bool = True,
    overwrite: bool = False,
    temperature: float = 1.0,
    id_frequencies: np.ndarray | None = None,
    compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    token_hash: bool = False,
) -> TeacherStore:
    """Creates a teacher store, or reopens it for resume if it exists with the same manifest.

    manifest: the caller's facts (teacher / tokenizer fingerprints and vocab sizes, method
      params, seed, token store fingerprint, seq_len, ...); this adds kind, layout_version
      and `layout` (everything below). Identical manifest -> the existing store is reopened
      (rows already done stay done), whatever `overwrite` says; different -> StoreError and
      the store is left untouched, unless overwrite (then it is deleted and re-created).
      manifest["provenance"] (optional) is informational: where the inputs were found (paths,
      URLs, the teacher's config). It is NOT compared on reopen (the same data reached by
      another path still resumes) and stays as first written.
    method: one of METHODS. k: slots per position (for `sample` / `systematic`, k = N draws; for
      `head_tail`, h + N; for `full`, k = vocab_size). temperature: the count methods' proposal
      temperature (!= 1 also stores float
      weights). id_frequencies: [V] counts (e.g. the token store's unigram counts) for the
      frequency-rank id remap, ~13% smaller ids on real text; None = identity.
    chunk_rows: rows per chunk (and per `done` chunk): the unit of one write_rows block.
    token_hash: also keep a hash of each row's tokens (write_rows then takes `tokens`).
    Several processes: one creates the store; after a barrier the others call this with the
    same arguments, which reopens it (never let two processes create the same new store).
    """
    if method not in METHODS:
        raise StoreError(f"method must be one of {METHODS}, got {method!r}")
    if min(seq_len, k, vocab_size, chunk_rows) < 1 or vocab_size > 2**31:
        raise StoreError(
            f"need seq_len, k, chunk_rows >= 1 and 1 <= vocab_size <= 2**31; got seq_len={seq_len}, "
            f"k={k}, vocab_size={vocab_size}, chunk_rows={chunk_rows}"
        )
    if not num_rows or any(int(n) != n or n < 0 for n in num_rows.values()):
        raise StoreError(f"num_rows must map split names to row counts >= 0, got {num_rows}")
    if method == "full" and (k != vocab_size or id_frequencies is not None):
        raise StoreError("method 'full' stores all V log-probs: pass k=vocab_size and no id_frequencies")
    if method not in COUNT_METHODS and temperature != 1.0:
        raise StoreError(f"temperature applies to methods {COUNT_METHODS} only (the {method!r} weights carry it)")
    if not temperature > 0:
        raise StoreError(f"temperature must be > 0, got {temperature}")
    if method in COUNT_METHODS and k > 2**16:
        raise StoreError(f"{method}: N = k = {k} draws is more than 65536")
    table = None if id_frequencies is None else entries.rank_table(id_frequencies, vocab_size)
    layout: dict[str, Any] = {
        "method": method,
        "k": int(k),
        "vocab_size": int(vocab_size),
        "seq_len": int(seq_len),
        "chunk_rows": int(chunk_rows),
        "num_rows": {str(s): int(n) for s, n in num_rows.items()},
        "diagnostics": bool(diagnostics),
        "temperature": float(temperature),
        "rank_table": None if table is None else common.fingerprint(table.tolist()),
        "compression": {"codec": "blosc", "cname": "zstd", "clevel": int(compression_level), "shuffle": "byte"},
        "encoding": "per position: entries sorted by frequency rank, gaps (first: rank; then rank - prev - 1), "
        "packed per row, num_ids per position; counts c - 1 with the first restored as N - sum",
    }
    if token_hash:  # only when set, so stores made before the option keep their manifest
        layout["token_hash"] = True
    try:
        final = json.loads(json.dumps(dict(manifest, kind=KIND, layout_version=LAYOUT_VERSION, layout=layout)))
    except (TypeError, ValueError) as err:
        raise StoreError(f"the manifest must be plain JSON (str, int, float, bool, None, lists, dicts): {err}") from err
    for key, value in (("kind", KIND), ("layout_version", LAYOUT_VERSION), ("seq_len", seq_len), ("method", method)):
        if key in manifest and manifest[key] != value:
            raise StoreError(f"manifest[{key!r}] = {manifest[key]!r} disagrees with the store's {value!r}")
    where = common.store_url(url)
    existing = common.read_json(url)
    kv = common.kvstore(url)
    identity = lambda m: {k: v for k, v in m.items() if k != PROVENANCE}
    if existing is not None and existing.get(CREATING) and existing.get("kind") == KIND:
        existing = None  # a create that was interrupted: it holds no rows, make it again
        kv.delete_range(ts.KvStore.KeyRange()).result()
    if existing is not None and identity(existing) == identity(final):
        return TeacherStore(url, existing, writable=True)
    if existing is not None and not overwrite:
        raise StoreError(
            f"{where} already holds a different {existing.get('kind', '?')} store (differs in: "
            f"{', '.join(_diff(identity(existing), identity(final)))}); it was left untouched. Set overwrite=true "
            "to replace it, or choose another output."
        )
    if existing is not None and existing.get("kind") != KIND:
        raise StoreError(
            f"{where} holds a {existing.get('kind')!r} store, not a teacher store; "
            "refusing to overwrite it. Choose another output."
        )
    if existing is None and kv.list().result() and not overwrite:
        raise StoreError(
            f"{where} is not empty and has no {common.MANIFEST} (not a store, or an interrupted "
            "create); refusing to write there. Set overwrite=true or choose another output."
        )
    kv.delete_range(ts.KvStore.KeyRange()).result()
    # crash safety: the manifest is written first marked CREATING (a re-run knows the arrays may
    # be half made and re-creates them), and rewritten without the mark once every array exists
    common.write_json(url, dict(final, **{CREATING: True}))
    level = int(compression_level)
    for split in sorted(layout["num_rows"]):
        for name, spec in _layout_arrays(layout, split).items():
            inner = (1, *spec.chunk[1:]) if spec.per_row else None
            common.create_array(
                url,
                f"{split}/{name}",
                shape=spec.shape,
                dtype=spec.dtype,
                chunk_shape=spec.chunk,
                codecs=_codecs(level, spec.dtype.itemsize, inner),
                fill_value=0,
            )
    if table is not None:
        common.create_array(
            url,
            "rank_to_id",
            shape=table.shape,
            dtype=np.dtype(np.int32),
            chunk_shape=table.shape,
            codecs=_codecs(level, 4, None),
            fill_value=0,
        )
        _open(url, "rank_to_id", write=True, missing_ok=False).write(table).result()
    common.write_json(url, final)  # last: the CREATING mark goes
    return TeacherStore(url, final, writable=True)


def open_teacher_store(url: str) -> TeacherStore:
    """Opens an existing teacher store read-only, checking every array against the manifest."""
    where = common.store_url(url)
    manifest = common.read_json(url)
    if manifest is None:
        raise StoreError(
            f"no teacher store at {where} (no {common.MANIFEST}; a missing path, or a create "
            "that was interrupted). Run the cache program to create it."
        )
    if manifest.get("kind") != KIND:
        raise StoreError(f"{where} is a {manifest.get('kind')!r} store, not a teacher store")
    if manifest.get(CREATING):
        raise StoreError(
            f"{where} is a store whose creation was interrupted (it holds no rows); re-run the "
            "cache program to create it"
        )
    if manifest.get("layout_version", 0) > LAYOUT_VERSION:
        raise StoreError(
            f"{where} has layout_version {manifest['layout_version']}; this rskd_jax reads up "
            f"to {LAYOUT_VERSION}. Upgrade rskd_jax."
        )
    common.warn_unchecked(url, KIND, int(manifest.get("layout_version", 1)), CHECKED_FROM)
    try:
        return TeacherStore(url, manifest, writable=False)
    except (KeyError, TypeError) as err:
        raise StoreError(f"{where}{common.MANIFEST} lacks or garbles layout field {err}: the store is corrupt") from err
