"""Device throughput check (run through tools/gpu_bench.sh): teacher cache and student train step.

    python tools/gpu_bench.py [--smoke] [--out FILE] [--peak-tflops 989] [--families qwen3_1.7b,gemma3_1b|none]

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
families  (--families, default both) Qwen3-1.7B- and Gemma-3-1B-shaped RANDOM teachers from
       their config.json values (FAMILIES), in the run's dtype (bfloat16) with attention "auto"
       (cuDNN flash attention on GPU; reported as "attention"): exported with save_pretrained,
       cached as above through the sharded load (256 x 1024 tokens, batch 16), and trained as
       the student (batch 8 x 1024), CE vs RS-KD. --smoke: tiny versions of the same families.
attention  (always) the backend's attention paths (auto, xla; cudnn on GPU, splash on TPU) against
       the chunked path on random bfloat16 q/k/v (2 x 1024 tokens, 8 / 2 heads, E = 128): causal,
       a 256-token window, and document segment ids with each; max |diff| per case, and the
       path each ran as (a fallback is reported, not hidden).
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
# Teachers users have, as their Hugging Face config.json (random weights of these shapes).
QWEN3_1P7B = dict(
    architectures=["Qwen3ForCausalLM"],
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    attention_bias=False,
)
GEMMA3_1B = dict(
    architectures=["Gemma3ForCausalLM"],
    model_type="gemma3_text",
    vocab_size=262144,
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_local_base_freq=10000.0,
    sliding_window=512,
    sliding_window_pattern=6,
    query_pre_attn_scalar=256,
    tie_word_embeddings=True,
    attention_bias=False,
)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16)
FAMILIES = {
    "qwen3_1.7b": (QWEN3_1P7B, dict(TINY, vocab_size=1024, num_hidden_layers=2, num_key_value_heads=2)),
    "gemma3_1b": (
        GEMMA3_1B,
        dict(
            TINY,
            vocab_size=2048,
            num_hidden_layers=3,
            num_key_value_heads=1,
            sliding_window=16,
            sliding_window_pattern=3,
        ),
    ),
}
FAMILY_SIZE = {"cache_rows": 256, "cache_len": 1024, "cache_batch": 16, "train_batch": 8, "train_len": 1024, "reps": 5}
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
UNIQUE = 12


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU)")
    p.add_argument("--out", default=None, help="also write the JSON here (default: $OUT/gpu_bench.json)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--skip-cache", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help=f"family-shaped random teachers to run (comma-separated, of {list(FAMILIES)}; 'none': skip)",
    )
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


def bench_cache(size: dict, tmp: str, peak, teacher=None, vocab: int | None = None) -> dict:
    """The cache section; teacher: a ModelSpec (default: the random SmolLM2-shaped one of `size`)."""
    import jax
    import numpy as np

    from rskd_jax.cache import Cacher
    from rskd_jax.config import CacheConfig, CacheRun, ModelSpec, OutputConfig
    from rskd_jax.models.attention import resolve_attention
    from rskd_jax.store.tokens import write_token_store

    v, rows, length, b = vocab or size["vocab"], size["cache_rows"], size["cache_len"], size["cache_batch"]
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
    teacher = teacher or ModelSpec(
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
        "teacher": {
            **({} if teacher.source != "random" else size["teacher"]),
            "vocab": v,
            "dtype": cfg.dtype,
            "matmul_params": matmul_params(cfg),
            "attention": resolve_attention(cfg.attention, cfg.attn_softcap, dtype=cfg.dtype, length=length),
            "position_chunk": cacher.position_chunk,
        },
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

    from rskd_jax import sharding

    graphdef = nnx.graphdef(cacher.model)
    chunk = cacher.position_chunk

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


# ----------------------------------------------------------------------------- families


def bench_family(name: str, size: dict, tmp: str, peak) -> dict:
    """A family-shaped random teacher (FAMILIES; --smoke: its tiny version) in size["dtype"] with
    attention "auto" (cuDNN flash attention on GPU in bfloat16): exported with save_pretrained
    (the family's HF layout), cached through the sharded load (`Cacher` -> from_pretrained with
    the mesh), and trained as a student of the same shape."""
    from rskd_jax.config import ModelSpec
    from rskd_jax.models import LlamaConfig, init_model, save_pretrained

    full, tiny = FAMILIES[name]
    hf = {**full, **tiny} if size is SMOKE else full
    sizes = size if size is SMOKE else {**size, **FAMILY_SIZE}
    cfg = LlamaConfig.from_hf(hf, dtype=size["dtype"], param_dtype=size["dtype"])
    path = f"{tmp}/{name}"
    t = time.perf_counter()
    save_pretrained(init_model(cfg, seed=0), path)
    export_s = time.perf_counter() - t
    spec = ModelSpec(source=path, dtype=size["dtype"], param_dtype=size["dtype"])
    out = {"config": cfg.to_dict(), "export_s": round(export_s, 2)}
    out["cache"] = bench_cache(sizes, f"{tmp}/{name}_cache", peak, teacher=spec, vocab=cfg.vocab_size)
    out["train"] = bench_train(sizes, peak, cfg=cfg.replace(param_dtype="float32"))
    return out


# ----------------------------------------------------------------------------- train


def bench_train(size: dict, peak, cfg=None) -> dict:
    """The train section; cfg: the student's LlamaConfig (default: the ~113M Llama of `size`)."""
    import jax
    import numpy as np

    from rskd_jax import optim, sharding
    from rskd_jax import train_step as ts
    from rskd_jax.config import MeshConfig
    from rskd_jax.models import LlamaConfig, init_model
    from rskd_jax.models.attention import resolve_attention

    b, length, k = size["train_batch"], size["train_len"], size["draws"]
    cfg = cfg or LlamaConfig(
        vocab_size=size["vocab"],
        tie_embeddings=True,
        rope_theta=1e5,
        max_position_embeddings=max(2048, length),
        dtype=size["dtype"],
        **size["student"],
    )
    v = cfg.vocab_size
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
            **({k: getattr(cfg, k) for k in size["student"]}),
            "family": cfg.family or "llama",
            "attention": resolve_attention(cfg.attention, cfg.attn_softcap, dtype=cfg.dtype, length=length),
            "vocab": v,
            "dtype": cfg.dtype,
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


