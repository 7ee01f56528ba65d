"""The data program: corpora -> token store (`python -m rskd_jax.data`).

    python -m rskd_jax.data --config configs/tiny/data.yaml data.seq_len=256 data.workers=2

What it does: expand `data.inputs` (or each of `data.sources`) into files (text, JSONL,
Parquet, Arrow: `rskd_jax.corpus`), cut them into shards (a file, a Parquet row group, a
range of JSONL lines or Arrow rows), tokenize the shards in `data.workers` processes, put
each document in train or val by a hash of its content (duplicates share a split, so val
never sees a train document), add [BOS +] ... + EOS to every document, concatenate each
split in shard order (sources interleaved at document level) and cut it into `seq_len`-token
rows as they fill (the final partial row is dropped). The store records where each
document starts (`{split}/doc_starts`). Bad records are skipped and counted by reason.

The store's bytes depend only on the inputs and the config, not on `data.workers`, the
process count, or on a kill: a re-run of a killed run (`SIGKILL` included) continues, and
tokenizes only the shards that were not finished (`rskd_jax.ingest`). With
`distributed.enabled=true` (launched like the cache program) the processes split the shards
and process 0 writes the store. A re-run of a finished store with the same config and
unchanged input files does nothing (`"unchanged": true`).

The input pipeline over the stores is `rskd_jax.train_data`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from rskd_jax.config import DataConfig, DataRun, parse_cli, save_config
from rskd_jax.corpus import (
    STDLIB,
    DataError,
    InputFile,
    Shard,
    count_records,
    expand_inputs,
    file_identity,
    plan_shards,
)
from rskd_jax.ingest import split_of
from rskd_jax.packing import Mixer, Source

__all__ = ["STDLIB", "DataError", "expand_inputs", "main", "pack", "run", "split_of"]

RESULT_KEYS = ("content_hash", "doc_starts_hash", "splits", "documents", "skipped", "tokens", "source_stats")


def pack(stream, seq_len: int):
    """Flat token stream -> int32 [len // seq_len, seq_len]; the final partial row is dropped."""
    rows = stream.size // seq_len
    return stream[: rows * seq_len].reshape(rows, seq_len)


@dataclasses.dataclass
class Plan:
    files: list[InputFile]
    inputs: list[dict[str, Any]]  # per data.inputs entry (per source): input, path, files
    sources: list[Source]
    shards: list[Shard] = dataclasses.field(default_factory=list)


def expand(c: DataConfig) -> Plan:
    """The files of `data.inputs` or of every `data.sources` entry, in input order."""
    specs = (
        [(None, c.inputs, c.exclude, None, None)]
        if not c.sources
        else [(s.name, s.inputs, s.exclude, s.weight, s.max_tokens) for s in c.sources]
    )
    files: list[InputFile] = []
    inputs: list[dict[str, Any]] = []
    sources: list[Source] = []
    for name, given, exclude, weight, budget in specs:
        found, meta = expand_inputs(given, c.extensions, exclude)
        if name and not found:
            raise DataError(
                f"data.sources[{name}]: inputs {list(given)} give no files (extensions "
                f"{list(c.extensions)}, exclude {list(exclude)})"
            )
        base = len(inputs)
        files += [dataclasses.replace(f, input=base + f.input) for f in found]
        inputs += [dict(m, source=name) if name else m for m in meta]
        sources.append(Source(name, 0, 0, float(weight or budget or 1.0), budget))
    return Plan(files, inputs, sources)


def make_shards(plan: Plan, counts: list[int], shard_records: int) -> None:
    """Fills plan.shards and each source's shard range (sources in order, files in order)."""
    first_file = 0
    for k, s in enumerate(plan.sources):
        n_files = sum(1 for f in plan.files[first_file:] if _source_of(plan, f) == k)
        files = list(range(first_file, first_file + n_files))
        shards = [
            dataclasses.replace(sh, file=sh.file + first_file)
            for sh in plan_shards([plan.files[i] for i in files], [counts[i] for i in files], shard_records)
        ]
        plan.sources[k] = dataclasses.replace(s, first=len(plan.shards), count=len(shards))
        plan.shards += shards
        first_file += n_files


def _source_of(plan: Plan, f: InputFile) -> int:
    name = plan.inputs[f.input].get("source")
    return 0 if name is None else [s.name for s in plan.sources].index(name)


def resolve_add_bos(tok, setting: bool | str) -> bool:
    """auto: whether the tokenizer's own post-processor prepends its BOS (Llama-3 does,
    SmolLM2 does not)."""
    if setting != "auto":
        return bool(setting)
    if tok.bos_id is None:
        return False
    ids = tok.backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == tok.bos_id


def header_of(c: DataConfig, plan: Plan, tok, add_bos: bool) -> dict[str, Any]:
    """The manifest minus what only the finished write knows: equal headers, equal stores."""
    from rskd_jax.store.common import fingerprint
    from rskd_jax.store.tokens import KIND, LAYOUT_VERSION

    if add_bos and tok.bos_id is None:
        raise DataError(f"data.add_bos=true but tokenizer {c.tokenizer!r} has no BOS token")
    return {
        "kind": KIND,
        "layout_version": LAYOUT_VERSION,
        "seq_len": c.seq_len,
        "tokenizer": {
            "spec": c.tokenizer,
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
        },
        "eos_id": tok.eos_id,
        "add_bos": add_bos,
        "sources": plan.inputs,
        "mixture": [{"name": s.name, "weight": s.weight, "max_tokens": s.max_tokens} for s in plan.sources]
        if c.sources
        else None,
        "text_key": c.text_key,
        "val_fraction": c.val_fraction,
        "max_tokens": c.max_tokens,
        "shard_records": c.shard_records,
        "input_files": {"count": len(plan.files), "fingerprint": fingerprint([file_identity(f) for f in plan.files])},
        "split_rule": "sha256(utf-8 text)[:8] little-endian / 2**64 < val_fraction -> val",
        "packing": "documents in input order (paths sorted, records in file order; sources interleaved "
        "by weight at document level), each [+ BOS] + EOS, concatenated per split, cut into "
        "seq_len rows, final partial row dropped",
    }


def _count(plan: Plan, workers: int) -> list[int]:
    slow = [i for i, f in enumerate(plan.files) if f.format in ("jsonl", "arrow")]
    counts = [1 if f.format == "text" else 0 for f in plan.files]
    fast = [i for i, f in enumerate(plan.files) if f.format == "parquet"]
    for i in fast:
        counts[i] = count_records(plan.files[i])
    if len(slow) > 1 and workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(workers, len(slow))) as pool:
            for i, n in zip(slow, pool.map(count_records, [plan.files[i] for i in slow])):
                counts[i] = n
    else:
        for i in slow:
            counts[i] = count_records(plan.files[i])
    return counts


