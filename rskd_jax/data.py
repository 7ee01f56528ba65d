"""Text files -> token store (`python -m rskd_jax.data`), and grain batches over row sources.

The program: expand `data.inputs` (files, dirs walked recursively with `data.extensions`,
globs, '@stdlib'), read each file as UTF-8 (non-UTF-8, unreadable and empty files are
skipped and counted), tokenize in parallel batches, put each document in train or val by a
hash of its content (duplicates share a split, so val never sees a train document), append
EOS to every document, concatenate each split in sorted-path order and cut it into
`seq_len`-token rows (the final partial row is dropped). Re-running writes a byte-identical
store.

    python -m rskd_jax.data --config configs/tiny/data.yaml data.seq_len=256

The input pipeline: a row source has `num_rows` and `read(indices) -> {name: [b, ...]}`
(one batched read per batch). `make_batch_iterator` shuffles row indices per epoch with
grain, cuts global batches, gives each process its slice and reads it; its iterator's
`get_state()` / `set_state()` resume exactly.

    it = make_batch_iterator(TokenRows(open_token_store(path), "train"),
                             global_batch_size=8, seed=0)
    batch = next(it)        # {"tokens": int32 [8, L], "index": int64 [8]}
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import sys
import sysconfig
import time
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import numpy as np

from rskd_jax.config import DataConfig, DataRun, parse_cli, save_config

STDLIB = "@stdlib"
# Directories never taken from the standard library: its test suites and installed packages.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


class DataError(ValueError):
    """The inputs give nothing to tokenize, or a pipeline argument is invalid."""


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Document:
    path: str  # absolute
    rel: str  # relative to its input root, for reports


def _walk(root: str, extensions: Sequence[str], skip_dirs: frozenset[str] = frozenset()):
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip_dirs and x != "__pycache__" and not x.startswith("."))
        for f in sorted(files):
            if f.endswith(tuple(extensions)):
                yield os.path.join(d, f)


def expand_inputs(inputs: Sequence[str], extensions: Sequence[str] = (".py", ".txt", ".md", ".rst"),
                  exclude: Sequence[str] = ()) -> tuple[list[Document], list[dict[str, Any]]]:
    """Files, dirs, globs and '@stdlib' -> (documents sorted by path, per-input file counts).

    Directories are walked recursively keeping `extensions` (hidden dirs and __pycache__
    skipped); files named directly or matched by a glob are kept whatever their suffix.
    `exclude` holds fnmatch patterns matched against absolute paths. A file reached twice
    counts once, for the first input that reaches it.
    """
    found: dict[str, Document] = {}
    sources = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for given in inputs:
        # '@stdlib/json/*.py' names paths inside the standard library on any machine.
        spec = stdlib + given[len(STDLIB):] if given.startswith(STDLIB + "/") else given
        if spec == STDLIB:
            pairs = [(p, stdlib) for p in _walk(stdlib, extensions, STDLIB_SKIP_DIRS)]
        elif os.path.isfile(spec):
            pairs = [(spec, os.path.dirname(spec))]
        elif os.path.isdir(spec):
            pairs = [(p, spec) for p in _walk(spec, extensions)]
        elif glob.has_magic(spec):
            base = spec[: min((spec.find(c) for c in "*?[" if c in spec))].rpartition("/")[0] or "."
            pairs, matches = [], sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise DataError(f"data.inputs: the glob {given!r} matches nothing")
            for m in matches:
                pairs += [(p, base) for p in _walk(m, extensions)] if os.path.isdir(m) else [(m, base)]
        else:
            raise DataError(f"data.inputs: {given!r} is not a file, a directory or a matching glob")
        pairs = [(p, r) for p, r in pairs if not any(fnmatch.fnmatch(os.path.abspath(p), pat) for pat in exclude)]
        new = 0
        for p, r in pairs:
            key = os.path.realpath(p)
            if key not in found:
                rel_root = stdlib if given.startswith(STDLIB) else r
                found[key] = Document(os.path.abspath(p), os.path.relpath(p, rel_root))
                new += 1
        sources.append({"input": given, "path": stdlib if spec == STDLIB else spec, "files": new})
    return sorted(found.values(), key=lambda d: d.path), sources


def split_of(text: str, val_fraction: float) -> str:
    """'val' if the document's content hash falls in the first `val_fraction` of [0, 1)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return "val" if h / 2.0**64 < val_fraction else "train"


def _read_text(path: str) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason) for a file that is skipped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None, "unreadable"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "non_utf8"
    return (text, None) if text.strip() else (None, "empty")


# ----------------------------------------------------------------------------- the program


