"""The teacher cache's store side: the stores' manifest, creating / reopening them, and the
writer of one process's rows of each step into every teacher store.

`store_manifest` is what a store's bytes depend on (a resume must match it); `open_stores`
creates (or reopens, to resume) one store per output, process 0 first.

`StoreWriter.write` checks the step's finiteness flags (nothing of a block with a NaN/inf
teacher logit is written), then writes each whole `chunk_rows` block of the process's rows
into every store (`TeacherStore.write_rows`: the data, then the rows' `done` flags with the
hash of their tokens) and waits until all are durable. Used as a context manager, `submit`
runs the writes on one background thread, so they overlap with the next teacher step, at most
MAX_WRITES_IN_FLIGHT steps behind; a write's error is raised by a later `submit` or `drain`,
never swallowed.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rskd_jax import cache_step, sampling
from rskd_jax.config import CacheRun, OutputConfig, config_to_dict
from rskd_jax.methods import COUNT_METHODS

if TYPE_CHECKING:
    from rskd_jax.models.llama import Llama
    from rskd_jax.store.teacher_store import TeacherStore
    from rskd_jax.store.tokens import TokenStore

MAX_WRITES_IN_FLIGHT = 4


class CacheError(ValueError):
    """Bad input to the cache program (`rskd_jax.cache` re-exports it): it says what to change."""


def store_manifest(
    run: CacheRun,
    out: OutputConfig,
    model: Llama,
    tokens: TokenStore,
    *,
    device_batch: int,
    mesh_shape: Mapping[str, int],
    position_chunk: int,
) -> dict[str, Any]:
    """What a teacher store's bytes depend on; a re-run must match it to resume. Identity is
    by content: the teacher's fingerprint (its weights and resolved config, dtypes included)
    and the token store's. Where they were found (the teacher spec with its source path, the
    token store URL) goes to "provenance", which a resume does not compare: the same teacher
    or tokens reached by another path, or moved, still resume. `tools/inspect_store.py
    --verify` rebuilds the teacher and finds the tokens from it."""
    spec = config_to_dict(run.teacher)
    if spec["source"] not in ("random", "smollm2"):
        spec["source"] = os.path.realpath(spec["source"])
    samplers = sampling.STORE_SAMPLERS
    sampler = {"sampler": samplers[out.method]} if out.method in samplers else {}
    return {
        "method": out.method,
        # which draws a key gives (sample_wor, systematic): a resume never mixes two samplers
        **sampler,
        # `head` only where it applies and `stream` only when > 0, so stores made before they
        # existed still resume
        "params": {
            k: v
            for k, v in config_to_dict(out).items()
            if k not in ("name", "method")
            and (k != "head" or out.method == "head_tail")
            and (k != "stream" or out.stream)
        },
        "seed": run.cache.seed,
        "teacher": {"fingerprint": model.fingerprint, "vocab_size": model.config.vocab_size},
        "tokenizer": tokens.manifest["tokenizer"],
        "tokens": {"fingerprint": tokens.fingerprint, "seq_len": tokens.seq_len},
        "key_rule": cache_step.KEY_RULE,
        # what the teacher forward's rounding depends on (cache_step: fixed micro-batch shape)
        "device_batch": int(device_batch),
        # the LM head's positions per matmul (x device_batch rows); left out when it is the 16 MB
        # default's, as in stores made before it was recorded, so those still resume
        **(
            {}
            if position_chunk == cache_step.position_chunk(tokens.seq_len, device_batch, model.config.vocab_size)
            else {"position_chunk": int(position_chunk)}
        ),
        "teacher_layout": {"fsdp": int(mesh_shape["fsdp"]), "tensor": int(mesh_shape["tensor"])},
        "provenance": {"teacher_spec": spec, "tokens_url": tokens.url},
        # only when on, so stores made before the option keep their manifest (absent: false)
        **({"document_masking": True} if run.context.document_masking else {}),
    }


def recorded_values(prefix: str, names: Sequence[str], key: str) -> dict[str, int]:
    """{output name: manifest[key]} of the teacher stores already under prefix that record one."""
    from rskd_jax.store.common import read_json

    recorded: dict[str, int] = {}
    for name in names:
        m = read_json(f"{prefix}/{name}")
        if m is not None and m.get("kind") == "teacher" and key in m:
            recorded[name] = int(m[key])
    return recorded


def recorded_device_batches(prefix: str, names: Sequence[str]) -> dict[str, int]:
    """{output name: device_batch} of the teacher stores already under prefix that record one."""
    return recorded_values(prefix, names, "device_batch")


def open_stores(
    prefix: str,
    run: CacheRun,
    model: Llama,
    tokens: TokenStore,
    *,
    vocab_size: int,
    num_rows: dict[str, int],
    id_frequencies: np.ndarray,
    device_batch: int,
    mesh_shape: Mapping[str, int],
    position_chunk: int,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, TeacherStore]:
    """Creates (or reopens, to resume) one store per output. Process 0 creates first and
    the others reopen after a barrier, so no process deletes another's fresh arrays."""
    from rskd_jax.store.teacher import create_teacher_store

    c = run.cache

    def open_all() -> dict[str, TeacherStore]:
        return {
            o.name: create_teacher_store(
                f"{prefix}/{o.name}",
                manifest=store_manifest(
                    run,
                    o,
                    model,
                    tokens,
                    device_batch=device_batch,
                    mesh_shape=mesh_shape,
                    position_chunk=position_chunk,
                ),
                num_rows=num_rows,
                seq_len=tokens.seq_len,
                method=o.method,
                k=o.slots(vocab_size),
                vocab_size=vocab_size,
                chunk_rows=c.chunk_rows,
                diagnostics=c.diagnostics,
                overwrite=c.overwrite,
                id_frequencies=None if o.method == "full" else id_frequencies,
                token_hash=True,
                # only the count methods store the proposal temperature; the others' weights carry it
                temperature=o.temperature if o.method in COUNT_METHODS else 1.0,
            )
            for o in c.outputs
        }

    if process_count == 1:
        return open_all()
    from jax.experimental import multihost_utils

    stores = open_all() if process_index == 0 else None
    multihost_utils.sync_global_devices("rskd_jax.cache: stores created")
    return stores if stores is not None else open_all()


