"""`python -m rskd_jax.cache`: run the teacher once over a token store, write teacher stores.

    python -m rskd_jax.cache --config configs/tiny/cache.yaml [key=value ...] [--dry-run]

The teacher is sharded over a ("data", "fsdp", "tensor") mesh; each jitted step runs the
forward, masks padded vocabulary rows, and draws every configured output from the same
logits (`cache_step`). Work is assigned in blocks of `cache.chunk_rows` rows, the store's
chunk size, so no two processes ever write the same chunk. Each process writes only its own
rows, from a background writer (`cache_writer`) that overlaps with the next step; a row's `done` flag is
written after its data, and with it a hash of the row's tokens (`store.teacher.token_hash`)
that the trainer checks its batches against. A re-run skips finished blocks and, since every
row's randomness is fold_in(seed, split, row), rewrites unfinished ones byte for byte.

Exactness (tests/test_cache.py): the teacher runs on a fixed micro-batch of
`cache.device_batch` rows per device (cache_step), so the store's bytes are identical for any
`cache.batch_size`, any number of data-parallel devices and processes, and across
kill-and-resume, at one device_batch. With another device_batch, or mesh.fsdp / mesh.tensor
> 1, the teacher's matmuls round differently in the last float bits: float outputs agree to
~1e-7 relative and a draw that lands within rounding of a CDF boundary moves to the
neighbouring id (a few of 4,096 positions at N = 50 on the tiny teacher). Such a store is as
valid a sample, but not the same bytes: both are in the manifest, and a resume with other
values is refused.
All processes plan each split from process 0's done mask (broadcast, which is also a
barrier), so a block finished by a fast process never shifts a slow one's plan.

Layers: `cache_step` (the jitted teacher step), `cache_writer` (the stores: manifest,
create / reopen, the background writer), this module (config checks, planning, the loop that
overlaps dispatch, fetch and writes, the program).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from rskd_jax import cache_step, sharding
from rskd_jax.cache_writer import CacheError, StoreWriter, open_stores, recorded_device_batches, recorded_values
from rskd_jax.config import CacheRun, ConfigError, parse_cli, save_config
from rskd_jax.store.common import StoreError

log = logging.getLogger("rskd_jax.cache")
DRY_RUN_STEPS = 3
FREQ_ROWS = 4096


def plan_blocks(done_R: np.ndarray, chunk_rows: int) -> list[int]:
    """Indices of the chunk_rows-row blocks that still have a row not done."""
    n_blocks = -(-len(done_R) // chunk_rows)
    return [b for b in range(n_blocks) if not done_R[b * chunk_rows : (b + 1) * chunk_rows].all()]


def local_rows(
    blocks: Sequence[int],
    *,
    step: int,
    blocks_per_step: int,
    process_index: int,
    blocks_per_process: int,
    chunk_rows: int,
    num_rows: int,
) -> np.ndarray:
    """This process's rows for global step `step`, padded with -1 to a static length."""
    start = step * blocks_per_step + process_index * blocks_per_process
    mine = blocks[start : start + blocks_per_process]
    rows = [r for b in mine for r in range(b * chunk_rows, min((b + 1) * chunk_rows, num_rows))]
    out = np.full(blocks_per_process * chunk_rows, -1, np.int64)
    out[: len(rows)] = rows
    return out


class SplitPlan(NamedTuple):
    """The steps that cache a split's unfinished blocks: per step, this process's rows
    (`local_rows`, padded with -1 to the step's static length) and all processes' rows
    (`rows`, the count)."""

    local_rows: list[np.ndarray]
    rows: list[int]


