"""Peak host memory of loading a teacher onto 8 CPU devices: the sharded load vs the old one.

    python tools/bench_load.py --json [--gb 1.0] [--mesh fsdp=8] [--param-dtype float32]

Writes a random Llama-shaped checkpoint of about --gb GB (float32; `models.save_pretrained`,
the repo's HF export) to a tmp dir, then loads it in a fresh subprocess per path, with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and the mesh --mesh, into the parameter
shardings the cache program jits with (`sharding.param_shardings`):

  sharded   `from_pretrained(path, mesh=mesh)`: memory-mapped safetensors, each device's shard
            read on its own (`jax.make_array_from_callback`)
  old       `from_pretrained(path)` then `jax.device_put(state, shardings)`: every tensor read
            into host memory, stacked, put on device 0, then sharded (the pre-issue-11 path)

Each child measures its resident set before loading (after jax's CPU backend is up) and its
peak (VmHWM, reset through /proc/self/clear_refs where the kernel allows, else ru_maxrss)
after; `peak_over_checkpoint` = (peak - baseline) / checkpoint bytes. On CPU the devices'
memory is host memory, so a perfect load is 1.0 (the parameters themselves). The child also
reports the largest number of parameter bytes any one device holds against the ideal
checkpoint bytes / 8 (the norms are replicated: slightly more).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

# About 1.02 GB in float32: 254M parameters, Llama-shaped (untied, GQA).
SHAPE = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=4096,
    num_layers=12,
    num_heads=16,
    num_kv_heads=8,
    max_position_embeddings=4096,
)


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0, help="checkpoint size (scales num_layers)")
    p.add_argument("--mesh", default="fsdp=8", help="mesh axes, e.g. fsdp=8 or fsdp=2,tensor=4")
    p.add_argument("--param-dtype", default="float32", help="the loaded params' dtype")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--child", nargs=2, metavar=("PATH", "KIND"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _mesh_config(spec: str):
    from rskd_jax.config import MeshConfig

    axes = dict(kv.split("=") for kv in spec.split(",") if kv)
    return MeshConfig(**{"data": 1, **{k: int(v) for k, v in axes.items()}})


def child(path: str, kind: str, args: argparse.Namespace) -> dict:
    import jax
    from flax import nnx

    from rskd_jax import sharding
    from rskd_jax.models import from_pretrained
    from rskd_jax.models.safetensors_mmap import MappedSafetensors

    mesh = sharding.make_mesh(_mesh_config(args.mesh))
    ckpt_bytes = MappedSafetensors(sorted(Path(path).glob("*.safetensors"))).nbytes()
    jax.block_until_ready(jax.device_put(1.0))  # the CPU client and its 8 devices exist now
    reset = _reset_peak()
    base_kb = _status_kb("VmRSS")
    if kind == "sharded":
        model = from_pretrained(path, param_dtype=args.param_dtype, mesh=mesh)
        state = nnx.state(model)
    else:
        model = from_pretrained(path, param_dtype=args.param_dtype)
        state = nnx.state(model)
        state = jax.device_put(state, sharding.param_shardings(state, mesh))
    jax.block_until_ready(jax.tree.leaves(state))
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_device: dict = {}
    for a in jax.tree.leaves(state):
        for shard in a.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    peak = (peak_kb - base_kb) * 1024
    return {
        "checkpoint_bytes": ckpt_bytes,
        "baseline_rss_bytes": base_kb * 1024,
        "peak_minus_baseline_bytes": peak,
        "peak_over_checkpoint": round(peak / ckpt_bytes, 3),
        "peak_source": "VmHWM (reset)" if reset else "ru_maxrss",
        "devices": len(per_device),
        "max_device_param_bytes": max(per_device.values()),
        "ideal_device_param_bytes": sum(per_device.values()) // len(per_device),
    }


def write_checkpoint(out: Path, gb: float) -> None:
    from rskd_jax.models import LlamaConfig, init_model, save_pretrained

    per_layer = 4 * (2 * 1024 * 1024 + 2 * 512 * 1024 + 3 * 4096 * 1024)
    fixed = 4 * 2 * 32000 * 1024
    layers = max(1, round((gb * 1e9 - fixed) / per_layer))
    save_pretrained(init_model(LlamaConfig(**{**SHAPE, "num_layers": layers}), seed=0), out)


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return {}
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result: dict = {"mesh": args.mesh, "param_dtype": args.param_dtype}
    with tempfile.TemporaryDirectory() as tmp:
        # The writer runs in its own process too, so no child inherits its memory.
        code = f"from tools.bench_load import write_checkpoint; write_checkpoint({tmp!r}, {args.gb})"
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        for kind in ("sharded", "old"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                tmp,
                kind,
                "--mesh",
                args.mesh,
                "--param-dtype",
                args.param_dtype,
            ]
            out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
            result[kind] = json.loads(out.strip().splitlines()[-1])
    result["command"] = "python tools/bench_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result, indent=None if args.json else 2))
    return result


if __name__ == "__main__":
    main()