def check_attention(smoke: bool) -> dict:
    """Each attention kind against the chunked path, bfloat16, causal / window / segments."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rskd_jax.documents import segments_and_positions
    from rskd_jax.models import attention as attn

    b, kh, g, e = 2, 2, 4, (16 if smoke else 128)
    length, window = (256, 64) if smoke else (1024, 256)
    rng = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)
        for shape, scale in (((b, kh, length, g, e), e**-0.5), ((b, kh, length, e), 1.0), ((b, kh, length, e), 1.0))
    )
    starts = np.zeros((b, length), bool)
    starts[:, rng.integers(1, length, 12)] = True
    seg = jnp.asarray(segments_and_positions(starts)[0])
    cases = {
        "causal": (None, None),
        "window": (window, None),
        "segments": (None, seg),
        "window_segments": (window, seg),
    }
    refs = {
        case: attn.causal_attention(q, k, v, window=w, segment_ids=s).astype(jnp.float32)
        for case, (w, s) in cases.items()
    }
    backend = jax.default_backend()
    out: dict = {}
    for kind in ("auto", "xla", "cudnn", "splash"):
        impl, reason = attn.choose_attention(kind, backend=backend, dtype="bfloat16", length=length)
        diffs = {}
        for case, (w, s) in cases.items():
            run = jax.jit(lambda q, k, v, w=w, s=s, kind=kind: attn.attention(kind, q, k, v, window=w, segment_ids=s))
            diffs[case] = float(jnp.abs(run(q, k, v).astype(jnp.float32) - refs[case]).max())
        out[kind] = {"ran_as": impl, "fallback_reason": reason, "max_abs_diff": diffs}
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
    result["attention"] = check_attention(args.smoke)
    if not args.skip_cache:
        with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
            result["cache"] = bench_cache(size, tmp, peak)
    if not args.skip_train:
        result["train"] = bench_train(size, peak)
    families = [f for f in args.families.split(",") if f and f != "none"]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"--families {unknown}: unknown; use {list(FAMILIES)} or 'none'")
    for name in families:
        with tempfile.TemporaryDirectory(prefix=f"gpu-bench-{name}-") as tmp:
            result[name] = bench_family(name, size, tmp, peak)
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