# Below this much input, worker processes cost more than they save (each starts in ~1 s);
# the tokenizer's own threads still use every core in process.
SMALL_INPUT_BYTES = 4 << 20


def default_workers(plan: Plan) -> int:
    """`data.workers` unset: one tokenizer process per core, none for a small input."""
    small = sum(os.path.getsize(f.path) for f in plan.files) < SMALL_INPUT_BYTES
    return 0 if small else len(os.sched_getaffinity(0))


class _Processes:
    """This process's place among `jax.distributed` processes (one process without it)."""

    def __init__(self, cfg: DataRun):
        self.index, self.count = 0, 1
        if cfg.distributed.enabled:
            import jax

            from rskd_jax.sharding import initialize_distributed

            initialize_distributed(cfg.distributed)
            self.index, self.count = jax.process_index(), jax.process_count()

    def barrier(self, name: str) -> None:
        if self.count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"rskd_jax.data: {name}")


def run(cfg: DataRun, *, dry_run: bool = False, progress: bool = True) -> dict[str, Any]:
    """Runs the data program; returns the summary that `main` prints as JSON."""
    from rskd_jax import ingest
    from rskd_jax.packing import Mixer, Packer
    from rskd_jax.store import common
    from rskd_jax.store.tokens import TokenStoreWriter, begin_token_store
    from rskd_jax.tokenizer import load_tokenizer

    c: DataConfig = cfg.data
    start = time.perf_counter()
    plan = expand(c)
    if not plan.files:
        raise DataError(
            f"data.inputs {list(c.inputs)} give no files (extensions {list(c.extensions)}, "
            f"exclude {list(c.exclude)}); check the paths and data.extensions"
        )
    if dry_run:
        return {
            "output": c.output,
            "files": len(plan.files),
            "sources": plan.inputs,
            "bytes": sum(os.path.getsize(f.path) for f in plan.files),
        }
    procs = _Processes(cfg)
    tok = load_tokenizer(c.tokenizer)
    if tok.eos_id is None:
        raise DataError(f"tokenizer {c.tokenizer!r} has no EOS token; documents need a separator")
    add_bos = resolve_add_bos(tok, c.add_bos)
    header = header_of(c, plan, tok, add_bos)
    workers = default_workers(plan) if c.workers is None else c.workers

    # ---- the store: finished already, interrupted (resume), or new
    status = (
        begin_token_store(c.output, header, overwrite=c.overwrite, result_keys=RESULT_KEYS)
        if procs.index == 0
        else None
    )
    procs.barrier("store ready")
    if status is None:
        m = common.read_json(c.output) or {}
        status = "complete" if m.get("complete") is True else "resume"
    if status == "complete":
        if procs.index == 0:
            _drop_work(c.output)  # a kill right after the manifest
            save_config(cfg, c.output)
        return _summary(common.read_json(c.output), c.output, start, unchanged=True, tokenized=0)

    plan_shards_once(c, plan, procs, workers)
    splits = ("train", "val") + tuple(f"val_{s.name}" for s in plan.sources if s.name)
    checkpoint = ingest.load_checkpoint(c.output) if status == "resume" and procs.index == 0 else None
    writer = TokenStoreWriter(c.output, c.seq_len, splits, create=checkpoint is None) if procs.index == 0 else None
    packer = Packer(writer.write if writer else None, splits, c.seq_len, writer.block_rows if writer else 1)
    mixer = Mixer(plan.sources, packer, max_tokens=c.max_tokens)
    if checkpoint is not None:
        mixer.restore(checkpoint[0]["mixer"])
        packer.restore(checkpoint[0]["packer"], checkpoint[1])
    job = ingest.TokenizeJob(c.output, c.tokenizer, c.text_key, c.val_fraction, add_bos, c.batch_files)
    pool = ingest.ShardPool(job, plan.files, plan.shards, workers)
    local = lambda g: g % procs.count == procs.index
    try:
        if procs.index == 0:
            bar = _progress_bar(progress)
            tokenized = ingest.pack_all(
                c.output,
                pool,
                mixer,
                packer,
                local=local,
                seq=checkpoint[0]["seq"] if checkpoint else 0,
                checkpoint_seconds=c.checkpoint_seconds,
                progress=bar.update if bar is not None else None,
            )
            if bar is not None:
                bar.close()
        else:
            todo = ingest.remaining(c.output, plan.sources, local)
            ingest.tokenize_all(pool, todo)
            tokenized = len(todo)
    finally:
        pool.close()
    final = finish(c, plan, mixer, packer, writer, header) if procs.index == 0 else None
    procs.barrier("store written")
    if procs.index == 0:
        _drop_work(c.output)
        save_config(cfg, c.output)
    else:
        final = common.read_json(c.output)
    return dict(
        _summary(
            final,
            c.output,
            start,
            unchanged=False,
            tokenized=tokenized,
            shards=len(plan.shards),
            resumed=checkpoint is not None or status == "resume",
        ),
        workers=workers,
    )


