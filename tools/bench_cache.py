"""Teacher cache throughput: the full dump vs running the teacher alone, same teacher, same batches.

    python tools/bench_cache.py --json [--random] [--batch 8] [--len 512] [--steps 2] [--reps 3]
    python tools/bench_cache.py --json --vocabs 49152,151936,262144 --set teacher.num_layers=4 ...

Makes a real token store of stdlib text with the data program (tmp dir), opens a
`cache.Cacher` (SmolLM2-135M by default; --random: a random SmolLM2-shaped teacher, 30
layers, d=576, 9/3 heads, F=1536, V=49,152, tied) writing one `sample` store (N = --draws)
with diagnostics into a tmp dir, and times, per repetition, on the same `--steps` batches:

  forward   the teacher alone: hidden states + the LM-head logits computed chunk-wise
            exactly as the cache step does (cache_step.position_chunk positions per row at a
            time, the LM head weight as the step reads it), each chunk reduced to a sum so that
            every logit is computed, none kept;
  step      the cache step (forward + padded-vocab mask + sampling + diagnostics), fetched to
            the host, nothing written (where the dump's time goes): `Cacher.dispatch` (the real
            token reads, batch assembly and jitted step) then `Cacher.fetch`;
  dump      `Cacher.cache_split`: the step + the background writer into the real store,
            until the last block is durable (what `python -m rskd_jax.cache` does).

The three alternate in rotated order each repetition (a busy machine slows all alike);
tokens/s are medians of wall time. The process's CPU time (all threads: XLA, the writer,
TensorStore) is reported too: on a machine shared with other jobs, tokens per CPU-second
(`cpu_ratio`) is the steadier comparison. Prints one JSON object; `ratio` = dump / forward
tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

SMOLLM2_SHAPE = [
    "teacher.source=random",
    "teacher.hidden_size=576",
    "teacher.intermediate_size=1536",
    "teacher.num_layers=30",
    "teacher.num_heads=9",
    "teacher.num_kv_heads=3",
    "teacher.rope_theta=100000.0",
    "teacher.tie_embeddings=true",
]


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--random", action="store_true", help="random SmolLM2-shaped teacher instead of SmolLM2")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--len", type=int, default=512, dest="length", help="tokens per sequence")
    p.add_argument("--draws", type=int, default=50, help="N of the sample output")
    p.add_argument("--steps", type=int, default=2, help="batches per timed repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--inputs", default="[@stdlib]", help="data.inputs of the token store")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra cache config overrides")
    p.add_argument(
        "--vocabs",
        type=lambda s: [int(v) for v in s.split(",")],
        default=None,
        help="comma-separated vocabulary sizes: one random teacher each (teacher.vocab_size; rows past "
        "the tokenizer's are padding, masked as in any padded vocabulary), ratios by V",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    return p.parse_args(argv)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_forward(cacher):
    """(state, tokens_BxL, head_DxV) -> scalar: the cache step's forward and chunked LM head,
    nothing else (the baseline: no micro-batch loop, sampling or diagnostics); the LM head
    weight as the step gets it (`cacher.head_DxV`, kept on CPU; None: from the state)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rskd_jax import cache_step, sharding

    graphdef, _ = nnx.split(cacher.model)
    chunk = cacher.position_chunk
    vocab = cacher.vocab

    def forward(state, tokens_BxL, head_DxV):
        model = nnx.merge(graphdef, state)
        h_BxLxD = model.hidden_states(tokens_BxL)
        w_DxV = model.lm_head_weight() if head_DxV is None else head_DxV
        B, L = tokens_BxL.shape
        h_NxBxCxD = jnp.swapaxes(h_BxLxD.reshape(B, L // chunk, chunk, -1), 0, 1)

        def body(h_BxCxD):
            logits_BxCxV = model.logits_from_hidden(h_BxCxD, w_DxV)  # the step's LM head (+ any soft-cap)
            return jnp.sum(cache_step.mask_padded_vocab(logits_BxCxV, vocab))

        return jnp.sum(jax.lax.map(body, h_NxBxCxD))

    state_shardings = sharding.param_shardings(cacher.state, cacher.mesh)
    head_sharding = None if cacher.head_DxV is None else cacher.head_DxV.sharding
    in_shardings = (state_shardings, sharding.batch_sharding(cacher.mesh, 2), head_sharding)
    return jax.jit(forward, in_shardings=in_shardings), chunk


def main(argv=None) -> None:
    args = _parse(argv)
    from rskd_jax import data
    from rskd_jax.config import DataRun, load_config

    tmp = tempfile.mkdtemp(prefix="rskd-bench-cache-")
    rows_needed = (args.reps * args.steps + 2) * args.batch
    t = time.perf_counter()
    data.run(
        load_config(
            DataRun,
            None,
            [
                f"data.inputs={args.inputs}",
                f"data.seq_len={args.length}",
                f"data.output={tmp}/tokens",
                "data.val_fraction=0.0",
                f"data.max_tokens={int(rows_needed * args.length * 1.05) + args.length}",
            ],
        ),
        progress=False,
    )
    data_s = time.perf_counter() - t
    if not args.vocabs:
        out = measure(args, tmp, [])
        out["data_s"] = round(data_s, 2)
    else:
        out = {"vocabs": {}, "data_s": round(data_s, 2)}
        for v in args.vocabs:
            one = measure(args, tmp, [f"teacher.vocab_size={v}"], name=f"teacher_v{v}")
            out["vocabs"][str(v)] = {k: one[k] for k in VOCAB_KEYS}
            out.update({k: one[k] for k in one if k not in VOCAB_KEYS})
        out["teacher"] += f", V = {', '.join(map(str, args.vocabs))}"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    sys.stdout.flush()


VOCAB_KEYS = (
    "chunk_positions",
    "forward_tokens_per_s",
    "dump_tokens_per_s",
    "ratio",
    "step_ratio",
    "cpu_ratio",
    "seconds",
    "cpu_seconds",
)


def measure(args: argparse.Namespace, tmp: str, extra: list[str], name: str = "teacher") -> dict:
    """One teacher's forward / step / dump tokens/s over the token store under tmp."""
    import numpy as np

    from rskd_jax import cache
    from rskd_jax.config import CacheRun, load_config

    rows_needed = (args.reps * args.steps + 2) * args.batch
    cfg = load_config(
        CacheRun,
        None,
        [
            f"cache.tokens={tmp}/tokens",
            f"cache.output={tmp}/{name}",
            "cache.splits=[train]",
            f"cache.batch_size={args.batch}",
            f"cache.chunk_rows={min(8, args.batch)}",
            f"cache.outputs=[{{name: rskd_n{args.draws}, method: sample, num_draws: {args.draws}}}]",
            *(SMOLLM2_SHAPE if args.random or args.vocabs else ["teacher.source=smollm2"]),
            *extra,
            *args.set,
        ],
    )
    t = time.perf_counter()
    cacher = cache.Cacher(cfg)
    load_s = time.perf_counter() - t
    if cacher.num_rows["train"] < rows_needed:
        raise SystemExit(f"the token store has {cacher.num_rows['train']} rows, {rows_needed} needed")
    forward, chunk = make_forward(cacher)
    import jax

    L = cacher.tokens.seq_len

    def next_batches():
        """The rows of the next `steps` unfinished batches: what cache_split will do next."""
        return np.stack(cacher.plan("train", max_steps=args.steps).local_rows)

    def run_forward(batches):
        t = time.perf_counter()
        for rows_B in batches:
            tokens_BxL, _, _ = cacher.global_batch(cacher.read_tokens("train", rows_B), rows_B)
            jax.block_until_ready(forward(cacher.state, tokens_BxL, cacher.head_DxV))
        return time.perf_counter() - t

    code = cacher.split_code("train")

    def run_step(batches):  # the dump's compute and device->host fetch, no writes
        t = time.perf_counter()
        for rows_B in batches:
            cacher.fetch(cacher.dispatch("train", rows_B, code)[1])
        return time.perf_counter() - t

    def run_dump(batches):
        res = cacher.cache_split("train", max_steps=args.steps, progress=False)
        assert res["rows"] == batches.size, (res["rows"], batches.shape)
        return res["seconds"]

    # warm-up (compiles; the dump's warm-up caches the first batch so the timed ones are fresh)
    warm = next_batches()[:1]
    compile_s = {}
    for name, fn in (("forward", run_forward), ("step", run_step)):
        compile_s[name] = round(fn(warm), 2)
    compile_s["dump"] = round(cacher.cache_split("train", max_steps=1, progress=False)["seconds"], 2)

    runs = {"forward": run_forward, "step": run_step, "dump": run_dump}
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        batches = next_batches()
        order = names[rep % 3 :] + names[: rep % 3]  # rotate, so none always runs first
        for name in order:
            c0 = _cpu_s()
            times[name].append(runs[name](batches))
            cpu[name].append(_cpu_s() - c0)
    tokens = args.steps * args.batch * L
    tps = {n: round(tokens / statistics.median(v), 1) for n, v in times.items()}
    tpc = {n: round(tokens / statistics.median(v), 1) for n, v in cpu.items()}
    store = next(iter(cacher.stores.values()))
    stats = store.stats()
    out = {
        "teacher": "random SmolLM2-shaped" if args.random or args.vocabs else "SmolLM2-135M (GGUF)",
        "teacher_overrides": args.set,
        "batch": args.batch,
        "len": L,
        "num_draws": args.draws,
        "chunk_positions": chunk,
        "steps_per_rep": args.steps,
        "reps": args.reps,
        "devices": len(jax.devices()),
        "forward_tokens_per_s": tps["forward"],
        "step_tokens_per_s": tps["step"],
        "dump_tokens_per_s": tps["dump"],
        "ratio": round(tps["dump"] / tps["forward"], 3),
        "step_ratio": round(tps["step"] / tps["forward"], 3),
        "tokens_per_cpu_s": tpc,
        "cpu_ratio": round(tpc["dump"] / tpc["forward"], 3),
        "seconds": {n: [round(x, 2) for x in v] for n, v in times.items()},
        "cpu_seconds": {n: [round(x, 2) for x in v] for n, v in cpu.items()},
        "warmup_s": compile_s,
        "load_s": round(load_s, 2),
        "store_bytes_per_token": round(stats["bytes_per_token"], 2),
        "mean_unique_ids": round(stats["mean_unique_ids"], 2),
        "jax_version": jax.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for st in cacher.stores.values():
        st.close()
    return out


if __name__ == "__main__":
    main()