class StoreWriter:
    """Writes the cache step's host outputs into `stores` ({output name: TeacherStore})."""

    def __init__(self, stores: Mapping[str, TeacherStore], *, chunk_rows: int, diagnostics: bool):
        self.stores = stores
        self.chunk_rows = chunk_rows
        self.diagnostics = diagnostics
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: deque[cf.Future[None]] = deque()

    def write(self, split: str, rows_R: np.ndarray, tokens_RxL: np.ndarray, out: dict[str, Any]) -> None:
        """Writes one step's rows and waits until they are durable.

        rows_R: the process's global row indices, -1 for padding (skipped); tokens_RxL: their
        tokens; out: the step's outputs as numpy ({"finite": [R] bool, "<output>": {...},
        "diagnostics": {...}}), rows aligned with rows_R; each chunk_rows slice of rows_R is
        one store block.
        """
        if not out["finite"][rows_R >= 0].all():
            r = int(rows_R[np.nonzero(~out["finite"] & (rows_R >= 0))[0][0]])
            raise CacheError(
                f"teacher logits are NaN/inf on {split} row {r}; nothing of its block "
                "was written. Check the teacher weights and dtype (try teacher.dtype=float32)"
            )
        futures = []
        cr = self.chunk_rows
        for i in range(0, len(rows_R), cr):
            block = rows_R[i : i + cr]
            block = block[block >= 0]
            if not len(block):
                continue
            n = len(block)
            for name, store in self.stores.items():
                rows = {k: v[i : i + n] for k, v in out[name].items()}
                rows["tokens"] = tokens_RxL[i : i + n]  # stored as token_hash: the trainer's check
                if self.diagnostics:
                    rows.update({k: v[i : i + n] for k, v in out["diagnostics"].items()})
                futures.append(store.write_rows(split, int(block[0]), rows))
        for f in futures:
            f.result()

    def __enter__(self) -> StoreWriter:
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self._pending.clear()
        return self

    def submit(self, split: str, rows_R: np.ndarray, tokens_RxL: np.ndarray, out: dict[str, Any]) -> None:
        """Queues `write` on the background thread, then waits while more than
        MAX_WRITES_IN_FLIGHT are queued and collects finished ones (raising the first error)."""
        assert self._pool is not None, "use StoreWriter as a context manager to submit"
        self._pending.append(self._pool.submit(self.write, split, rows_R, tokens_RxL, out))
        while len(self._pending) > MAX_WRITES_IN_FLIGHT or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()  # raises a writer error here, never swallowed

    def drain(self) -> None:
        """Waits for every submitted write (raising the first error)."""
        while self._pending:
            self._pending.popleft().result()

    def __exit__(self, *exc: object) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        self._pool = None
