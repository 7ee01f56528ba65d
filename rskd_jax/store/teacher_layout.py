"""The teacher store's layout: which arrays a store holds, their shapes, dtypes, chunks and
zarr3 codecs, derived from the manifest's `layout` section (store/teacher.py has the whole
format; store/teacher_store.py reads and writes the arrays; store/teacher_create.py makes them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import tensorstore as ts

from rskd_jax.methods import COUNT_METHODS, STORE_METHODS
from rskd_jax.store import common
from rskd_jax.store.common import StoreError
from rskd_jax.store.entries import uint_for as _uint_for

KIND = "teacher"
LAYOUT_VERSION = 2  # 2: a crc32c on every chunk, the rank table's too (1: none; read with a warning)
CHECKED_FROM = 2
METHODS = STORE_METHODS
DIAGNOSTICS = ("gold_logprob", "entropy")
PROVENANCE = "provenance"  # manifest section not compared on reopen (see create_teacher_store)
CREATING = "creating"  # manifest mark while create_teacher_store makes the arrays
DEFAULT_COMPRESSION_LEVEL = 5  # blosc clevel (zstd); 9 is ~4% smaller and ~3x slower to write
_FULL_CHUNK_BYTES = 64 << 20  # `full`: positions per chunk so a chunk stays <= 64 MiB


class Array(NamedTuple):
    """One array of a split: its shape, dtype and chunking."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk: tuple[int, ...]  # rows are always chunk_rows; one shard (file) per chunk
    per_row: bool  # inner chunks of one row (sharding) for row-granular reads


def layout_arrays(layout: dict[str, Any], split: str) -> dict[str, Array]:
    """Every array of `split` with its shape, dtype and chunking, derived from the layout."""
    s, length, k, v = layout["num_rows"][split], layout["seq_len"], layout["k"], layout["vocab_size"]
    cr, method = layout["chunk_rows"], layout["method"]
    arrays = {"done": Array((s,), np.dtype(np.uint8), (cr,), False)}
    per_pos = lambda dt: Array((s, length), np.dtype(dt), (cr, length), True)
    if method == "full":
        lc = max(1, min(length, _FULL_CHUNK_BYTES // (cr * v * 2)))
        arrays["logprobs"] = Array((s, length, v), np.dtype(np.float16), (cr, lc, v), False)
    else:
        packed = lambda dt: Array((s, length * k), np.dtype(dt), (cr, length * k), True)
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
        arrays["token_hash"] = Array((s,), np.dtype(np.uint64), (cr,), False)
    return arrays


def codecs(level: int, itemsize: int, inner: tuple[int, ...] | None) -> list[dict[str, Any]]:
    """The zarr3 codec chain: bytes, blosc(zstd), crc32c; inside a row-sharded shard if `inner`."""
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


def open_array(url: str, name: str, *, write: bool, missing_ok: bool) -> ts.TensorStore:
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
