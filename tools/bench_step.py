"""Student train-step cost: cross-entropy vs RS-KD (sparse store targets) vs online full KD.

    python tools/bench_step.py --json [--preset cpu|smollm2] [--batch B] [--len L] [--reps 5]
                               [--chunk-size C] [--mem-chunk-size 256]

One student, one batch, three jitted steps (rskd_jax.train_step, AdamW included):
  ce           L = CE
  sparse       L = KD from store-shaped targets: N = 50 draws, K = 50 slots of which ~12
               hold a unique id (weight count / 50), the rest weight 0 (what a `sample`
               store at N = 50 returns on real text)
  full_online  L = full KD from a frozen teacher run inside the step (the same
               architecture as the student, other weights)
Timing: after a warm-up, the three steps run interleaved --reps times (a busy machine slows
all alike); the medians are reported, with sparse_overhead = sparse / ce - 1 (the paper: RS-KD
costs ~2-10% over CE; our target is <= 3%).
Memory: the sparse step compiled (not run) at V = 49,152 and 8 x 1024 tokens, with the
unchunked loss ([B, L, V] float32 logits) and the chunked one; XLA's memory_analysis of the
executable gives arguments + outputs + temporaries - aliased (donated) bytes.
Presets: `cpu` (a 4-layer d=256 student with SmolLM2's vocabulary, 4 x 256 tokens) and
`smollm2` (SmolLM2-135M's shape, 8 x 1024 tokens, bfloat16 compute; for an accelerator).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

PRESETS = {
    "cpu": dict(model=dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                           num_kv_heads=2, dtype="float32"), batch=4, length=256),
    "smollm2": dict(model=dict(hidden_size=576, intermediate_size=1536, num_layers=30,
                               num_heads=9, num_kv_heads=3, dtype="bfloat16"), batch=8, length=1024),
}
VOCAB, DRAWS, UNIQUE = 49152, 50, 12


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default: smollm2 on an accelerator, cpu otherwise")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--len", type=int, default=None, dest="length")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=0, help="loss chunk for the timed steps")
    p.add_argument("--mem-chunk-size", type=int, default=256)
    p.add_argument("--alpha", type=float, default=0.0, help="CE weight of the KD steps")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    return p.parse_args()


def sparse_targets(rng, b: int, l: int):
    """ids [b, l, 50] int32, weights [b, l, 50]: 12 unique ids with counts summing to 50."""
    import numpy as np

    ids = np.zeros((b, l, DRAWS), np.int32)
    w = np.zeros((b, l, DRAWS), np.float32)
    ids[..., :UNIQUE] = rng.integers(0, VOCAB, (b, l, UNIQUE))
    counts = 1 + rng.multinomial(DRAWS - UNIQUE, [1 / UNIQUE] * UNIQUE, size=(b, l))
    w[..., :UNIQUE] = counts / DRAWS
    return ids, w


class Bench:
    """One student and teacher, one batch; `step(method, chunk)` jits a train step."""

    def __init__(self, args, model_kw: dict, b: int, l: int):
        import jax
        import numpy as np

        from rskd_jax import optim, sharding
        from rskd_jax import train_step as ts
        from rskd_jax.models import LlamaConfig, init_model

        config = LlamaConfig(vocab_size=VOCAB, tie_embeddings=True, rope_theta=1e5,
                             max_position_embeddings=max(l, 2048), **model_kw)
        student, teacher = init_model(config, seed=0), init_model(config, seed=1)
        rng = np.random.default_rng(0)
        ids, w = sparse_targets(rng, b, l)
        batch = {"tokens": rng.integers(0, VOCAB, (b, l)).astype(np.int32), "ids": ids, "weights": w}
        self.mesh = mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
        sharding.check_batch(b, mesh, key="--batch")
        self.graphdef, self.params = ts.split_model(student)
        self.tgraph, tparams = ts.split_model(teacher)
        self.schedule = optim.lr_schedule(1e-4, 10, 1000)
        self.tx = optim.make_optimizer(self.schedule)
        self.state_sh = optim.state_shardings(self.params, ts.model_shardings(student, mesh), self.tx, mesh)
        self.t_sh = ts.model_shardings(teacher, mesh)
        self.tparams = jax.device_put(tparams, self.t_sh)
        self.batch = sharding.global_batch(batch, mesh)
        self.alpha = args.alpha

    def step(self, method: str, chunk: int):
        from rskd_jax import train_step as ts

        online = method == "full_online"
        spec = ts.LossSpec(method, alpha=1.0 if method == "ce" else self.alpha, vocab_size=VOCAB,
                           chunk_size=chunk)
        step = ts.make_train_step(self.graphdef, self.tx, self.schedule, spec,
                                  teacher_graphdef=self.tgraph if online else None)
        return ts.jit_step(step, self.state_sh, ts.batch_shardings(self.batch, self.mesh), self.mesh,
                           self.t_sh if online else None)

    def fresh_state(self):
        from rskd_jax import optim

        return optim.create_state(self.params, self.tx, 0, self.state_sh)

    def teacher_for(self, method: str):
        return self.tparams if method == "full_online" else None


def time_steps(bench: Bench, chunk: int, reps: int) -> dict:
    """Medians of interleaved runs of the three steps (after one warm-up run each)."""
    import jax

    methods = ("ce", "sparse", "full_online")
    steps = {m: bench.step(m, chunk) for m in methods}
    states = {m: bench.fresh_state() for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    first = {}
    for rep in range(reps + 1):
        for m in methods:
            t = time.perf_counter()
            states[m], out = steps[m](states[m], bench.batch, bench.teacher_for(m))
            jax.block_until_ready((states[m], out))
            dt = time.perf_counter() - t
            if rep:
                times[m].append(dt)
            else:  # compile + first run
                first[m] = dt
    res = {f"{m}_step_s": statistics.median(times[m]) for m in methods}
    res["first_step_s"] = {m: round(v, 3) for m, v in first.items()}
    return res


def memory(bench: Bench, b: int, l: int, chunk: int) -> dict:
    """XLA memory analysis of the sparse step compiled for a [b, l] batch (nothing runs)."""
    import jax
    import jax.numpy as jnp

    from rskd_jax import optim, sharding

    bs = lambda nd: sharding.batch_sharding(bench.mesh, nd)  # noqa: E731
    batch = {"tokens": jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=bs(2)),
             "ids": jax.ShapeDtypeStruct((b, l, DRAWS), jnp.int32, sharding=bs(3)),
             "weights": jax.ShapeDtypeStruct((b, l, DRAWS), jnp.float32, sharding=bs(3))}
    state = optim.abstract_state(bench.params, bench.tx, bench.state_sh)
    m = bench.step("sparse", chunk).jitted.lower(state, batch, None).compile().memory_analysis()
    if m is None:
        return {"available": False}
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    return {"peak_bytes": int(peak), "temp_bytes": int(m.temp_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes)}


def main() -> None:
    args = _parse()
    import jax

    preset_name = args.preset or ("cpu" if jax.default_backend() == "cpu" else "smollm2")
    preset = PRESETS[preset_name]
    b, l = args.batch or preset["batch"], args.length or preset["length"]
    bench = Bench(args, preset["model"], b, l)
    result = {"device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
              "preset": preset_name, "student": preset["model"], "vocab": VOCAB, "batch": [b, l],
              "draws": DRAWS, "slots": DRAWS, "unique_ids": UNIQUE, "alpha": args.alpha,
              "chunk_size": args.chunk_size, "reps": args.reps}
    result.update(time_steps(bench, args.chunk_size, args.reps))
    result["sparse_overhead"] = result["sparse_step_s"] / result["ce_step_s"] - 1.0
    result["full_online_overhead"] = result["full_online_step_s"] / result["ce_step_s"] - 1.0
    if not args.skip_memory:
        mb, ml = 8, 1024
        result["memory"] = {
            "batch": [mb, ml], "vocab": VOCAB, "logits_f32_bytes": mb * ml * VOCAB * 4,
            "unchunked": memory(bench, mb, ml, 0),
            "chunked": {"chunk_size": args.mem_chunk_size, **memory(bench, mb, ml, args.mem_chunk_size)},
        }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    sys.exit(main())