def plan_shards_once(c: DataConfig, plan: Plan, procs: _Processes, workers: int) -> None:
    """Fills plan.shards from the record counts saved with the store (counted once: a
    resumed run does not decompress its JSONL again)."""
    from rskd_jax import ingest
    from rskd_jax.store import common

    saved = common.read_json(c.output, ingest.WORK + "plan.json")
    if saved is None and procs.index == 0:
        saved = {"counts": _count(plan, workers)}
        common.write_json(c.output, saved, ingest.WORK + "plan.json")
    procs.barrier("plan ready")
    if saved is None:
        saved = common.read_json(c.output, ingest.WORK + "plan.json")
    make_shards(plan, saved["counts"], c.shard_records)  # type: ignore[index]


def finish(c: DataConfig, plan: Plan, mixer, packer, writer, header: dict[str, Any]) -> dict[str, Any]:
    """Checks what was read, writes the last rows and the complete manifest."""
    from rskd_jax import ingest

    _check_inputs(plan, mixer, c)
    rows = packer.finish()
    state = mixer.state()
    documents = {k: sum(d[k] for d in state["documents"]) for k in ("train", "val")}
    if not any(documents.values()):
        raise DataError(
            f"all {len(plan.files)} input files gave no document ({mixer.skipped}, e.g. "
            f"{mixer.examples}); nothing to tokenize"
        )
    if rows["train"] == 0:
        raise DataError(
            f"only {mixer.total} tokens, fewer than one train row of data.seq_len={c.seq_len}; "
            "add inputs or lower data.seq_len"
        )
    results = {
        "documents": documents,
        "tokens": mixer.total,
        "skipped": dict(ingest.empty_skips(), **mixer.skipped, examples=mixer.examples),
        "source_stats": {
            s.name: {"documents": state["documents"][k], "tokens": state["taken"][k]}
            for k, s in enumerate(plan.sources)
            if s.name
        }
        or None,
    }
    return writer.finish(rows, dict(header, **results))


