"""Locations, manifests and zarr3 arrays shared by the token store and the teacher store.

A store is a directory-like prefix on any TensorStore kvstore: a local path (`runs/tokens`),
or a URL that TensorStore understands (`file:///abs/path`, `gs://bucket/prefix`,
`s3://bucket/prefix`, `memory://name`). Inside it live zarr3 arrays and a `manifest.json`.
Only `rskd_jax.store` knows these layouts; everything else goes through its functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
import tensorstore as ts

MANIFEST = "manifest.json"
# The last codec of every chunk the project writes: a crc32c of the chunk's encoded bytes,
# checked on every read (a flipped bit raises DATA_LOSS instead of decoding to other values).
CHECKSUM = {"name": "crc32c"}
log = logging.getLogger("rskd_jax.store")


class StoreError(ValueError):
    """A store is missing, incomplete, corrupt or does not match what the caller expects."""


def store_url(path: str) -> str:
    """Normalises a local path or kvstore URL to a URL ending in '/'.

    >>> store_url("/tmp/x")
    'file:///tmp/x/'
    """
    path = str(path)
    url = path if "://" in path else "file://" + os.path.abspath(path)
    return url if url.endswith("/") else url + "/"


def local_path(url: str) -> str | None:
    """The local directory behind a `file://` URL, else None."""
    url = store_url(url)
    return url[len("file://") :] if url.startswith("file://") else None


def kvstore(url: str) -> ts.KvStore:
    return ts.KvStore.open(store_url(url)).result()


def read_json(url: str, key: str = MANIFEST) -> dict[str, Any] | None:
    """Reads a JSON object stored under `key`; None if the key is absent."""
    result = kvstore(url).read(key).result()
    if result.state == "missing":
        return None
    try:
        return json.loads(result.value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{store_url(url)}{key} is not valid JSON ({err}); the store is corrupt") from err


def write_json(url: str, obj: dict[str, Any], key: str = MANIFEST) -> None:
    """Writes `obj` as indented JSON under `key` (the file driver replaces it atomically)."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")
    kvstore(url).write(key, data).result()


def fingerprint(obj: Any) -> str:
    """A short stable hash of any JSON-serialisable object (canonical JSON, sha256, 16 hex)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:16]


def create_array(
    url: str,
    name: str,
    *,
    shape: tuple[int, ...],
    dtype: str | np.dtype,
    chunk_shape: tuple[int, ...],
    codecs: list[dict[str, Any]] | None = None,
    fill_value: Any = 0,
) -> ts.TensorStore:
    """Creates (or replaces) the zarr3 array `name` inside the store at `url`."""
    metadata: dict[str, Any] = {
        "shape": list(shape),
        "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}},
        "fill_value": fill_value,
    }
    if codecs is not None:
        metadata["codecs"] = codecs
    spec = {"driver": "zarr3", "kvstore": store_url(url) + name.strip("/") + "/", "metadata": metadata}
    return ts.open(spec, create=True, delete_existing=True).result()


def open_array(url: str, name: str, *, write: bool = False) -> ts.TensorStore:
    """Opens the existing zarr3 array `name`; a clear StoreError if it is absent or unreadable."""
    spec = {"driver": "zarr3", "kvstore": store_url(url) + name.strip("/") + "/"}
    try:
        return ts.open(spec, open=True, read=True, write=write).result()
    except ValueError as err:
        raise StoreError(f"cannot open array {name!r} in {store_url(url)}: {err}") from err


def bytes_on_disk(url: str, prefix: str = "") -> int:
    """Total bytes of all keys under the store (or under `prefix` inside it)."""
    root = local_path(url)
    if root is not None:
        top = os.path.join(root, prefix)
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(top) for f in files)
    kv = kvstore(url)
    keys = kv.list().result()
    return sum(len(kv.read(k).result().value) for k in keys if k.decode().startswith(prefix))


def warn_unchecked(url: str, kind: str, layout_version: int, checked_from: int) -> None:
    """Logs once per open that a store predates per-chunk checksums."""
    if layout_version < checked_from:
        log.warning(
            "%s is a %s store of layout_version %d: its chunks carry no checksums, so "
            "corruption may read back silently. Re-create it to get checked chunks.",
            store_url(url),
            kind,
            layout_version,
        )


def corrupt_rows(arr: ts.TensorStore, rows: np.ndarray) -> list[int]:
    """The rows among `rows` whose chunks fail to read or decode (checksum, codec, truncation)."""
    bad = []
    for r in np.unique(np.asarray(rows, np.int64)):
        try:
            arr[int(r) : int(r) + 1].read().result()
        except ValueError:
            bad.append(int(r))
    return bad


def read_rows_checked(
    arrays: dict[str, ts.TensorStore], rows: np.ndarray, *, url: str, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Reads rows `rows` of every array (one batched read each, all in flight together).

    A chunk that fails its checksum or cannot be decoded raises a StoreError naming the store,
    the array and the corrupt rows (found by re-reading row by row, only on failure).
    """
    futures = {name: arr[rows].read() for name, arr in arrays.items()}
    out, failed = {}, []
    for name, fut in futures.items():
        try:
            out[name] = fut.result()
        except ValueError as err:
            failed.append((name, err))
    if failed:
        parts = []
        for name, error in failed:
            bad = corrupt_rows(arrays[name], rows)
            more = " ..." if len(bad) > 10 else ""
            parts.append(f"{prefix}{name} rows {bad[:10]}{more}" if bad else f"{prefix}{name} ({error})")
        raise StoreError(
            f"{store_url(url)} is corrupt or truncated: {'; '.join(parts)} failed their "
            f"checksum, are missing or could not be decoded (first error: {failed[0][1]}). Nothing of this "
            "batch was used. Re-create the store (overwrite=true), or for a teacher "
            "store re-run the cache for these rows."
        )
    return out


def scan_array(arr: ts.TensorStore, rows: np.ndarray | None = None, block_rows: int = 256) -> list[int]:
    """Reads every chunk of `arr` (or of `rows`, ascending) in blocks; returns the rows that fail."""
    rows = np.arange(int(arr.shape[0])) if rows is None else np.asarray(rows, np.int64)
    bad: list[int] = []
    for start in range(0, len(rows), block_rows):
        block = rows[start : start + block_rows]
        try:
            arr[block].read().result()
        except ValueError:
            bad += corrupt_rows(arr, block)
    return bad