def tokenize_documents(docs: Sequence[Document], tokenizer, *, val_fraction: float,
                       max_tokens: int | None = None, batch_files: int = 256,
                       progress: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads and tokenizes `docs` -> ({split: flat int32 stream, each doc + EOS}, stats)."""
    from tqdm import tqdm

    streams: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    stats: dict[str, Any] = {"documents": {"train": 0, "val": 0},
                             "skipped": {"non_utf8": 0, "unreadable": 0, "empty": 0}, "skipped_examples": []}
    total, start = 0, time.perf_counter()
    bar = tqdm(total=len(docs), unit="file", disable=not progress or None, file=sys.stderr)
    for lo in range(0, len(docs), batch_files):
        texts, kept = [], []
        for doc in docs[lo: lo + batch_files]:
            text, reason = _read_text(doc.path)
            if reason:
                stats["skipped"][reason] += 1
                if len(stats["skipped_examples"]) < 5:
                    stats["skipped_examples"].append(f"{doc.rel} ({reason})")
            else:
                texts.append(text)
                kept.append(doc)
        for text, ids in zip(texts, tokenizer.encode_batch(texts)):
            ids = np.asarray(ids + [tokenizer.eos_id], dtype=np.int32)
            if max_tokens is not None:
                ids = ids[: max_tokens - total]
            split = split_of(text, val_fraction)
            streams[split].append(ids)
            stats["documents"][split] += 1
            total += ids.size
            if max_tokens is not None and total >= max_tokens:
                break
        bar.update(len(docs[lo: lo + batch_files]))
        bar.set_postfix(tokens=total, tok_s=f"{total / max(time.perf_counter() - start, 1e-9):.3g}")
        if max_tokens is not None and total >= max_tokens:
            break
    bar.close()
    return {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in streams.items()}, stats


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Flat token stream -> int32 [len // seq_len, seq_len]; the final partial row is dropped."""
    rows = stream.size // seq_len
    return stream[: rows * seq_len].reshape(rows, seq_len)


def run(cfg: DataRun, *, dry_run: bool = False, progress: bool = True) -> dict[str, Any]:
    """Runs the data program; returns the summary that `main` prints as JSON."""
    from rskd_jax.store.tokens import write_token_store
    from rskd_jax.tokenizer import load_tokenizer

    c: DataConfig = cfg.data
    start = time.perf_counter()
    docs, sources = expand_inputs(c.inputs, c.extensions, c.exclude)
    if not docs:
        raise DataError(f"data.inputs {list(c.inputs)} give no files (extensions {list(c.extensions)}, "
                        f"exclude {list(c.exclude)}); check the paths and data.extensions")
    if dry_run:
        return {"output": c.output, "files": len(docs), "sources": sources,
                "bytes": sum(os.path.getsize(d.path) for d in docs)}
    tok = load_tokenizer(c.tokenizer)
    if tok.eos_id is None:
        raise DataError(f"tokenizer {c.tokenizer!r} has no EOS token; documents need a separator")
    streams, stats = tokenize_documents(docs, tok, val_fraction=c.val_fraction, max_tokens=c.max_tokens,
                                        batch_files=c.batch_files, progress=progress)
    if not any(stats["documents"].values()):
        raise DataError(f"all {len(docs)} input files were skipped ({stats['skipped']}, e.g. "
                        f"{stats['skipped_examples']}); nothing to tokenize")
    splits = {name: pack(s, c.seq_len) for name, s in streams.items()}
    if splits["train"].shape[0] == 0:
        raise DataError(f"only {streams['train'].size} train tokens, fewer than one row of "
                        f"data.seq_len={c.seq_len}; add inputs or lower data.seq_len")
    manifest = {
        "tokenizer": {"spec": c.tokenizer, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id, "bos_id": tok.bos_id},
        "eos_id": tok.eos_id, "sources": sources, "documents": stats["documents"],
        "skipped": dict(stats["skipped"], examples=stats["skipped_examples"]),
        "val_fraction": c.val_fraction, "max_tokens": c.max_tokens,
        "split_rule": "sha256(utf-8 text)[:8] little-endian / 2**64 < val_fraction -> val",
        "packing": "documents in sorted path order, each + EOS, concatenated per split, "
                   "cut into seq_len rows, final partial row dropped",
    }
    existed = _complete_manifest(c.output)
    final = write_token_store(c.output, splits, manifest, overwrite=c.overwrite)
    save_config(cfg, c.output)
    seconds = time.perf_counter() - start
    tokens = int(sum(s.size for s in streams.values()))
    return {"output": c.output, "rows": {k: int(v.shape[0]) for k, v in splits.items()},
            "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds),
            "documents": stats["documents"], "skipped": final["skipped"],
            "content_hash": final["content_hash"], "unchanged": existed == final}


def _complete_manifest(url: str) -> dict[str, Any] | None:
    from rskd_jax.store.common import read_json

    try:
        m = read_json(url)
    except ValueError:
        return None
    return m if m and m.get("complete") is True else None


def main(argv: Sequence[str] | None = None) -> None:
    cfg, flags = parse_cli(DataRun, argv, prog="python -m rskd_jax.data", flags=("dry-run",))
    print(json.dumps(run(cfg, dry_run=flags["dry_run"]), sort_keys=True))


# ----------------------------------------------------------------------------- row sources


class RowSource(Protocol):
    """Rows addressed by a global index; `read` is one batched read for many indices."""

    @property
    def num_rows(self) -> int: ...

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class TokenRows:
    """One split of a token store as a row source: {"tokens": int32 [b, L], "index": int64 [b]}."""

    def __init__(self, store, split: str = "train"):
        self.store, self.split = store, split
        self.num_rows = store.num_rows(split)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        return {"tokens": self.store.read(self.split, idx), "index": idx}


class JoinedSource:
    """Reads the same row indices from several sources and merges their dicts (e.g. token
    rows + teacher-store rows). All must have the same `num_rows`; field names must not
    collide, except "index", which must agree."""

    def __init__(self, *sources: RowSource):
        sizes = [s.num_rows for s in sources]
        if not sources or len(set(sizes)) != 1:
            raise DataError(f"JoinedSource needs sources with the same num_rows, got {sizes}")
        self.sources, self.num_rows = sources, sizes[0]

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for source in self.sources:
            for key, value in source.read(indices).items():
                if key in out and not (key == "index" and np.array_equal(out[key], value)):
                    raise DataError(f"JoinedSource: field {key!r} comes from more than one source")
                out[key] = value
        return out


# ----------------------------------------------------------------------------- batches


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """Rows per process; a fix-it error when the global batch does not split evenly."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(f"global_batch_size {global_batch_size} is not a positive multiple of the "
                        f"process count ({process_count}); set batch_size to a multiple of {process_count}")
    return global_batch_size // process_count


def _read_local(idx_B: np.ndarray, *, source: RowSource, global_batch_size: int, lo: int, hi: int):
    """Pads a short final global batch with index -1, takes rows [lo, hi) and reads them."""
    full = np.full(global_batch_size, -1, np.int64)
    full[: len(idx_B)] = idx_B
    local = full[lo:hi]
    valid = local >= 0  # padding is a suffix
    batch = dict(source.read(local[valid]))
    if not valid.all():
        b = hi - lo
        for key, value in batch.items():
            padded = np.zeros((b,) + value.shape[1:], value.dtype)
            padded[: len(value)] = value
            batch[key] = padded
    batch["index"] = local
    return batch


def make_batch_iterator(source: RowSource, *, global_batch_size: int, seed: int, shuffle: bool = True,
                        num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                        drop_remainder: bool = True, num_threads: int = 2,
                        prefetch: int = 2) -> grain.DatasetIterator:
    """Batches of rows for this process, as a checkpointable grain iterator.

    Each epoch is a fresh permutation of row indices (seeded by `seed` and the epoch);
    global batches are cut within an epoch; process p gets rows [p*b, (p+1)*b) of each global
    batch (b = global_batch_size / process_count) and reads them with one `source.read`.
    `num_epochs=None` repeats forever. With `drop_remainder=False` the last global batch of
    an epoch is padded to full size with rows whose "index" is -1 (zeros elsewhere), so
    every batch has a static shape; mask on `index >= 0`.
    `it.get_state()` / `it.set_state(state)` resume exactly (a dict; store it as JSON).
    """
    b = local_batch_size(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside [0, {process_count})")
    n = source.num_rows
    if n == 0 or (drop_remainder and n < global_batch_size):
        raise DataError(f"the source has {n} rows, fewer than one global batch of {global_batch_size}; "
                        "lower the batch size or add data")
    ds = grain.MapDataset.range(n)
    if shuffle:
        if not 0 <= seed < 2**32:
            raise DataError(f"seed must be in [0, 2**32), got {seed}")
        ds = ds.shuffle(seed=seed)
    ds = ds.batch(global_batch_size, drop_remainder=drop_remainder)  # within each epoch
    ds = ds.repeat(num_epochs)
    lo = process_index * b
    ds = ds.map(lambda idx: _read_local(np.asarray(idx, np.int64), source=source,
                                        global_batch_size=global_batch_size, lo=lo, hi=lo + b))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def steps_per_epoch(num_rows: int, global_batch_size: int, drop_remainder: bool = True) -> int:
    return num_rows // global_batch_size if drop_remainder else -(-num_rows // global_batch_size)


if __name__ == "__main__":
    main()