class Cacher:
    """One cache run: the teacher, mesh, jitted step (`cache_step`) and open stores, the
    store writer (`cache_writer.StoreWriter`), and the loop (`cache_split`).

    The loop's pieces are public, for benchmarks: `plan` (which rows each step computes),
    `read_tokens`, `global_batch` / `split_code` (the step's device inputs), `head_DxV` (the
    LM head the step reads, kept on CPU: `cache_step.lm_head_once`), `dispatch` (the step,
    asynchronously), `fetch` (its outputs as this process's numpy rows), `writer`.
    """

    def __init__(self, run: CacheRun, *, store_prefix: str | None = None, devices: Sequence[Any] | None = None):
        import jax
        from flax import nnx

        from rskd_jax.model_spec import build_model
        from rskd_jax.store.tokens import open_token_store

        c = self.cfg = run.cache
        self.run = run
        self.documents = run.context.document_masking
        self.tokens = open_token_store(c.tokens)
        self.vocab = int(self.tokens.manifest["tokenizer"]["vocab_size"])
        self.mesh = sharding.make_mesh(run.mesh, devices)
        # A pretrained teacher is read straight into state_shardings below (each device its shard).
        self.model = build_model(run.teacher, self.vocab, self.mesh)
        self.P, self.p = jax.process_count(), jax.process_index()
        sharding.check_batch(c.batch_size, self.mesh, key="cache.batch_size")
        local = c.batch_size // self.P
        if local % c.chunk_rows:
            raise CacheError(
                f"cache.batch_size={c.batch_size} gives {local} rows per process, not a multiple of "
                f"cache.chunk_rows={c.chunk_rows}; processes own whole chunks. Set cache.batch_size "
                f"to a multiple of {c.chunk_rows * self.P}"
            )
        self.blocks_per_process = local // c.chunk_rows
        self.blocks_per_step = self.blocks_per_process * self.P
        missing = [s for s in c.splits if s not in self.tokens.splits]
        if missing:
            raise CacheError(f"cache.splits {missing} not in the token store (it has {self.tokens.splits})")
        if self.documents:  # a store without doc_starts: StoreError with the fix, before any work
            for s in c.splits:
                self.tokens.read_doc_starts(s, np.zeros(0, np.int64))
        try:
            cache_step.check_split_codes(c.splits)
        except ValueError as err:
            raise CacheError(f"cache.splits: {err}") from None
        prefix = (store_prefix or c.output).rstrip("/")
        self.device_batch = self._device_batch(prefix)
        self.position_chunk = self._position_chunk(prefix)
        self.num_rows = {s: min(self.tokens.num_rows(s), c.max_rows or sys.maxsize) for s in c.splits}
        self._check_full_size()

        graphdef, state = nnx.split(self.model)
        state_shardings = sharding.param_shardings(state, self.mesh)
        self.state = jax.device_put(state, state_shardings)
        self.head_DxV = cache_step.lm_head_once(graphdef, self.state, self.mesh.devices.flat)
        step = cache_step.make_step(
            graphdef,
            c.outputs,
            seed=c.seed,
            vocab_size=self.vocab,
            with_diagnostics=c.diagnostics,
            device_batch=self.device_batch,
            batch_shards=sharding.batch_shards(self.mesh),
            positions=self.position_chunk,
            batch_sharding=sharding.batch_sharding(self.mesh, 2),
        )
        # The split code is traced (not static): one compile serves every split.
        self.step = jax.jit(
            step,
            in_shardings=(
                state_shardings,
                sharding.batch_sharding(self.mesh, 2),
                sharding.batch_sharding(self.mesh, 1),
                sharding.replicated(self.mesh),
                sharding.batch_sharding(self.mesh, 2),  # the document fields ({} when off)
                None if self.head_DxV is None else self.head_DxV.sharding,
            ),
        )
        self.stores = self._open_stores(prefix)
        self.writer = StoreWriter(self.stores, chunk_rows=c.chunk_rows, diagnostics=c.diagnostics)

    def _device_batch(self, prefix: str) -> int:
        """cache.device_batch, or (0) the value recorded by existing stores, or the rows per
        device; refuses a value that differs from the stores being resumed, or that does not
        divide the rows per device."""
        c = self.cfg
        per_device = c.batch_size // sharding.batch_shards(self.mesh)
        recorded = {} if c.overwrite else recorded_device_batches(prefix, [o.name for o in c.outputs])
        values = set(recorded.values())
        if len(values) > 1:
            raise CacheError(
                f"the existing stores under {prefix} were written with different device_batch "
                f"values {recorded}; resume them in separate runs (one output each)"
            )
        db = c.device_batch or (values.pop() if values else per_device)
        if recorded and db != next(iter(recorded.values())):
            name, old = next(iter(recorded.items()))
            raise CacheError(
                f"{prefix}/{name} was written with cache.device_batch={old}, this run has {db}: the teacher's "
                f"rounding depends on it, so the store would mix two runs' bytes. Resume with "
                f"cache.device_batch={old} (or 0 to take it from the store), or set cache.overwrite=true."
            )
        if per_device % db:
            raise CacheError(
                f"cache.batch_size={c.batch_size} gives {per_device} rows per device (mesh batch shards "
                f"{sharding.batch_shards(self.mesh)}), not a multiple of cache.device_batch={db}. Set "
                f"cache.batch_size to a multiple of {db * sharding.batch_shards(self.mesh)}"
            )
        return db

    def _position_chunk(self, prefix: str) -> int:
        """Positions per row per LM-head iteration: with cache.logits_chunk_mb 0 the stores'
        recorded value when resuming, else from the budget (cache_step.logits_budget of this
        process's first mesh device's memory, or the override). A value that differs from the stores' is
        refused when they are opened (their manifests record it)."""
        c = self.cfg
        recorded = {} if c.overwrite else recorded_values(prefix, [o.name for o in c.outputs], "position_chunk")
        if c.logits_chunk_mb == 0 and len(set(recorded.values())) == 1:
            return next(iter(recorded.values()))
        local = next(d for d in self.mesh.devices.flat if d.process_index == self.p)  # memory_stats: own devices only
        budget = cache_step.logits_budget(cache_step.device_bytes_limit(local), c.logits_chunk_mb)
        return cache_step.position_chunk(self.tokens.seq_len, self.device_batch, self.model.config.vocab_size, budget)

    def _open_stores(self, prefix: str) -> dict:
        freqs = self._id_frequencies()  # every process: refuses foreign token ids before any work
        return open_stores(
            prefix,
            self.run,
            self.model,
            self.tokens,
            vocab_size=self.vocab,
            num_rows=self.num_rows,
            id_frequencies=freqs,
            device_batch=self.device_batch,
            mesh_shape=dict(self.mesh.shape),
            position_chunk=self.position_chunk,
            process_index=self.p,
            process_count=self.P,
        )

    def _id_frequencies(self) -> np.ndarray:
        """Unigram counts of the first FREQ_ROWS train rows: the store sorts and gap-codes ids
        by this rank (ids + counts 22.5 -> 19.9 B/token on stdlib, tools/bench_store_codec.py)."""
        split = "train" if "train" in self.tokens.splits else self.tokens.splits[0]
        n = min(self.tokens.num_rows(split), FREQ_ROWS)
        toks = self.read_tokens(split, np.arange(n))  # refuses foreign token ids before any work
        return np.bincount(toks.reshape(-1), minlength=self.vocab)

    def _check_full_size(self) -> None:
        fulls = [o for o in self.cfg.outputs if o.method == "full"]
        if not fulls:
            return
        rows = sum(self.num_rows.values())
        gb = rows * self.tokens.seq_len * self.model.config.vocab_size * 2 / 1e9
        if gb > self.cfg.full_max_gb:
            raise CacheError(
                f"a `full` output would take ~{gb:.1f} GB ({rows} rows x {self.tokens.seq_len} x "
                f"V={self.model.config.vocab_size} x 2 bytes), above cache.full_max_gb="
                f"{self.cfg.full_max_gb}; cache fewer rows (cache.max_rows) or raise the cap"
            )
        log.warning("`full` output: ~%.2f GB on disk (V log-probs per position)", gb)

    def done_mask(self, split: str) -> np.ndarray:
        masks = [s.done_mask(split)[: self.num_rows[split]] for s in self.stores.values()]
        return np.logical_and.reduce(masks)

    def _shared_done_mask(self, split: str) -> np.ndarray:
        """The done mask every process plans `split` from: process 0's, broadcast. The
        broadcast is also a barrier, so no process writes a block of `split` before all have
        planned (a process that read the mask after another's first write would take other
        blocks: rows skipped, others computed twice)."""
        done = self.done_mask(split)
        if self.P == 1:
            return done
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(done.astype(np.uint8))).astype(bool)

    def split_code(self, split: str):
        """The step's split argument: cache_step.split_code(split) as a replicated int32 scalar."""
        import jax

        code = np.int32(cache_step.split_code(split))
        return jax.make_array_from_callback((), sharding.replicated(self.mesh), lambda _: code)

    def global_batch(
        self, tokens_RxL: np.ndarray, rows_R: np.ndarray, docs: dict[str, np.ndarray] | None = None
    ) -> tuple[Any, ...]:
        """(tokens [B, L], rows [B], docs): the step's inputs as global arrays split over the
        batch axes, from this process's rows (-1 padding rows become row 0; they are not
        written). docs: this process's segment ids and positions (document masking) or None."""
        from jax.experimental import multihost_utils
        from jax.sharding import PartitionSpec

        local = {"tokens": tokens_RxL, "rows": np.maximum(rows_R, 0).astype(np.int32), **(docs or {})}
        out = {
            k: multihost_utils.host_local_array_to_global_array(
                v, self.mesh, PartitionSpec(sharding.BATCH_AXES, *([None] * (v.ndim - 1)))
            )
            for k, v in local.items()
        }
        return out.pop("tokens"), out.pop("rows"), out

    def dispatch(self, split: str, rows_R: np.ndarray, code=None) -> tuple[np.ndarray, Any]:
        """(tokens_RxL, device outputs): reads this process's rows, runs the step on them (async
        dispatch: the outputs are not waited for). `code`: split_code(split), made if None."""
        tokens_RxL = self.read_tokens(split, rows_R)
        tokens_BxL, rows_B, docs = self.global_batch(tokens_RxL, rows_R, self.read_documents(split, rows_R))
        code = self.split_code(split) if code is None else code
        return tokens_RxL, self.step(self.state, tokens_BxL, rows_B, code, docs, self.head_DxV)

    def fetch(self, out) -> dict:
        """Device outputs -> this process's rows as numpy (nothing is all-gathered)."""
        import jax
        from jax.experimental import multihost_utils
        from jax.sharding import PartitionSpec

        if self.P == 1:
            return jax.tree.map(np.asarray, out)
        return jax.tree.map(
            lambda a: np.asarray(
                multihost_utils.global_array_to_host_local_array(
                    a, self.mesh, PartitionSpec(sharding.BATCH_AXES, *([None] * (a.ndim - 1)))
                )
            ),
            out,
        )

    def read_tokens(self, split: str, rows_R: np.ndarray) -> np.ndarray:
        """tokens [R, L] int32 of rows_R (-1: zeros); refuses ids outside the teacher's vocabulary."""
        valid = rows_R >= 0
        toks = np.zeros((len(rows_R), self.tokens.seq_len), np.int32)
        toks[valid] = self.tokens.read(split, rows_R[valid])
        bad = (toks < 0) | (toks >= self.vocab)
        if bad.any():
            r = int(np.nonzero(bad.any(axis=1))[0][0])
            raise CacheError(
                f"{split} row {int(rows_R[r])} of {self.cfg.tokens} holds token id "
                f"{int(toks[r][bad[r]][0])}, outside the teacher tokenizer's vocabulary "
                f"[0, {self.vocab}): the token store was made with another tokenizer"
            )
        return toks

    def read_documents(self, split: str, rows_R: np.ndarray) -> dict[str, np.ndarray] | None:
        """Segment ids and positions [R, L] of rows_R (-1: one segment) under document
        masking, else None."""
        if not self.documents:
            return None
        from rskd_jax.documents import segments_and_positions

        valid = rows_R >= 0
        starts = np.zeros((len(rows_R), self.tokens.seq_len), bool)
        starts[valid] = self.tokens.read_doc_starts(split, rows_R[valid])
        seg, pos = segments_and_positions(starts)
        return {"segment_ids": seg, "positions": pos}

    def plan(self, split: str, *, max_steps: int | None = None) -> SplitPlan:
        """The steps that compute every unfinished block of `split` (at most max_steps),
        planned from process 0's done mask (a collective: every process must call it)."""
        blocks = plan_blocks(self._shared_done_mask(split), self.cfg.chunk_rows)
        steps = -(-len(blocks) // self.blocks_per_step)
        if max_steps is not None:
            steps = min(steps, max_steps)
        cr, bps, num_rows = self.cfg.chunk_rows, self.blocks_per_step, self.num_rows[split]
        rows_of = lambda bs: sum(min((b + 1) * cr, num_rows) - b * cr for b in bs)
        return SplitPlan(
            local_rows=[
                local_rows(
                    blocks,
                    step=i,
                    blocks_per_step=bps,
                    process_index=self.p,
                    blocks_per_process=self.blocks_per_process,
                    chunk_rows=cr,
                    num_rows=num_rows,
                )
                for i in range(steps)
            ],
            rows=[rows_of(blocks[i * bps : (i + 1) * bps]) for i in range(steps)],
        )

    def cache_split(self, split: str, *, max_steps: int | None = None, progress: bool = True) -> dict:
        """Computes and writes every unfinished block of `split`; returns counts and timing.

        Step i + 1 is dispatched before step i's outputs are fetched, and the writer stores
        step i on its thread while the teacher computes: the device never waits for the disk.
        """
        from tqdm import tqdm

        plan = self.plan(split, max_steps=max_steps)
        steps = len(plan.local_rows)
        L = self.tokens.seq_len
        bar = tqdm(
            total=sum(plan.rows),
            unit="row",
            desc=f"cache {split}",
            disable=not progress or self.p != 0,
            dynamic_ncols=True,
        )
        code = self.split_code(split)
        step_times, done_rows, t0 = [], 0, time.perf_counter()
        with self.writer as writer:
            prev = None
            for i in range(steps + 1):
                if i < steps:
                    t_step = time.perf_counter()
                    rows_R = plan.local_rows[i]
                    tokens_RxL, out = self.dispatch(split, rows_R, code)  # async dispatch
                if prev is not None:  # fetch the previous step while this one computes
                    prev_rows, prev_tokens, prev_out, t_prev = prev
                    local = self.fetch(prev_out)
                    step_times.append(time.perf_counter() - t_prev)
                    writer.submit(split, prev_rows, prev_tokens, local)
                    n = plan.rows[i - 1]  # all processes' rows of that step
                    done_rows += n
                    bar.update(n)
                    bar.set_postfix(tok_s=f"{done_rows * L / (time.perf_counter() - t0):,.0f}")
                prev = (rows_R, tokens_RxL, out, t_step) if i < steps else None
            writer.drain()
        bar.close()
        seconds = time.perf_counter() - t0
        return {"rows": done_rows, "tokens": done_rows * L, "seconds": seconds, "step_times": step_times}


def run(
    cfg: CacheRun, *, dry_run: bool = False, progress: bool = True, devices: Sequence[Any] | None = None
) -> dict[str, Any]:
    """Runs the cache program; returns the summary that `main` prints as JSON. `devices`
    restricts the mesh to these devices (default: all, of every process)."""
    sharding.initialize_distributed(cfg.distributed)
    if dry_run:
        return _dry_run(cfg, progress=progress, devices=devices)
    cacher = Cacher(cfg, devices=devices)
    if cacher.p == 0:
        save_config(cfg, cfg.cache.output)
    splits = {s: cacher.cache_split(s, progress=progress) for s in cfg.cache.splits}
    tokens = sum(v["tokens"] for v in splits.values())
    seconds = sum(v["seconds"] for v in splits.values())
    return {
        "output": cfg.cache.output,
        "rows_written": {s: v["rows"] for s, v in splits.items()},
        "tokens_per_s": round(tokens / seconds) if seconds else None,
        "seconds": round(seconds, 2),
        "stores": {name: store.stats() for name, store in cacher.stores.items()},
    }


def _dry_run(cfg: CacheRun, *, progress: bool, devices: Sequence[Any] | None = None) -> dict[str, Any]:
    """A few steps into throw-away local stores of the same layout; projects size and time.

    (A local temporary directory, not memory://: TensorStore's memory kvstore lives in one
    Context, and every open here makes a new one, so a store's arrays would vanish.)"""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="rskd-dry-run-")
    try:
        cacher = Cacher(cfg, store_prefix=tmp, devices=devices)
        split = cfg.cache.splits[0]
        res = cacher.cache_split(split, max_steps=DRY_RUN_STEPS, progress=progress)
        total_tokens = sum(cacher.num_rows.values()) * cacher.tokens.seq_len
        warm = res["step_times"][1:] or res["step_times"]
        s_per_token = float(np.median(warm)) / (cfg.cache.batch_size * cacher.tokens.seq_len)
        stores = {}
        for name, store in cacher.stores.items():
            st = store.stats()
            # per-row arrays scale with the tokens; the rest (rank table, metadata) is fixed
            per_token = sum(v for v in st["bytes_per_token_by_array"].values() if v is not None)
            fixed = st["bytes_on_disk"] - per_token * st["positions_done"]
            stores[name] = {
                "bytes_per_token": per_token,
                "mean_unique_ids": st["mean_unique_ids"],
                "projected_bytes": int(fixed + per_token * total_tokens),
            }
            store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "dry_run": True,
        "steps": len(res["step_times"]),
        "tokens_total": total_tokens,
        "projected_seconds": round(s_per_token * total_tokens, 1),
        "tokens_per_s": round(1 / s_per_token),
        "stores": stores,
    }


def main(argv: Sequence[str] | None = None) -> None:
    from rskd_jax.sharding import ShardingError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg, flags = parse_cli(CacheRun, argv, prog="python -m rskd_jax.cache", flags=("dry-run",))
    try:
        summary = run(cfg, dry_run=flags["dry_run"])
    except (CacheError, StoreError, ConfigError, ShardingError) as err:
        print(f"python -m rskd_jax.cache: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