def ts_range(prefix: str):
    import tensorstore as ts

    return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))


def _drop_work(url: str) -> None:
    """Deletes the spool and checkpoints (and, on a local disk, their empty directories)."""
    import shutil

    from rskd_jax import ingest
    from rskd_jax.store.common import local_path

    ingest.kv_of(url).delete_range(ts_range(ingest.WORK)).result()
    root = local_path(url)
    if root is not None:
        shutil.rmtree(os.path.join(root, ingest.WORK), ignore_errors=True)


def _check_inputs(plan: Plan, mixer: Mixer, c: DataConfig) -> None:
    """An input that was read to its end and gave no document is an error that names it."""
    if c.max_tokens is not None and mixer.total >= c.max_tokens:
        return
    for k, meta in enumerate(plan.inputs):
        s = _source_index(plan, meta)
        finished = mixer.shard[s] >= plan.sources[s].count
        if meta["files"] and finished and not mixer.input_documents.get(str(k)):
            raise DataError(
                f"data.inputs {meta['input']!r} ({meta['files']} files) gave no document: every "
                f"record was skipped (all inputs: {mixer.skipped}, e.g. {mixer.examples}); "
                f"check the files, data.text_key={c.text_key!r} and data.extensions"
            )


def _source_index(plan: Plan, meta: dict[str, Any]) -> int:
    name = meta.get("source")
    return 0 if name is None else [s.name for s in plan.sources].index(name)


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="tok", unit_scale=True, file=sys.stderr)


def _summary(
    m: dict[str, Any],
    output: str,
    start: float,
    *,
    unchanged: bool,
    tokenized: int,
    shards: int | None = None,
    resumed: bool = False,
) -> dict[str, Any]:
    import resource

    seconds = time.perf_counter() - start
    tokens = int(m.get("tokens", 0))
    cpu = {
        k: round(r.ru_utime + r.ru_stime, 2)
        for k, r in (
            ("main", resource.getrusage(resource.RUSAGE_SELF)),
            ("workers", resource.getrusage(resource.RUSAGE_CHILDREN)),
        )
    }
    out = {
        "output": output,
        "rows": {k: v["num_sequences"] for k, v in m["splits"].items()},
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds),
        "documents": m["documents"],
        "skipped": m["skipped"],
        "content_hash": m["content_hash"],
        "unchanged": unchanged,
        "resumed": resumed,
        "shards_tokenized": tokenized,
        "cpu_s": cpu,
    }  # this process (packing, writing) and its finished tokenizer workers
    if shards is not None:
        out["shards"] = shards
    if m.get("source_stats"):
        out["source_stats"] = m["source_stats"]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    cfg, flags = parse_cli(DataRun, argv, prog="python -m rskd_jax.data", flags=("dry-run",))
    print(json.dumps(run(cfg, dry_run=flags["dry_run"]), sort_keys=True))


if __name__ == "__main__":
    main()
