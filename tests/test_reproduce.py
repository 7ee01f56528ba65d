"""tools/reproduce.py end to end on configs/tiny/reproduce.yaml (two stdlib slices, the tiny
random teacher, five students): results.json fields, plots, the per-source val splits, resume
(a second invocation does no work and writes the same bytes), the README section between the
markers of a README copy; the gradient capture against jax.grad; the configs; gpu_bench --smoke."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import reproduce  # noqa: E402
import reproduce_report  # noqa: E402
from rskd_jax.config import ConfigError, load_config  # noqa: E402

TINY = os.path.join(ROOT, "configs/tiny/reproduce.yaml")
METHODS = ["ce", "full_kd", "top_k_12", "rskd_n50", "wor_k12"]


def _env():
    # one CPU device (the programs as a user runs them; conftest's 8 fake devices are for
    # the sharding tests), a compile cache shared by both invocations
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _reproduce(root, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "tools/reproduce.py"), "--config", TINY,
           f"reproduce.output={root}/run", f"reproduce.results_dir={root}/results",
           f"reproduce.readme={root}/README.md", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    readme = _read(os.path.join(ROOT, "README.md"))
    if reproduce_report.START not in readme:
        readme += f"\n## Results\n\n{reproduce_report.START}\nplaceholder\n{reproduce_report.END}\n\nTail.\n"
    (root / "README.md").write_text(readme)
    first = _reproduce(root)
    snap = {name: _read(root / "results" / name, "rb") for name in ("results.json", *reproduce_report.PLOTS)}
    snap["README.md"] = _read(root / "README.md", "rb")
    snap["state.json"] = _read(root / "run" / "state.json", "rb")
    second = _reproduce(root)
    return {"root": root, "readme_before": readme, "first": first, "second": second, "snap": snap,
            "results": json.loads(snap["results.json"])}


def test_every_stage_runs_then_nothing_on_resume(tiny):
    stages = ["data", "cache", *[f"train/{m}" for m in METHODS], "eval", "grad", "timing", "report"]
    assert tiny["first"]["ran"] == stages and tiny["first"]["skipped"] == []
    assert tiny["second"]["ran"] == [] and tiny["second"]["skipped"] == stages
    root = tiny["root"]
    for name, data in tiny["snap"].items():  # byte-identical: nothing was rewritten
        path = root / ("run" if name == "state.json" else "results" if name != "README.md" else "") / name
        assert _read(path, "rb") == data, name


def test_results_fields(tiny):
    r = tiny["results"]
    assert [m["method"] for m in r["methods"]] == METHODS
    need = ("method", "val_loss", "ece", "val_loss_by_source", "gap_closed_pct", "kl_to_teacher",
            "top1_agreement", "bytes_per_token", "step_time_rel_ce", "grad_angle_deg", "grad_norm_ratio")
    for m in r["methods"]:
        assert all(k in m for k in need), m["method"]
        assert set(m["val_loss_by_source"]) == {"mime", "json"}
        assert np.isfinite(m["val_loss"]) and 0 <= m["ece"] <= 1 and m["kl_to_teacher"] >= 0
        assert sum(m["eval_bins"]["count"]) > 0
    by = {m["method"]: m for m in r["methods"]}
    assert by["ce"]["gap_closed_pct"] == 0 and by["full_kd"]["gap_closed_pct"] == pytest.approx(100)
    assert by["ce"]["step_time_rel_ce"] == 1.0 and by["rskd_n50"]["step_time_rel_ce"] > 0
    assert by["full_kd"]["grad_angle_deg"] == 0 and by["full_kd"]["bytes_per_token"] is None
    for name in ("top_k_12", "rskd_n50", "wor_k12", "ce"):
        assert 0 <= by[name]["grad_angle_deg"] <= 180 and by[name]["grad_norm_ratio"] > 0
    assert by["top_k_12"]["stored_ids"] == 12 and by["rskd_n50"]["bytes_per_token"] > 0
    assert r["teacher"]["val_loss"] > 0 and r["unique_ids"][0]["num_draws"] == 50
    assert r["wall_time_s"] > 0 and r["hardware"]["cpu_count"] >= 1
    assert r["commands"]["reproduce"].startswith("python tools/reproduce.py --config")
    assert r["config"]["reproduce"]["methods"][0]["name"] == "ce"


def test_per_source_val_splits(tiny):
    from rskd_jax.store.tokens import open_token_store

    run = tiny["root"] / "run" / "tokens"
    mix = open_token_store(str(run / "mix"))
    val_rows = 0
    for name in ("mime", "json"):
        src = open_token_store(str(run / name))
        n = src.num_rows("val")
        val_rows += n
        assert np.array_equal(mix.read(f"val_{name}", np.arange(n)), src.read("val", np.arange(n)))
    assert mix.num_rows("val") == val_rows
    assert tiny["results"]["setup"]["val_rows_evaluated"] == {"val_mime": mix.num_rows("val_mime"),
                                                               "val_json": mix.num_rows("val_json")}


def test_plots_and_readme(tiny):
    root = tiny["root"]
    for name in reproduce_report.PLOTS:
        assert _read(root / "results" / name, "rb")[:8] == b"\x89PNG\r\n\x1a\n"
    text = _read(root / "README.md")
    before = tiny["readme_before"]
    i, j = text.index(reproduce_report.START), text.index(reproduce_report.END)
    # only the text between the markers changed
    assert text[:i] == before[:before.index(reproduce_report.START)]
    assert text[j:] == before[before.index(reproduce_report.END):]
    section = text[i:j]
    assert "| method |" in section and all(f"`{m}`" in section for m in METHODS)
    assert "results/val_loss.png" in section and "python tools/reproduce.py --config" in section


def test_update_readme_without_markers(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("# no markers\n")
    assert reproduce_report.update_readme(str(p), "table") is None
    assert p.read_text() == "# no markers\n"
    p.write_text(f"a\n{reproduce_report.START}\nold\n{reproduce_report.END}\nb\n")
    assert reproduce_report.update_readme(str(p), "new") is True
    assert p.read_text() == f"a\n{reproduce_report.START}\nnew\n{reproduce_report.END}\nb\n"
    assert reproduce_report.update_readme(str(p), "new") is False


def test_configs():
    real = load_config(reproduce.ReproduceRun, os.path.join(ROOT, "configs/reproduce.yaml"))
    names = [m.name for m in real.reproduce.methods]
    assert sorted(names) == sorted(["ce", "full_kd", "top_k_12", "top_k_50", "ghost_12", "rskd_n50", "rskd_n13",
                                    "wor_k12", "wor_k12_norm", "rskd_n50_t0.8", "rskd_n50_t1.2"])
    assert names[:2] == ["ce", "full_kd"]  # the gap's two ends train first
    assert {m.store for m in real.reproduce.methods if m.store} <= {o.name for o in real.cache.outputs}
    assert real.data.seq_len in (256, 512) and real.teacher.source == "smollm2"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(reproduce.ReproduceRun, TINY, ["reproduce.methodz=[]"])
    with pytest.raises(ConfigError, match="not in cache.outputs"):
        load_config(reproduce.ReproduceRun, TINY, ["reproduce.methods=[{name: ce, loss: ce}, {name: x, loss: sparse, store: nope}]"])
    with pytest.raises(ConfigError, match="named 'ce'"):
        load_config(reproduce.ReproduceRun, TINY, ["reproduce.methods=[{name: a, loss: ce}]"])
    stdlib_only = load_config(reproduce.ReproduceRun, os.path.join(ROOT, "configs/reproduce.yaml"),
                              ["reproduce.docs=false"])
    assert [s.name for s in reproduce.active_sources(stdlib_only.reproduce)] == ["stdlib"]


def test_missing_apt_message(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce.shutil, "which", lambda _: None)
    with pytest.raises(reproduce.ReproduceError, match="reproduce.docs=false"):
        reproduce.ensure_python_docs(str(tmp_path / "pydoc"))


def test_gradient_capture_matches_jax_grad():
    """The grad check's optax trick returns exactly the gradient of train_step's loss."""
    import jax
    import jax.numpy as jnp

    import reproduce_eval
    from rskd_jax import losses, optim
    from rskd_jax import train_step as ts
    from rskd_jax.models import LlamaConfig, init_model

    model = init_model(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                                   num_heads=2, num_kv_heads=1), seed=0)
    graphdef, params = ts.split_model(model)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 64, (2, 8)).astype(np.int32), "mask": np.ones((2, 8), np.int32),
             "ids": rng.integers(0, 64, (2, 8, 4)).astype(np.int32),
             "weights": rng.dirichlet(np.ones(4), (2, 8)).astype(np.float32)}
    tx = reproduce_eval._grad_capture()
    state = optim.TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0))
    step = ts.make_train_step(graphdef, tx, lambda s: 0.0, ts.LossSpec("sparse", vocab_size=64))
    new_state, _ = jax.jit(step)(state, batch)

    def direct(p):
        from flax import nnx

        logits = nnx.merge(graphdef, p)(batch["tokens"])
        return jnp.mean(losses.sparse_kd_loss(logits, batch["ids"], batch["weights"]))

    want = jax.grad(direct)(params)
    for a, b in zip(jax.tree.leaves(new_state.opt_state), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)  # zero update: the params stay put


def test_gpu_bench_smoke(tmp_path):
    env = dict(_env(), PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools/gpu_bench.sh"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "gpu_bench.json").read_text())
    assert out["smoke"] and out["cache"]["tokens_per_s"] > 0 and out["cache"]["forward_tokens_per_s"] > 0
    assert out["cache"]["store"]["mean_unique_ids"] > 0
    assert out["train"]["ce"]["tokens_per_s"] > 0 and out["train"]["rskd"]["tokens_per_s"] > 0
    assert out["cache"]["flops_per_token"] > 0 and out["train"]["flops_per_token"] > 0


def test_flops_formula():
    import gpu_bench
    from rskd_jax.models import LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, tie_embeddings=True)
    assert gpu_bench.matmul_params(cfg) == 30 * (576 * 64 * 24 + 3 * 576 * 1536) + 576 * 49152  # 134.5M
    assert gpu_bench.flops_per_token(cfg, 1024, train=False) == 2 * gpu_bench.matmul_params(cfg) + 4 * 30 * 576 * 1024
