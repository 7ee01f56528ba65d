"""Locations, manifests and zarr3 arrays shared by the token store and the teacher store.

A store is a directory-like prefix on any TensorStore kvstore: a local path (`runs/tokens`),
or a URL that TensorStore understands (`file:///abs/path`, `gs://bucket/prefix`,
`s3://bucket/prefix`, `memory://name`). Inside it live zarr3 arrays and a `manifest.json`.
Only `rskd_jax.store` knows these layouts; everything else goes through its functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import tensorstore as ts

MANIFEST = "manifest.json"


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
    return url[len("file://"):] if url.startswith("file://") else None


def _kvstore(url: str) -> ts.KvStore:
    return ts.KvStore.open(store_url(url)).result()


def read_json(url: str, key: str = MANIFEST) -> dict[str, Any] | None:
    """Reads a JSON object stored under `key`; None if the key is absent."""
    result = _kvstore(url).read(key).result()
    if result.state == "missing":
        return None
    try:
        return json.loads(result.value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{store_url(url)}{key} is not valid JSON ({err}); the store is corrupt") from err


def write_json(url: str, obj: dict[str, Any], key: str = MANIFEST) -> None:
    """Writes `obj` as indented JSON under `key` (the file driver replaces it atomically)."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")
    _kvstore(url).write(key, data).result()


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
        return sum(
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(top) for f in files
        )
    kv = _kvstore(url)
    keys = kv.list().result()
    return sum(len(kv.read(k).result().value) for k in keys if k.decode().startswith(prefix))
