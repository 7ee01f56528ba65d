"""Student train-step cost: cross-entropy vs RS-KD (sparse store targets, N = 50 and 13 draws).

    python tools/bench_step.py --json [--preset cpu|comparison|smollm2] [--reps 9]
                               [--forms dense,trimmed] [--full-online] [--chunk-size C]
                               [--skip-memory] [--mem-chunk-size 256]

One student, one batch, jitted steps of rskd_jax.train_step (AdamW included):
  ce              L = CE
  rskd_n{N}_{form} L = sparse KD from store-shaped targets: N draws per position from a
                  Zipf-like teacher (exponent ~ U(1, 3) per position: 13.0 unique ids on
                  average at N = 50 and 5.3 at N = 13, the paper's 12.1 and 5.0), weights
                  count / N, in the reader's `form` (rskd_jax.store.forms): dense = K = N
                  slots as read_rows returns them, trimmed = slots cut to the batch's largest
                  entry count rounded up to 8
  full_online     (--full-online) full KD from a frozen teacher of the student's shape
Every timed call copies the host batch to the device (sharding.global_batch, as the train
loop does) and runs the step. After one warm-up call each, the candidates run interleaved
--reps times, in a rotating order (a busy machine slows neighbours alike). Reported: each
candidate's median seconds, and its ratio to CE as the median over reps of (its time / the
CE time of the same rep), with the standard error of the mean log-ratio (`*_se`); goal:
rskd / ce <= 1.03. h2d_bytes_per_token: the host batch's bytes per token.
Memory: the N = 50 dense step compiled (not run) at V = 49,152 and 8 x 1024 tokens, with the
unchunked loss ([B, L, V] float32 logits) and the chunked one; XLA's memory_analysis of the
executable gives arguments + outputs + temporaries - aliased (donated) bytes.
Presets: `cpu` (a 4-layer d=256 student with SmolLM2's vocabulary, 4 x 256 tokens),
`comparison` (the comparison's student: d=128, 4 layers, 8 x 256 tokens, configs/reproduce.yaml)
and `smollm2` (SmolLM2-135M's shape, 8 x 1024 tokens, bfloat16 compute; for an accelerator).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

PRESETS = {
    "cpu": dict(
        model=dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, dtype="float32"),
        batch=4,
        length=256,
    ),
    "comparison": dict(
        model=dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, dtype="float32"),
        batch=8,
        length=256,
    ),
    "smollm2": dict(
        model=dict(
            hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, dtype="bfloat16"
        ),
        batch=8,
        length=1024,
    ),
}
VOCAB, DRAWS = 49152, (50, 13)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: smollm2 on an accelerator, cpu otherwise"
    )
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--len", type=int, default=None, dest="length")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--forms", default="dense,trimmed", help="reader forms of the RS-KD batches")
    p.add_argument("--full-online", action="store_true", help="also time online full KD")
    p.add_argument("--chunk-size", type=int, default=0, help="loss chunk for the timed steps")
    p.add_argument("--mem-chunk-size", type=int, default=256)
    p.add_argument("--alpha", type=float, default=0.0, help="CE weight of the KD steps")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    return p.parse_args()


def store_rows(rng, b: int, l: int, draws: int) -> dict:
    """What TeacherStore.read_rows returns for a `sample` store at N = draws (dense, K = N
    slots): ids (ascending, empty slots last with id 0), weights count / N, counts, num_ids."""
    import numpy as np

    p = b * l
    ranks = np.arange(1, VOCAB + 1, dtype=np.float64)
    ids = np.zeros((p, draws), np.int32)
    counts = np.zeros((p, draws), np.int32)
    perm = rng.permutation(VOCAB)  # rank -> id
    cdfs = np.cumsum(ranks[None] ** -np.linspace(1.0, 3.0, 64)[:, None], axis=1)
    for i, j in enumerate(rng.integers(0, 64, p)):
        cdf = cdfs[j]
        u, c = np.unique(perm[np.searchsorted(cdf, rng.uniform(0, cdf[-1], draws))], return_counts=True)
        ids[i, : u.size], counts[i, : u.size] = u, c
    num = (counts > 0).sum(-1)
    return {
        "ids": ids.reshape(b, l, draws),
        "counts": counts.reshape(b, l, draws),
        "weights": (counts / draws).astype(np.float32).reshape(b, l, draws),
        "num_ids": num.reshape(b, l).astype(np.int32),
    }


class Bench:
    """One student and teacher and the host batches; `step(method, chunk)` jits a train step."""

    def __init__(self, args, model_kw: dict, b: int, l: int):
        import jax
        import numpy as np

        from rskd_jax import optim, sharding
        from rskd_jax import train_step as ts
        from rskd_jax.models import LlamaConfig, init_model

        config = LlamaConfig(
            vocab_size=VOCAB, tie_embeddings=True, rope_theta=1e5, max_position_embeddings=max(l, 2048), **model_kw
        )
        student = init_model(config, seed=0)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, VOCAB, (b, l)).astype(np.int32)
        base = {"tokens": tokens, "mask": np.ones((b, l), np.int32)}
        self.batches = {"ce": base}  # candidate -> (loss method, host batch)
        self.unique = {}
        forms = [f for f in args.forms.split(",") if f]
        for n in DRAWS:
            rows = store_rows(rng, b, l, n)
            self.unique[n] = float(rows["num_ids"].mean())
            for form in forms:
                if form != "dense":  # imported only when asked: `--forms dense` runs on older code
                    from rskd_jax.store.forms import to_form

                    rows_f = to_form(rows, form)
                else:
                    rows_f = rows
                self.batches[f"rskd_n{n}_{form}"] = {**base, "ids": rows_f["ids"], "weights": rows_f["weights"]}
        if args.full_online:
            self.batches["full_online"] = base
        self.mesh = mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
        sharding.check_batch(b, mesh, key="--batch")
        self.graphdef, self.params = ts.split_model(student)
        self.schedule = optim.lr_schedule(1e-4, 10, 1000)
        self.tx = optim.make_optimizer(self.schedule)
        self.state_sh = optim.state_shardings(self.params, ts.model_shardings(student, mesh), self.tx, mesh)
        self.tgraph = self.tparams = self.t_sh = None
        if args.full_online:
            teacher = init_model(config, seed=1)
            self.tgraph, tparams = ts.split_model(teacher)
            self.t_sh = ts.model_shardings(teacher, mesh)
            self.tparams = jax.device_put(tparams, self.t_sh)
        self.alpha = args.alpha

    @staticmethod
    def method(name: str) -> str:
        return "sparse" if name.startswith("rskd") else name

    def step(self, name: str, chunk: int, batch: dict):
        from rskd_jax import train_step as ts

        method = self.method(name)
        online = method == "full_online"
        spec = ts.LossSpec(method, alpha=1.0 if method == "ce" else self.alpha, vocab_size=VOCAB, chunk_size=chunk)
        step = ts.make_train_step(
            self.graphdef, self.tx, self.schedule, spec, teacher_graphdef=self.tgraph if online else None
        )
        return ts.jit_step(
            step, self.state_sh, ts.batch_shardings(batch, self.mesh), self.mesh, self.t_sh if online else None
        )

    def fresh_state(self):
        from rskd_jax import optim

        return optim.create_state(self.params, self.tx, 0, self.state_sh)

    def teacher_for(self, name: str):
        return self.tparams if name == "full_online" else None


def time_steps(bench: Bench, chunk: int, reps: int) -> dict:
    """Interleaved timing (host -> device copy + step), after one warm-up call each."""
    import jax

    from rskd_jax import sharding

    names = list(bench.batches)
    steps = {m: bench.step(m, chunk, sharding.global_batch(bench.batches[m], bench.mesh)) for m in names}
    states = {m: bench.fresh_state() for m in names}
    times: dict[str, list[float]] = {m: [] for m in names}
    first = {}
    for rep in range(reps + 1):
        for j in range(len(names)):
            m = names[(j + rep) % len(names)]  # rotating order: no candidate always runs first
            t = time.perf_counter()
            batch = sharding.global_batch(bench.batches[m], bench.mesh)
            states[m], out = steps[m](states[m], batch, bench.teacher_for(m))
            jax.block_until_ready((states[m], out))
            dt = time.perf_counter() - t
            if rep:
                times[m].append(dt)
            else:  # compile + first run
                first[m] = round(dt, 3)
    res = {
        "step_s": {m: statistics.median(times[m]) for m in names},
        "ratio_to_ce": {},
        "ratio_to_ce_se": {},
        "first_step_s": first,
    }
    for m in names:
        logs = [math.log(a / c) for a, c in zip(times[m], times["ce"])]
        res["ratio_to_ce"][m] = math.exp(statistics.median(logs))
        res["ratio_to_ce_se"][m] = (statistics.stdev(logs) / math.sqrt(len(logs))) if len(logs) > 1 else None
    tokens = bench.batches["ce"]["tokens"].size
    res["h2d_bytes_per_token"] = {m: sum(x.nbytes for x in bench.batches[m].values()) / tokens for m in names}
    return res


def memory(bench: Bench, b: int, l: int, chunk: int) -> dict:
    """XLA memory analysis of the N = 50 dense sparse step compiled for a [b, l] batch."""
    import jax
    import jax.numpy as jnp

    from rskd_jax import optim, sharding

    bs = lambda nd: sharding.batch_sharding(bench.mesh, nd)
    k = DRAWS[0]
    batch = {
        "tokens": jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=bs(2)),
        "ids": jax.ShapeDtypeStruct((b, l, k), jnp.int32, sharding=bs(3)),
        "weights": jax.ShapeDtypeStruct((b, l, k), jnp.float32, sharding=bs(3)),
    }
    state = optim.abstract_state(bench.params, bench.tx, bench.state_sh)
    m = bench.step("rskd", chunk, batch).jitted.lower(state, batch, None).compile().memory_analysis()
    if m is None:
        return {"available": False}
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {
        "peak_bytes": int(peak),
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
    }


def main() -> None:
    args = _parse()
    import jax

    preset_name = args.preset or ("cpu" if jax.default_backend() == "cpu" else "smollm2")
    preset = PRESETS[preset_name]
    b, l = args.batch or preset["batch"], args.length or preset["length"]
    bench = Bench(args, preset["model"], b, l)
    result = {
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "preset": preset_name,
        "student": preset["model"],
        "vocab": VOCAB,
        "batch": [b, l],
        "draws": list(DRAWS),
        "mean_unique_ids": bench.unique,
        "alpha": args.alpha,
        "chunk_size": args.chunk_size,
        "reps": args.reps,
    }
    result.update(time_steps(bench, args.chunk_size, args.reps))
    if not args.skip_memory:
        mb, ml = 8, 1024
        result["memory"] = {
            "batch": [mb, ml],
            "vocab": VOCAB,
            "logits_f32_bytes": mb * ml * VOCAB * 4,
            "unchunked": memory(bench, mb, ml, 0),
            "chunked": {"chunk_size": args.mem_chunk_size, **memory(bench, mb, ml, args.mem_chunk_size)},
        }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    sys.exit(main())
