"""The teacher cache's store writer: one process's rows of each step into every teacher store.

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
from collections import deque
from typing import Any

import numpy as np

MAX_WRITES_IN_FLIGHT = 4


class CacheError(ValueError):
    """Bad input to the cache program (`rskd_jax.cache` re-exports it): it says what to change."""


class StoreWriter:
    """Writes the cache step's host outputs into `stores` ({output name: TeacherStore})."""

    def __init__(self, stores: dict[str, Any], *, chunk_rows: int, diagnostics: bool):
        self.stores = stores
        self.chunk_rows = chunk_rows
        self.diagnostics = diagnostics
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: deque = deque()

    def write(self, split: str, rows_R: np.ndarray, tokens_RxL: np.ndarray, out: dict) -> None:
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

    def submit(self, split: str, rows_R: np.ndarray, tokens_RxL: np.ndarray, out: dict) -> None:
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

    def __exit__(self, *exc) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        self._pool = None
