"""Shards -> tokenizer worker processes -> spool -> packed rows in the token store, resumable.

Every shard is read and tokenized by one worker (`tokenize_shard`): each document gets
[BOS +] ids + EOS and its split from its content hash; the result goes to the spool
`<output>/_work/shards/<index>` (zstd npz). The main process takes documents from the spool
in the fixed order of `packing.Mixer` and writes full blocks of rows as they fill
(`packing.Packer`), checkpointing its state to `_work/state.json` every few seconds. The
store's bytes therefore depend only on the shard order, never on the number of workers, on
which process tokenized a shard, or on where a killed run stopped.

Resume: a shard in the spool is never tokenized again; a checkpoint deletes the spool
entries it covers. Multi-process (`jax.distributed`): process p tokenizes the unfinished
shards with index = p (mod P) into the shared spool; process 0 packs and writes.
Memory: each worker holds one shard; the main process one block of rows per split plus
one shard per source; the submission window is a few shards per worker.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorstore as ts

from rskd_jax.corpus import SKIP_REASONS, InputFile, Shard, read_shard
from rskd_jax.packing import Mixer, Packer, ShardDocs
from rskd_jax.store import common

WORK = "_work/"
SPOOL = WORK + "shards/"


def split_of(text: str, val_fraction: float) -> str:
    """'val' if the document's content hash falls in the first `val_fraction` of [0, 1)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return "val" if h / 2.0**64 < val_fraction else "train"


@dataclasses.dataclass(frozen=True)
class TokenizeJob:
    """What every worker needs (picklable)."""

    url: str  # the store; the spool lives under it
    tokenizer: str
    text_key: str
    val_fraction: float
    add_bos: bool
    batch_docs: int = 256


# ----------------------------------------------------------------------------- workers

_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(spec: str):
    if spec not in _TOKENIZERS:
        from rskd_jax.tokenizer import load_tokenizer

        _TOKENIZERS[spec] = load_tokenizer(spec)
    return _TOKENIZERS[spec]


def _init_worker() -> None:
    # One core per worker: `data.workers` is the parallelism (the Rust tokenizer would
    # otherwise start a thread per core in every worker).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    # Die with the main process (SIGKILL included): no orphan writes into the spool of a
    # store that a re-run is already finishing.
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _label(files: list[InputFile], shard: Shard, r: int) -> str:
    f = files[0]
    if f.format == "text":
        return files[r].rel
    if f.format == "parquet":
        return f"{f.rel}:row_group {shard.start} row {r}"
    return f"{f.rel}:{'line' if f.format == 'jsonl' else 'row'} {shard.start + r + (f.format == 'jsonl')}"


def tokenize_shard(job: TokenizeJob, index: int, files: list[InputFile], shard: Shard) -> int:
    """Reads and tokenizes one shard (of `files`) into the spool; returns `index`."""
    tok = _tokenizer(job.tokenizer)
    skipped: dict[str, int] = {}
    examples: list[str] = []
    texts: list[str] = []
    for r, (text, reason) in enumerate(read_shard(files, shard, text_key=job.text_key)):
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            if len(examples) < 5:
                examples.append(f"{_label(files, shard, r)} ({reason})")
        else:
            texts.append(text)  # type: ignore[arg-type]
    pieces, lengths = [], []
    head = [tok.bos_id] if job.add_bos else []
    for lo in range(0, len(texts), job.batch_docs):
        for ids in tok.encode_batch(texts[lo : lo + job.batch_docs]):
            doc = np.asarray(head + ids + [tok.eos_id], np.int32)
            pieces.append(doc)
            lengths.append(doc.size)
    val = np.array([split_of(t, job.val_fraction) == "val" for t in texts], bool)
    stats = {"skipped": skipped, "examples": examples, "input": files[0].input}
    docs = ShardDocs(
        np.concatenate(pieces) if pieces else np.zeros(0, np.int32), np.asarray(lengths, np.int64), val, stats
    )
    kv_of(job.url).write(f"{SPOOL}{index:08d}", encode_docs(docs)).result()
    return index


def encode_docs(docs: ShardDocs) -> bytes:
    import zstandard

    buf = io.BytesIO()
    np.savez(
        buf,
        tokens=docs.tokens,
        lengths=docs.lengths,
        val=docs.val,
        stats=np.frombuffer(json.dumps(docs.stats).encode(), np.uint8),
    )
    return zstandard.ZstdCompressor(level=1).compress(buf.getvalue())


def decode_docs(blob: bytes) -> ShardDocs:
    import zstandard

    z = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(blob)))
    return ShardDocs(z["tokens"], z["lengths"], z["val"], json.loads(z["stats"].tobytes()))


_KVSTORES: dict[str, ts.KvStore] = {}


def kv_of(url: str) -> ts.KvStore:
    """One KvStore per store per process (a fresh open per shard would build a new context)."""
    url = common.store_url(url)
    if url not in _KVSTORES:
        _KVSTORES[url] = ts.KvStore.open(url).result()
    return _KVSTORES[url]


# ----------------------------------------------------------------------------- scheduling


