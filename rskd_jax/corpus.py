"""Corpus readers: `data.inputs` -> input files -> shards -> documents, with skips counted.

Formats, chosen by file name:

    text      any other file: one document (UTF-8; `.gz` / `.zst` are decompressed)
    jsonl     .jsonl / .ndjson (+ .gz / .zst), and .json.gz / .json.zst whose first line is a
              JSON object: one document per line, text in the field `text_key`
    parquet   .parquet: text in the column `text_key`, read one row group at a time
    arrow     .arrow: Arrow IPC stream (or file) shards as `datasets.Dataset.save_to_disk`
              writes them (`data-00000-of-00004.arrow` ...), text in the column `text_key`

The unit of work is a shard: a Parquet row group, a fixed range of `shard_records` JSONL
lines / Arrow rows, or a run of consecutive text files (~1 MB). `plan_shards` lists them in input order (paths
sorted, records in file order); `read_shard` yields each record as (text, None) or
(None, reason). Reasons: unreadable, non_utf8, empty, bad_json, missing_key, not_string.
Nothing here tokenizes or writes.

    files, sources = expand_inputs(["corpus/", "@stdlib/json/*.py"])
    shards = plan_shards(files, [count_records(f) for f in files], shard_records=10_000)
    sh = shards[0]
    for text, reason in read_shard(files[sh.file: sh.file + sh.files], sh, text_key="text"): ...
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import gzip
import io
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

STDLIB = "@stdlib"
# Directories never taken from the standard library: its test suites and installed packages.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
TEXT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
CORPUS_EXTENSIONS = (
    ".txt.gz",
    ".txt.zst",
    ".jsonl",
    ".jsonl.gz",
    ".jsonl.zst",
    ".ndjson",
    ".json.gz",
    ".json.zst",
    ".parquet",
    ".arrow",
)
SKIP_REASONS = ("unreadable", "non_utf8", "empty", "bad_json", "missing_key", "not_string")


class DataError(ValueError):
    """The inputs give nothing to tokenize, or a data argument is invalid."""


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    rel: str  # relative to its input root, for reports
    input: int  # index of the `data.inputs` entry that reached it first
    format: str = "text"  # text | jsonl | parquet | arrow


@dataclasses.dataclass(frozen=True)
class Shard:
    file: int  # index into the file list
    start: int  # first record (line / row; row group index for parquet; 0 for text)
    stop: int  # one past the last record (text: the number of files)
    files: int = 1  # text: consecutive files file .. file + files - 1, one document each


# ----------------------------------------------------------------------------- inputs


def _walk(root: str, extensions: Sequence[str], skip_dirs: frozenset[str] = frozenset()):
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip_dirs and x != "__pycache__" and not x.startswith("."))
        for f in sorted(files):
            if f.endswith(tuple(extensions)):
                yield os.path.join(d, f)


def _compression(path: str) -> str | None:
    return "gzip" if path.endswith(".gz") else "zstd" if path.endswith(".zst") else None


def _open(path: str, compression: str | None = None) -> io.BufferedIOBase:
    """A binary stream of the file's (decompressed) bytes."""
    compression = compression or _compression(path)
    if compression == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def file_format(path: str) -> str:
    """text | jsonl | parquet | arrow, from the name (and the first line of a .json.gz/.zst)."""
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    base = name.removesuffix(".gz").removesuffix(".zst")
    if base.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if base.endswith(".json") and base != name:  # .json.gz: JSON lines if the first line is an object
        try:
            with _open(path) as f:
                first = f.readline(1 << 24).strip()
            return "jsonl" if first.startswith(b"{") and isinstance(json.loads(first), dict) else "text"
        except (OSError, ValueError, EOFError):
            return "text"
    return "text"


def expand_inputs(
    inputs: Sequence[str], extensions: Sequence[str] = TEXT_EXTENSIONS + CORPUS_EXTENSIONS, exclude: Sequence[str] = ()
) -> tuple[list[InputFile], list[dict[str, Any]]]:
    """Files, dirs, globs and '@stdlib' -> (files sorted by path, per-input file counts).

    Directories are walked recursively keeping `extensions` (hidden dirs and __pycache__
    skipped); files named directly or matched by a glob are kept whatever their suffix.
    `exclude` holds fnmatch patterns matched against absolute paths. A file reached twice
    counts once, for the first input that reaches it.
    """
    found: dict[str, InputFile] = {}
    sources = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for k, given in enumerate(inputs):
        # '@stdlib/json/*.py' names paths inside the standard library on any machine.
        spec = stdlib + given[len(STDLIB) :] if given.startswith(STDLIB + "/") else given
        if spec == STDLIB:
            pairs = [(p, stdlib) for p in _walk(stdlib, extensions, STDLIB_SKIP_DIRS)]
        elif os.path.isfile(spec):
            pairs = [(spec, os.path.dirname(spec))]
        elif os.path.isdir(spec):
            pairs = [(p, spec) for p in _walk(spec, extensions)]
        elif glob.has_magic(spec):
            base = spec[: min(spec.find(c) for c in "*?[" if c in spec)].rpartition("/")[0] or "."
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
                found[key] = InputFile(os.path.abspath(p), os.path.relpath(p, rel_root), k, file_format(p))
                new += 1
        sources.append({"input": given, "path": stdlib if spec == STDLIB else spec, "files": new})
    return sorted(found.values(), key=lambda d: d.path), sources


