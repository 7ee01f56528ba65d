"""Making a teacher store (`create_teacher_store`: checks the arguments, writes the manifest and
creates the arrays, or reopens an identical store for resume) and opening one read-only
(`open_teacher_store`), both checking the manifest. The format is described in store/teacher.py.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tensorstore as ts

from rskd_jax.methods import COUNT_METHODS
from rskd_jax.store import common, entries
from rskd_jax.store.common import StoreError
from rskd_jax.store.teacher_layout import (
    CHECKED_FROM,
    CREATING,
    DEFAULT_COMPRESSION_LEVEL,
    KIND,
    LAYOUT_VERSION,
    METHODS,
    PROVENANCE,
    codecs,
    layout_arrays,
    open_array,
)
from rskd_jax.store.teacher_store import TeacherStore


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
      temperature (!= 1 also stores float weights). id_frequencies: [V] counts (e.g. the token
      store's unigram counts) for the frequency-rank id remap, ~13% smaller ids on real text; None = identity.
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
        for name, spec in layout_arrays(layout, split).items():
            inner = (1, *spec.chunk[1:]) if spec.per_row else None
            common.create_array(
                url,
                f"{split}/{name}",
                shape=spec.shape,
                dtype=spec.dtype,
                chunk_shape=spec.chunk,
                codecs=codecs(level, spec.dtype.itemsize, inner),
                fill_value=0,
            )
    if table is not None:
        common.create_array(
            url,
            "rank_to_id",
            shape=table.shape,
            dtype=np.dtype(np.int32),
            chunk_shape=table.shape,
            codecs=codecs(level, 4, None),
            fill_value=0,
        )
        open_array(url, "rank_to_id", write=True, missing_ok=False).write(table).result()
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