class ShardPool:
    """Tokenizes shards in `workers` spawned processes, or in this process when 0."""

    def __init__(self, job: TokenizeJob, files: list[InputFile], shards: list[Shard], workers: int):
        self.job, self.files, self.shards, self.workers = job, files, shards, workers
        self.futures: dict[int, Any] = {}
        self._pool = None
        if workers > 0:
            import multiprocessing

            # spawn, not fork: the parent may hold jax / tensorstore threads
            self._pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)

    def submit(self, i: int) -> None:
        sh = self.shards[i]
        args = (self.job, i, self.files[sh.file : sh.file + sh.files], sh)
        if self._pool is None:
            self.futures[i] = tokenize_shard(*args)
        else:
            self.futures[i] = self._pool.apply_async(tokenize_shard, args)

    def wait(self, i: int) -> None:
        f = self.futures.pop(i)
        if not isinstance(f, int):
            f.get()  # re-raises a worker's exception here

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()


def spooled(url: str) -> set[int]:
    keys = kv_of(url).list(ts.KvStore.KeyRange(SPOOL, SPOOL[:-1] + "0")).result()
    return {int(k.decode()[len(SPOOL) :]) for k in keys}


def remaining(url: str, sources: list, local: Callable[[int], bool]) -> list[int]:
    """The local shards not yet spooled nor taken by the packing process (its last checkpoint)."""
    state = common.read_json(url, WORK + "state.json")
    have = spooled(url)
    todo = []
    for k, s in enumerate(sources):
        taken = state["mixer"]["shard"][k] if state else 0
        todo += [g for g in range(s.first + taken, s.first + s.count) if local(g) and g not in have]
    return todo


def tokenize_all(pool: ShardPool, todo: list[int]) -> None:
    """A non-packing process: tokenizes its shards, a bounded window at a time."""
    queue = collections.deque(todo)
    window = max(1, 2 * pool.workers)
    while queue or pool.futures:
        while queue and len(pool.futures) < window:
            pool.submit(queue.popleft())
        pool.wait(next(iter(pool.futures)))


# ----------------------------------------------------------------------------- checkpoint


def load_checkpoint(url: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    state = common.read_json(url, WORK + "state.json")
    if state is None:
        return None
    blob = kv_of(url).read(WORK + state["arrays"]).result().value
    z = np.load(io.BytesIO(blob))
    return state, {k.replace(":", "/"): z[k] for k in z.files}


def save_checkpoint(url: str, seq: int, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    kv = kv_of(url)
    buf = io.BytesIO()
    np.savez(buf, **{k.replace("/", ":"): v for k, v in arrays.items()})
    name = f"state-{seq:08d}.npz"
    kv.write(WORK + name, buf.getvalue()).result()
    common.write_json(url, dict(state, arrays=name, seq=seq), WORK + "state.json")  # atomic switch
    if seq > 0:
        kv.delete_range(ts.KvStore.KeyRange(WORK + "state-", WORK + name)).result()  # older ones


def pack_all(
    url: str,
    pool: ShardPool,
    mixer: Mixer,
    packer: Packer,
    *,
    local: Callable[[int], bool],
    seq: int = 0,
    checkpoint_seconds: float = 10.0,
    lookahead: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """The packing process: takes documents in the mixer's order, tokenizing local shards
    ahead (a window of 2 x workers, at most `lookahead` shards ahead of each source), waiting
    for other processes' shards in the spool. Returns the number of shards it tokenized."""
    kv = kv_of(url)
    have = spooled(url)
    lookahead = lookahead or max(4, 4 * pool.workers)
    window = max(1, 2 * pool.workers)
    current: dict[int, ShardDocs] = {}
    consumed: list[int] = []
    tokenized, last_ckpt, last_flushed = 0, time.monotonic(), packer.flushed

    def top_up() -> None:
        nonlocal tokenized
        for i in mixer.active():
            start = mixer.needed(i)
            stop = min(start + lookahead, mixer.sources[i].first + mixer.sources[i].count)
            for g in range(start, stop):
                if len(pool.futures) >= window:
                    return
                if local(g) and g not in have and g not in pool.futures:
                    pool.submit(g)
                    tokenized += 1

    while (i := mixer.next_source()) is not None:
        g = mixer.needed(i)
        if g not in current:
            top_up()
            if g not in have and g not in pool.futures and local(g):
                pool.submit(g)
                tokenized += 1
            if g in pool.futures:
                pool.wait(g)
                have.add(g)
            while True:
                r = kv.read(f"{SPOOL}{g:08d}").result()
                if r.state != "missing":
                    break
                time.sleep(0.05)  # another process's shard
            current[g] = decode_docs(r.value)
        docs = current[g]
        if docs.lengths.size == 0:
            mixer.skip_empty(i, docs)
        else:
            mixer.take(i, docs)
        if mixer.needed(i) != g:  # shard fully taken
            del current[g]
            consumed.append(g)
            if progress:
                progress(int(docs.tokens.size))
        now = time.monotonic()
        if consumed and (
            now - last_ckpt > checkpoint_seconds
            or (packer.flushed > last_flushed and now - last_ckpt > checkpoint_seconds / 5)
        ):
            seq += 1
            save(url, seq, mixer, packer)
            kv_delete_shards(kv, consumed)
            have.difference_update(consumed)
            consumed, last_ckpt, last_flushed = [], now, packer.flushed
    return tokenized


def save(url: str, seq: int, mixer: Mixer, packer: Packer) -> None:
    pstate, arrays = packer.state()
    save_checkpoint(url, seq, {"mixer": mixer.state(), "packer": pstate}, arrays)


def kv_delete_shards(kv: ts.KvStore, indices: list[int]) -> None:
    for f in [kv.delete_range(ts.KvStore.KeyRange(f"{SPOOL}{g:08d}", f"{SPOOL}{g:08d}\0")) for g in indices]:
        f.result()


def empty_skips() -> dict[str, int]:
    return {r: 0 for r in SKIP_REASONS}