def file_identity(f: InputFile) -> list:
    """What a resumed run checks is unchanged: path, format, size and modification time."""
    st = os.stat(f.path)
    return [f.path, f.format, st.st_size, st.st_mtime_ns]


# ----------------------------------------------------------------------------- shards


def count_records(f: InputFile) -> int:
    """Records in a file: 1 (text), lines (jsonl), row groups (parquet) or rows (arrow).
    PERF: a JSONL file is decompressed once here; an Arrow file is memory-mapped."""
    if f.format == "text":
        return 1
    n = 0
    try:
        if f.format == "jsonl":
            with _open(f.path) as fh:
                for _ in fh:
                    n += 1  # a truncated file: the lines before the damage
            return n
        if f.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(f.path).metadata.num_row_groups
        return sum(b.num_rows for b in _arrow_batches(f.path))
    except Exception:
        return n


TEXT_SHARD_BYTES = 1 << 20


def plan_shards(
    files: Sequence[InputFile], counts: Sequence[int], shard_records: int, text_shard_bytes: int = TEXT_SHARD_BYTES
) -> list[Shard]:
    """Shards in input order: one per Parquet row group, `shard_records`-record ranges of
    JSONL lines and Arrow rows, and runs of consecutive text files of one input (up to
    `text_shard_bytes` and `shard_records` files; PERF: one task per small file cost more
    than its tokenization). `counts` from `count_records`."""
    shards: list[Shard] = []
    group: list[int] = []  # consecutive text files of one input
    size = 0

    def close() -> None:
        nonlocal size
        if group:
            shards.append(Shard(group[0], 0, len(group), len(group)))
        group.clear()
        size = 0

    for i, (f, n) in enumerate(zip(files, counts)):
        if f.format == "text":
            b = _size(f.path)
            if group and (
                files[group[0]].input != f.input or size + b > text_shard_bytes or len(group) >= shard_records
            ):
                close()
            group.append(i)
            size += b
            continue
        close()
        step = 1 if f.format == "parquet" else shard_records
        shards += [Shard(i, lo, min(lo + step, n)) for lo in range(0, max(n, 1), step)]
    close()
    return shards


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _arrow_batches(path: str):
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)


Record = tuple[str | None, str | None]  # (text, None) or (None, skip reason)


def read_shard(files: Sequence[InputFile], shard: Shard, *, text_key: str) -> Iterator[Record]:
    """The records of `shard` (whose files are `files`) in file order. A file that cannot be
    read (missing, truncated, corrupt) ends with one (None, 'unreadable') after what could be read."""
    f = files[0]
    try:
        if f.format == "text":
            yield from (_text_record(g) for g in files)
        elif f.format == "jsonl":
            yield from _jsonl_records(f.path, shard.start, shard.stop, text_key)
        elif f.format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f.path)
            if text_key in pf.schema_arrow.names:  # PERF: only the text column is read
                yield from _column_records(pf.read_row_group(shard.start, columns=[text_key]), text_key)
            else:
                rows = pf.metadata.row_group(shard.start).num_rows
                yield from ((None, "missing_key") for _ in range(rows))
        else:
            yield from _arrow_records(f.path, shard.start, shard.stop, text_key)
    except Exception:
        yield None, "unreadable"


def _checked(text: str) -> Record:
    if not text.strip():
        return None, "empty"
    try:
        text.encode("utf-8")  # JSON may carry lone surrogates ("\ud800")
    except UnicodeEncodeError:
        return None, "non_utf8"
    return text, None


def _text_record(f: InputFile) -> Record:
    try:
        with _open(f.path) as fh:
            raw = fh.read()
    except Exception:
        return None, "unreadable"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "non_utf8"
    return _checked(text)


def _value_record(value: Any) -> Record:
    if value is None:
        return None, "missing_key"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8"
    if not isinstance(value, str):
        return None, "not_string"
    return _checked(value)


def _jsonl_records(path: str, start: int, stop: int, key: str) -> Iterator[Record]:
    # PERF: a compressed file cannot seek; the lines before `start` are decompressed and skipped.
    with _open(path) as fh:
        for i, line in enumerate(fh):
            if i >= stop:
                return
            if i < start:
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                yield None, "non_utf8"
                continue
            except ValueError:
                yield (None, "empty") if not line.strip() else (None, "bad_json")
                continue
            if not isinstance(obj, dict):
                yield None, "bad_json"
            elif key not in obj:
                yield None, "missing_key"
            else:
                yield _value_record(obj[key])


def _column_records(table, key: str) -> Iterator[Record]:
    if key not in table.column_names:
        yield from ((None, "missing_key") for _ in range(table.num_rows))
        return
    for value in table.column(key).to_pylist():
        yield _value_record(value)


def _arrow_records(path: str, start: int, stop: int, key: str) -> Iterator[Record]:
    import pyarrow as pa

    row = 0
    for batch in _arrow_batches(path):
        lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
        if hi > lo:
            yield from _column_records(pa.Table.from_batches([batch.slice(lo, hi - lo)]), key)
        row += batch.num_rows
        if row >= stop:
            return
