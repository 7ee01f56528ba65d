"""Device throughput check (run through tools/gpu_bench.sh): teacher cache and student train step.

    python tools/gpu_bench.py [--smoke] [--out FILE] [--peak-tflops 989]

cache  A SmolLM2-135M-shaped RANDOM teacher (30 layers, d=576, 9 heads / 3 KV heads, F=1536,
       V=49,152, tied, RoPE 1e5; no weights file) over random token rows in a real token store,
       writing a real `sample` N=50 teacher store with diagnostics through `cache.Cacher`
       (the cache program's own class). One warm-up step (compile), then the rest:
         tokens_per_s          end to end (step + fetch + background store writes)
         step_tokens_per_s     from the median step time (what the device sustains)
         forward_tokens_per_s  the teacher alone (hidden states + chunked LM head), same batch
train  A ~113M-parameter Llama student (d=768, 12 layers, 12 / 4 heads, F=2048, V=49,152, tied),
       bfloat16 compute, float32 master weights and loss math, AdamW: the CE step vs the RS-KD
       step on store-shaped targets (K = 50 slots, 12 unique ids, weights c/50), from
       `train_step.make_train_step`, interleaved after a warm-up; medians.
MFU = model FLOPs/token x tokens/s / peak. FLOPs/token (PaLM convention, no causal halving):
forward 2 N + 4 n_layers d L, train 6 N + 12 n_layers d L, with N the matmul parameters
(layers + the LM head once). Peak: 989 TFLOP/s (H100/H200 SXM bf16 dense) unless --peak-tflops.
`--smoke`: tiny sizes on any backend (CPU), same code paths. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

FULL = {
    "teacher": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3),
    "vocab": 49152,
    "cache_rows": 1024,
    "cache_len": 1024,
    "cache_batch": 64,
    "draws": 50,
    "student": dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4),
    "train_batch": 16,
    "train_len": 1024,
    "chunk": 256,
    "reps": 10,
    "dtype": "bfloat16",
}
SMOKE = {
    "teacher": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    "vocab": 1024,
    "cache_rows": 32,
    "cache_len": 64,
    "cache_batch": 8,
    "draws": 50,
    "student": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
    "train_batch": 4,
    "train_len": 64,
    "chunk": 32,
    "reps": 2,
    "dtype": "float32",
}
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
UNIQUE = 12


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    p.add_argument("--out", default=None, help="also write the JSON here (default: $OUT/gpu_bench.json)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--skip-cache", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    return p.parse_args(argv)


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per token: every layer weight + the LM head."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    return cfg.num_layers * (attn + 3 * d * f) + d * cfg.vocab_size


def flops_per_token(cfg, seq_len: int, *, train: bool) -> float:
    n, attn = matmul_params(cfg), cfg.num_layers * cfg.hidden_size * seq_len
    return 6 * n + 12 * attn if train else 2 * n + 4 * attn


def _mfu(tokens_per_s, flops, peak_tflops):
    return None if not peak_tflops or not tokens_per_s else tokens_per_s * flops / (peak_tflops * 1e12)


# ----------------------------------------------------------------------------- cache


def bench_cache(size: dict, tmp: str, peak) -> dict:
    import jax
    import numpy as np

    from rskd_jax.cache import Cacher
    from rskd_jax.config import CacheConfig, CacheRun, ModelSpec, OutputConfig
    from rskd_jax.store.tokens import write_token_store

    v, rows, length, b = size["vocab"], size["cache_rows"], size["cache_len"], size["cache_batch"]
    rng = np.random.default_rng(0)
    tokens = f"{tmp}/tokens"
    write_token_store(
        tokens,
        {"train": rng.integers(0, v, (rows, length)).astype(np.int32)},
        {
            "tokenizer": {"spec": "random", "fingerprint": f"random-{v}", "vocab_size": v, "eos_id": 0, "bos_id": None},
            "eos_id": 0,
        },
    )
    teacher = ModelSpec(
        source="random",
        seed=0,
        dtype=size["dtype"],
        param_dtype=size["dtype"],
        vocab_size=v,
        rope_theta=1e5,
        tie_embeddings=True,
        max_position_embeddings=max(2048, length),
        **size["teacher"],
    )
    run = CacheRun(
        cache=CacheConfig(
            tokens=tokens,
            output=f"{tmp}/teacher",
            splits=("train",),
            batch_size=b,
            chunk_rows=8,
            seed=0,
            outputs=(OutputConfig(name="rskd_n50", num_draws=size["draws"]),),
        ),
        teacher=teacher,
    )
    t0 = time.perf_counter()
    cacher = Cacher(run)
    setup_s = time.perf_counter() - t0
    warm = cacher.cache_split("train", max_steps=1, progress=False)  # compile + first step
    res = cacher.cache_split("train", progress=False)
    stats = cacher.stores["rskd_n50"].stats()
    cfg = cacher.model.config
    step_s = statistics.median(res["step_times"]) if res["step_times"] else None
    fwd_tps = _forward_tokens_per_s(cacher, b, length)
    flops = flops_per_token(cfg, length, train=False)
    tps = res["tokens"] / res["seconds"] if res["seconds"] else None
    step_tps = b * length / step_s if step_s else None
    for s in cacher.stores.values():
        s.close()
    return {
        "teacher": {**size["teacher"], "vocab": v, "dtype": size["dtype"], "matmul_params": matmul_params(cfg)},
        "rows": rows,
        "seq_len": length,
        "batch_size": b,
        "output": f"sample N={size['draws']} + diagnostics",
        "setup_s": round(setup_s, 2),
        "first_step_s": round(warm["seconds"], 2),
        "timed_tokens": res["tokens"],
        "tokens_per_s": tps,
        "step_tokens_per_s": step_tps,
        "forward_tokens_per_s": fwd_tps,
        "flops_per_token": flops,
        "mfu": _mfu(tps, flops, peak),
        "step_mfu": _mfu(step_tps, flops, peak),
        "forward_mfu": _mfu(fwd_tps, flops, peak),
        "store": {"bytes_per_token": stats["bytes_per_token"], "mean_unique_ids": stats["mean_unique_ids"]},
        "device_kind": jax.devices()[0].device_kind,
    }


def _forward_tokens_per_s(cacher, b: int, length: int, reps: int = 3) -> float:
    """The teacher alone on one batch: hidden states + LM-head logits chunk by chunk (as the
    cache step computes them), each chunk reduced to a number so nothing big is kept."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rskd_jax import cache_step, sharding

    graphdef = nnx.graphdef(cacher.model)
    chunk = cache_step.position_chunk(length, b, cacher.model.config.vocab_size)

    def fwd(state, tokens_BxL):
        model = nnx.merge(graphdef, state)
        h_BxLxD, w_DxV = model.hidden_states(tokens_BxL), model.lm_head_weight()
        h_NxBxCxD = jnp.swapaxes(h_BxLxD.reshape(b, length // chunk, chunk, -1), 0, 1)
        lse = jax.lax.map(
            lambda h: jax.nn.logsumexp(
                jnp.einsum("bcd,dv->bcv", h, w_DxV, preferred_element_type=jnp.float32), axis=-1
            ).sum(),
            h_NxBxCxD,
        )
        return lse.sum()

    f = jax.jit(fwd)
    tokens = jax.device_put(
        np.random.default_rng(1).integers(0, cacher.vocab, (b, length)).astype(np.int32),
        sharding.batch_sharding(cacher.mesh, 2),
    )
    jax.block_until_ready(f(cacher.state, tokens))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(cacher.state, tokens))
        times.append(time.perf_counter() - t)
    return b * length / statistics.median(times)


# ----------------------------------------------------------------------------- train


def bench_train(size: dict, peak) -> dict:
    import jax
    import numpy as np

    from rskd_jax import optim, sharding
    from rskd_jax import train_step as ts
    from rskd_jax.config import MeshConfig
    from rskd_jax.models import LlamaConfig, init_model

    v, b, length, k = size["vocab"], size["train_batch"], size["train_len"], size["draws"]
    cfg = LlamaConfig(
        vocab_size=v,
        tie_embeddings=True,
        rope_theta=1e5,
        max_position_embeddings=max(2048, length),
        dtype=size["dtype"],
        **size["student"],
    )
    student = init_model(cfg, seed=0)
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    graphdef, params = ts.split_model(student)
    schedule = optim.lr_schedule(3e-4, 10, 1000)
    tx = optim.make_optimizer(schedule)
    state_sh = optim.state_shardings(params, ts.model_shardings(student, mesh), tx, mesh)
    rng = np.random.default_rng(0)
    ids = np.zeros((b, length, k), np.int32)
    w = np.zeros((b, length, k), np.float32)
    u = min(UNIQUE, k)
    ids[..., :u] = rng.integers(0, v, (b, length, u))
    w[..., :u] = (1 + rng.multinomial(k - u, [1 / u] * u, size=(b, length))) / k
    host = {"tokens": rng.integers(0, v, (b, length)).astype(np.int32), "ids": ids, "weights": w}
    out = {
        "student": {
            **size["student"],
            "vocab": v,
            "dtype": size["dtype"],
            "params": int(sum(x.size for x in jax.tree.leaves(params))),
            "matmul_params": matmul_params(cfg),
        },
        "batch": [b, length],
        "chunk_size": size["chunk"],
        "slots": k,
        "unique_ids": u,
    }
    steps, states = {}, {}
    for name, method in (("ce", "ce"), ("rskd", "sparse")):
        batch = sharding.global_batch({kk: vv for kk, vv in host.items() if method == "sparse" or kk == "tokens"}, mesh)
        spec = ts.LossSpec(method, alpha=1.0 if method == "ce" else 0.0, vocab_size=v, chunk_size=size["chunk"])
        fn = ts.jit_step(
            ts.make_train_step(graphdef, tx, schedule, spec), state_sh, ts.batch_shardings(batch, mesh), mesh
        )
        states[name] = optim.create_state(params, tx, 0, state_sh)
        t = time.perf_counter()
        states[name], m = fn(states[name], batch)
        jax.block_until_ready(m)
        out[f"{name}_first_step_s"] = round(time.perf_counter() - t, 2)
        steps[name] = (fn, batch)
    times = {n: [] for n in steps}
    for _ in range(size["reps"]):
        for name, (fn, batch) in steps.items():
            t = time.perf_counter()
            states[name], m = fn(states[name], batch)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t)
    flops = flops_per_token(cfg, length, train=True)
    for name in steps:
        s = statistics.median(times[name])
        out[name] = {"step_s": s, "tokens_per_s": b * length / s, "mfu": _mfu(b * length / s, flops, peak)}
    out["flops_per_token"] = flops
    out["rskd_overhead"] = out["rskd"]["step_s"] / out["ce"]["step_s"] - 1.0
    mem = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    out["peak_bytes_in_use"] = (mem or {}).get("peak_bytes_in_use")
    return out


def main(argv=None) -> None:
    args = _parse(argv)
    t0 = time.perf_counter()
    import jax

    size = SMOKE if args.smoke else FULL
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or next((p for name, p in PEAKS.items() if name in kind), None)
    result = {
        "smoke": args.smoke,
        "device": f"{jax.device_count()} x {kind}",
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "peak_tflops": peak,
    }
    if not args.skip_cache:
        with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
            result["cache"] = bench_cache(size, tmp, peak)
    if not args.skip_train:
        result["train"] = bench_train(size, peak)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result)
    print(text)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_bench.json") if os.environ.get("OUT") else None)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
