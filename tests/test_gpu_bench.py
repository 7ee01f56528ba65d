"""tools/gpu_bench.py: the FLOPs formula, and the --smoke run (tiny sizes, CPU, same code paths;
the Qwen3- and Gemma-3-shaped teachers too)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_bench():
    """tools/gpu_bench.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_bench", os.path.join(ROOT, "tools/gpu_bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_bench_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "tools/gpu_bench.sh"), "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "gpu_bench.json").read_text())
    assert out["smoke"] and out["cache"]["tokens_per_s"] > 0 and out["cache"]["forward_tokens_per_s"] > 0
    assert out["cache"]["store"]["mean_unique_ids"] > 0
    assert out["train"]["ce"]["tokens_per_s"] > 0 and out["train"]["rskd"]["tokens_per_s"] > 0
    assert out["cache"]["flops_per_token"] > 0 and out["train"]["flops_per_token"] > 0
    for kind, check in out["attention"].items():  # bfloat16 outputs against the chunked path
        assert max(check["max_abs_diff"].values()) < 0.05, (kind, check)
    assert (
        out["attention"]["splash"]["ran_as"] == "chunked"
        and "TPU only" in out["attention"]["splash"]["fallback_reason"]
    )
    for name, family in (("qwen3_1.7b", "qwen3"), ("gemma3_1b", "gemma3_text")):
        fam = out[name]
        assert fam["config"]["family"] == family and fam["cache"]["tokens_per_s"] > 0
        assert fam["cache"]["teacher"]["attention"] == "chunked"  # auto on CPU
        assert fam["train"]["student"]["family"] == family
        assert fam["train"]["ce"]["tokens_per_s"] > 0 and fam["train"]["rskd"]["tokens_per_s"] > 0


def test_flops_formula():
    from rskd_jax.models import LlamaConfig

    gpu_bench = _gpu_bench()
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        tie_embeddings=True,
    )
    assert gpu_bench.matmul_params(cfg) == 30 * (576 * 64 * 24 + 3 * 576 * 1536) + 576 * 49152  # 134.5M
    assert gpu_bench.flops_per_token(cfg, 1024, train=False) == 2 * gpu_bench.matmul_params(cfg) + 4 * 30 * 576 * 1024
