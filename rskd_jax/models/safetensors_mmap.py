"""Memory-mapped safetensors tensors as numpy arrays, read lazily one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor:
dtype, shape, data_offsets [start, end) relative to the end of the header) and the raw
little-endian bytes. `MappedSafetensors(files)` is a read-only Mapping name -> np.memmap:
each lookup maps only that tensor's bytes, and pages are read from disk when a slice of it is
touched. Dropping the array unmaps it, so the resident (file-backed) memory of a loader that
copies one slice at a time stays at about one tensor, whatever the checkpoint's size.

bfloat16 tensors come back as ml_dtypes.bfloat16 (numpy has no bfloat16; safetensors' own
numpy reader refuses them).

    st = MappedSafetensors([Path("model.safetensors")])
    w = st["model.embed_tokens.weight"]    # np.memmap [V, D]; nothing read yet
    rows = np.array(w[:128])               # reads the first 128 rows only
    cols = read_slice(lambda: st["model.embed_tokens.weight"], (slice(None), slice(0, 64)))
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class TensorInfo(NamedTuple):
    """Where one tensor lives: file, dtype, shape and the absolute byte offset of its data."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file (name -> TensorInfo), from its header only."""
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has dtype {meta['dtype']}; supported: {sorted(DTYPES)}")
        dtype = np.dtype(DTYPES[meta["dtype"]])
        shape = tuple(int(s) for s in meta["shape"])
        start, end = meta["data_offsets"]
        if end - start != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{file}: tensor {name!r} spans {end - start} bytes, not {dtype} x {shape}")
        out[name] = TensorInfo(file, dtype, shape, 8 + n + start)
    return out


class MappedSafetensors(Mapping):
    """name -> a fresh read-only np.memmap of that tensor, over one or more files."""

    def __init__(self, files: Sequence[Path]):
        self.info: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(Path(f)).items():
                if name in self.info:
                    raise ValueError(f"tensor {name!r} is in both {self.info[name].file} and {f}")
                self.info[name] = info

    def __getitem__(self, name: str) -> np.ndarray:
        t = self.info[name]
        if 0 in t.shape:  # np.memmap cannot map zero bytes
            return np.zeros(t.shape, t.dtype)
        return np.memmap(t.file, dtype=t.dtype, mode="r", offset=t.offset, shape=t.shape or (1,)).reshape(t.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)

    def __contains__(self, name: object) -> bool:
        return name in self.info

    def nbytes(self) -> int:
        """Bytes of all tensors (what the files hold, less the headers)."""
        return sum(t.dtype.itemsize * int(np.prod(t.shape, dtype=np.int64)) for t in self.info.values())


BLOCK_BYTES = 1 << 24


def read_slice(fresh: Callable[[], np.ndarray], idx: tuple[slice, ...], block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """fresh()[idx] as a new array, read in blocks of about block_bytes along the first axis.

    fresh() returns a new view of the tensor per call (a new memory map for MappedSafetensors,
    unmapped when dropped), so a slice across the last axes (a column shard: every page of the
    tensor is touched) keeps only one block's pages resident at a time, not the whole tensor.
    idx: one slice per leading axis (what jax.make_array_from_callback passes).
    """
    a = fresh()
    idx = (*idx, *(slice(None),) * (a.ndim - len(idx)))
    if a.ndim == 0:
        return np.array(a)
    out = np.empty(a[idx].shape, a.dtype)  # a view's shape: nothing read
    rows = range(*idx[0].indices(a.shape[0]))
    per_block = max(1, block_bytes // max(1, a.nbytes // max(1, a.shape[0])))
    del a
    for j in range(0, len(rows), per_block):
        sub = rows[j : j + per_block]
        block = fresh()[sub.start : sub.stop : sub.step]
        out[j : j + len(sub)] = block[(slice(None), *idx[1:])]
        del block
    return out
