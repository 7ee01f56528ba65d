"""Forward throughput of the JAX Llama vs transformers' PyTorch Llama on the same weights.

    python tools/bench_forward.py --json [--batch 8] [--len 512] [--threads N] [--reps 3]

Loads SmolLM2-135M from the GGUF (or --model PATH), runs a jitted float32 forward on random
tokens [batch, len] and reports compile time and tokens/s (median of --reps timed runs after
one warm-up); builds transformers' LlamaForCausalLM from the very same weights (our HF
export, in memory), torch.set_num_threads(threads), inference_mode, float32, and times it on
the same batch. JAX and torch runs alternate, so a busy machine slows both alike.
Prints one JSON object: tokens/s from the median wall time (and `ratio` = JAX / torch; `_best`
from the fastest run),
median process CPU seconds per forward (`cpu_ratio` = torch / JAX CPU time, which other
jobs on the machine barely move), the compile time, and the 1-minute load average
(above `threads`, the wall figures are shared with other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file or HF dir (default: SmolLM2 GGUF)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--len", type=int, default=512, dest="length")
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="cores for both frameworks (default: all schedulable)",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    return p.parse_args()


def jax_forward(model, tokens):
    """A compiled forward (state, tokens) -> logits, its state, and the compile time."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))
    t = time.perf_counter()
    compiled = forward.lower(state, tokens).compile()
    compile_s = time.perf_counter() - t
    return lambda: compiled(state, tokens).block_until_ready(), compile_s


def torch_forward(model, tokens, threads: int):
    """transformers' LlamaForCausalLM on the same weights (our HF export, in memory)."""
    import torch
    import transformers

    from rskd_jax.models.hf import config_to_hf, hf_tensors

    torch.set_num_threads(threads)
    hf = config_to_hf(model.config)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "dtype"})
    ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    missing, unexpected = ref.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in hf_tensors(model).items()}, strict=False
    )
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    ids = torch.from_numpy(tokens).long()

    def run():
        with torch.inference_mode():
            return ref(ids, use_cache=False).logits

    return run, ref.config._attn_implementation


def main() -> None:
    args = _parse()
    # Pin the process to `threads` cores before jax/torch start their thread pools: XLA sizes
    # its pool from the schedulable cores, torch from set_num_threads.
    if hasattr(os, "sched_setaffinity") and args.threads < len(os.sched_getaffinity(0)):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    import numpy as np

    from rskd_jax.models import from_pretrained, smollm2_path

    path = args.model or smollm2_path()
    t = time.perf_counter()
    model = from_pretrained(path, dtype="float32")
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.config.vocab_size, (args.batch, args.length), dtype=np.int32)
    n = args.batch * args.length
    out = {
        "model": os.path.basename(str(path)),
        "batch": args.batch,
        "len": args.length,
        "threads": args.threads,
        "dtype": "float32",
        "load_s": round(load_s, 2),
    }
    run_jax, compile_s = jax_forward(model, tokens)
    out["compile_s"] = round(compile_s, 2)
    runs = {"jax": run_jax}
    if not args.skip_torch:
        runs["torch"], out["torch_attn_implementation"] = torch_forward(model, tokens, args.threads)
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    load_before = os.getloadavg()[0]
    for _ in range(args.reps):  # interleaved, so a busy machine slows both alike
        for name, run in runs.items():
            t, c = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    for name in runs:
        out[f"{name}_tokens_per_s"] = round(n / statistics.median(wall[name]), 1)
        out[f"{name}_tokens_per_s_best"] = round(n / min(wall[name]), 1)
        # Process CPU seconds per run: robust to other jobs on the machine (wall is not).
        out[f"{name}_cpu_s"] = round(statistics.median(cpu[name]), 3)
    if "torch" in runs:
        out["ratio"] = round(statistics.median(wall["torch"]) / statistics.median(wall["jax"]), 3)
        out["cpu_ratio"] = round(statistics.median(cpu["torch"]) / statistics.median(cpu["jax"]), 3)
    # > threads means other processes competed for the cores: wall figures are then noisy.
    out["loadavg_1min"] = round(max(load_before, os.getloadavg()[0]), 2)
    import jax

    out.update(jax_version=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
