"""rskd_jax.compare: the stage log, the stage wiring, the configs, loss_and_grad against the
train step, and (slow) the whole program on configs/tiny/reproduce.yaml (two stdlib slices,
the tiny random teacher, five students): results.json fields, plots, the per-source val
splits, resume (a second invocation does no work and writes the same bytes), the README
section between the markers of a README copy."""

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from rskd_jax.compare import CompareError, CompareRun, Comparison, report, sources
from rskd_jax.compare.plots import PLOTS
from rskd_jax.compare.state import StageLog, fingerprint
from rskd_jax.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs/tiny/reproduce.yaml")
METHODS = ["ce", "full_kd", "top_k_12", "rskd_n50", "wor_k12"]


def _env():
    # one CPU device (the programs as a user runs them; conftest's 8 fake devices are for
    # the sharding tests), a compile cache shared by both invocations
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _compare(root, *extra):
    cmd = [
        sys.executable,
        "-m",
        "rskd_jax.compare",
        "--config",
        TINY,
        f"reproduce.output={root}/run",
        f"reproduce.results_dir={root}/results",
        f"reproduce.readme={root}/README.md",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


# ----------------------------------------------------------------------------- fast


@pytest.mark.parametrize("url", ["path", "file_url"])
def test_stage_log_skips_resumes_and_redoes(tmp_path, url):
    calls = []
    out = str(tmp_path) if url == "path" else f"file://{tmp_path}"  # reproduce.output may be a URL
    log = StageLog(out)
    assert log.stage("a", {"x": 1}, lambda: calls.append(1) or {"v": (1, 2)}) == {"v": [1, 2]}
    assert log.stage("a", {"x": 1, "progress": False}, lambda: calls.append(2)) == {"v": [1, 2]}  # not in key
    assert calls == [1] and log.ran == ["a"] and log.skipped == ["a"]
    log = StageLog(out)  # from state.json
    assert log.stage("a", {"x": 1}, lambda: calls.append(3)) == {"v": [1, 2]} and calls == [1]
    assert log.stage("a", {"x": 1}, lambda: calls.append(4), outputs_ok=lambda: False) is None and calls == [1, 4]
    assert log.stage("a", {"x": 2}, lambda: 5) == 5 and log.stages["a"]["fingerprint"] == fingerprint({"x": 2})

    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        log.stage("b", {"y": 1}, boom)
    rec = json.loads((tmp_path / "state.json").read_text())["stages"]["b"]
    assert rec["status"] == "interrupted" and rec["result"] is None
    assert log.stage("b", {"y": 1}, lambda: "ok") == "ok"
    assert log.stages["b"]["status"] == "done" and log.stages["b"]["seconds"] >= rec["seconds"]


def test_stage_configs_are_wired_under_the_output(tmp_path):
    cfg = load_config(
        CompareRun,
        TINY,
        [f"reproduce.output={tmp_path}/run/", "reproduce.epochs=null", "train.steps=7", "loss.alpha=0.25"],
    )
    cmp = Comparison(cfg, ["--config", "x.yaml"])
    assert list(cmp.data_runs()) == ["mime", "json"]
    assert cmp.data_runs()["json"].data.output == f"{tmp_path}/run/tokens/json"
    assert cmp.data_runs()["json"].data.inputs == ("@stdlib/json/tool.py", "@stdlib/json/scanner.py")
    cache = cmp.cache_run().cache
    assert (cache.tokens, cache.output) == (f"{tmp_path}/run/tokens/mix", f"{tmp_path}/run/teacher")
    runs = cmp.train_runs()
    assert list(runs) == METHODS and all(t.train.steps == 7 and t.train.tokens == cmp.mix for t in runs.values())
    assert runs["ce"].loss.alpha == 1.0 and runs["rskd_n50"].loss.alpha == 0.25
    assert runs["ce"].train.teacher_store is None and runs["full_kd"].loss.method == "full_online"
    assert runs["top_k_12"].train.teacher_store == f"{tmp_path}/run/teacher/top_k_12"
    assert runs["wor_k12"].train.output == f"{tmp_path}/run/train/wor_k12"
    assert cmp.command() == "python -m rskd_jax.compare --config x.yaml"
    # one context section: the cache's teacher and every student read the same setting
    assert not cmp.cache_run().context.document_masking
    masked = Comparison(load_config(CompareRun, TINY, ["context.document_masking=true", "reproduce.epochs=null"]))
    assert masked.cache_run().context.document_masking
    assert all(t.context.document_masking for t in masked.train_runs().values())


def test_method_overrides_change_only_that_student(tmp_path):
    methods = (
        "reproduce.methods=[{name: ce, loss: ce}, {name: a, loss: sparse, store: rskd_n50},"
        " {name: b, loss: sparse, store: rskd_n50, set: ['optim.clip_norm=0', 'train.batch_size=16']}]"
    )
    cfg = load_config(CompareRun, TINY, [f"reproduce.output={tmp_path}/run", "reproduce.epochs=2.0", methods])
    cmp = Comparison(cfg)
    cmp.log.stages["data"] = {"result": {"mix": {"rows": {"train": 40}}}}  # what the data stage records
    runs = cmp.train_runs()
    assert runs["a"].optim == cfg.optim and runs["a"].train.batch_size == cfg.train.batch_size
    assert runs["b"].optim.clip_norm == 0.0 and runs["b"].optim.b2 == cfg.optim.b2
    assert runs["b"].train.batch_size == 16 and runs["b"].train.steps == 2 * 40 // 16
    assert runs["a"].train.steps == 2 * 40 // cfg.train.batch_size
    assert runs["b"].train.teacher_store == runs["a"].train.teacher_store
    for bad, match in [
        ("loss.method=ce", "other than"),
        ("student.seed=3", "train, loss or optim"),
        ("optim.clipnorm=0", "unknown key 'optim.clipnorm'"),
        ("optim.clip_norm=-1", "clip_norm >= 0"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(CompareRun, TINY, [f"reproduce.methods=[{{name: ce, loss: ce, set: ['{bad}']}}]"])
    fresh = "{name: f, loss: sparse, store: rskd_n50, epoch_stores: [top_k_12]}"
    cfg = load_config(
        CompareRun, TINY, [f"reproduce.output={tmp_path}/run", f"reproduce.methods=[{{name: ce}}, {fresh}]"]
    )
    cmp = Comparison(cfg)
    cmp.log.stages["data"] = {"result": {"mix": {"rows": {"train": 40}}}}
    assert cmp.train_runs()["f"].train.epoch_stores == (f"{tmp_path}/run/teacher/top_k_12",)
    assert cmp.train_runs()["ce"].train.epoch_stores == ()
    for bad, match in [
        ("{name: f, loss: sparse, store: rskd_n50, epoch_stores: [nope]}", "epoch store 'nope' is not in"),
        ("{name: f, loss: ce, epoch_stores: [rskd_n50]}", "epoch_stores need a store"),
        ("{name: f, loss: sparse, store: rskd_n50, set: ['train.epoch_stores=[x]']}", "other than"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(match) if "'" in match else match):
            load_config(CompareRun, TINY, [f"reproduce.methods=[{{name: ce}}, {bad}]"])


def test_configs():
    real = load_config(CompareRun, os.path.join(ROOT, "configs/reproduce.yaml"))
    names = [m.name for m in real.reproduce.methods]
    assert sorted(names) == sorted(
        [
            "ce",
            "full_kd",
            "top_k_12",
            "top_k_50",
            "ghost_12",
            "rskd_n50",
            "rskd_n13",
            "wor_k12",
            "wor_k12_norm",
            "rskd_n50_t0.8",
            "rskd_n50_t1.2",
        ]
    )
    assert names[:2] == ["ce", "full_kd"]  # the gap's two ends train first
    assert {m.store for m in real.reproduce.methods if m.store} <= {o.name for o in real.cache.outputs}
    assert real.data.seq_len in (256, 512) and real.teacher.source == "smollm2"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(CompareRun, TINY, ["reproduce.methodz=[]"])
    with pytest.raises(ConfigError, match="not in cache.outputs"):
        load_config(
            CompareRun, TINY, ["reproduce.methods=[{name: ce, loss: ce}, {name: x, loss: sparse, store: nope}]"]
        )
    with pytest.raises(ConfigError, match="named 'ce'"):
        load_config(CompareRun, TINY, ["reproduce.methods=[{name: a, loss: ce}]"])
    two = "reproduce.methods=[{name: a, loss: ce}, {name: b, loss: full_online}, {name: c, loss: ce}]"
    ends = load_config(CompareRun, TINY, [two, "reproduce.gap_ends=[c, b]"]).reproduce
    assert (ends.ce_end, ends.full_end) == ("c", "b")
    default = load_config(CompareRun, TINY).reproduce
    assert (default.ce_end, default.full_end) == ("ce", "full_kd")
    for bad in ("[b, a]", "[a]", "[a, b, c]", "[a, nope]", "[a, c]"):  # a ce method, then a full_online one
        with pytest.raises(ConfigError, match="gap_ends"):
            load_config(CompareRun, TINY, [two, f"reproduce.gap_ends={bad}"])
    stdlib_only = load_config(CompareRun, os.path.join(ROOT, "configs/reproduce.yaml"), ["reproduce.docs=false"])
    assert [s.name for s in sources.active_sources(stdlib_only.reproduce)] == ["stdlib"]
    for path in sorted(glob.glob(os.path.join(ROOT, "configs/diagnosis/*.yaml"))):  # issue 15's runs load
        diag = load_config(CompareRun, path)
        assert diag.reproduce.readme is None and diag.reproduce.results_dir.startswith("docs/results/diagnosis/")
    demo = load_config(CompareRun, os.path.join(ROOT, "configs/demo.yaml"))  # `make demo`
    assert [m.name for m in demo.reproduce.methods] == ["ce", "rskd_n50"] and demo.teacher.source == "smollm2"
    assert demo.reproduce.readme is None and not demo.reproduce.output.startswith("docs")


def test_missing_apt_message(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda _: None)
    with pytest.raises(CompareError, match="reproduce.docs=false"):
        sources.ensure_python_docs(str(tmp_path / "pydoc"))


def test_update_readme_without_markers(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("# no markers\n")
    assert report.update_readme(str(p), "table") is None
    assert p.read_text() == "# no markers\n"
    p.write_text(f"a\n{report.START}\nold\n{report.END}\nb\n")
    assert report.update_readme(str(p), "new") is True
    assert p.read_text() == f"a\n{report.START}\nnew\n{report.END}\nb\n"
    assert report.update_readme(str(p), "new") is False


def _tiny_model_and_batch():
    from rskd_jax import train_step as ts
    from rskd_jax.models import LlamaConfig, init_model

    model = init_model(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1),
        seed=0,
    )
    graphdef, params = ts.split_model(model)
    rng = np.random.default_rng(0)
    mask = np.ones((2, 8), np.int32)
    mask[1, 5:] = 0
    batch = {
        "tokens": rng.integers(0, 64, (2, 8)).astype(np.int32),
        "mask": mask,
        "ids": rng.integers(0, 64, (2, 8, 4)).astype(np.int32),
        "weights": rng.dirichlet(np.ones(4), (2, 8)).astype(np.float32),
    }
    return graphdef, params, batch


@pytest.mark.parametrize(
    "method,alpha,z,chunk",
    [pytest.param(*case, marks=pytest.mark.slow) for case in [("sparse", 0.3, 1e-2, 4), ("ce", 0.0, 0.0, 0)]],
)  # test-fast keeps test_loss_and_grad_matches_a_hand_written_loss
def test_loss_and_grad_is_the_train_steps_gradient(method, alpha, z, chunk):
    """loss_and_grad == the gradient the train step applies (captured by an optax
    transformation whose state is the last gradient and whose update is zero)."""
    import jax
    import jax.numpy as jnp
    import optax

    from rskd_jax import optim
    from rskd_jax import train_step as ts

    graphdef, params, batch = _tiny_model_and_batch()
    spec = ts.LossSpec(method, alpha=alpha, z_loss=z, vocab_size=60, chunk_size=chunk)
    capture = optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), g),
    )
    state = optim.TrainState(params, capture.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0))
    new_state, m = jax.jit(ts.make_train_step(graphdef, capture, lambda s: 0.0, spec))(state, batch)
    loss, aux, grads = jax.jit(lambda p, b: ts.loss_and_grad(p, None, b, graphdef=graphdef, spec=spec))(params, batch)
    np.testing.assert_allclose(loss, m["loss"], rtol=1e-6)
    for k in ("ce", "kd", "z_loss", "ce_tokens", "kd_tokens"):
        np.testing.assert_allclose(aux[k], m[k], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(new_state.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_loss_and_grad_matches_a_hand_written_loss():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rskd_jax import losses
    from rskd_jax import train_step as ts

    graphdef, params, batch = _tiny_model_and_batch()
    spec = ts.LossSpec("sparse", vocab_size=64)
    loss, _, grads = jax.jit(lambda p: ts.loss_and_grad(p, None, batch, graphdef=graphdef, spec=spec))(params)

    def direct(p):
        logits = nnx.merge(graphdef, p)(batch["tokens"])
        kd = losses.sparse_kd_loss(logits, batch["ids"], batch["weights"], where=batch["mask"].astype(bool))
        return jnp.sum(kd) / batch["mask"].sum()

    want_loss, want_grads = jax.jit(jax.value_and_grad(direct))(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)


# ----------------------------------------------------------------------------- slow: the whole program


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    readme = _read(os.path.join(ROOT, "README.md"))
    if report.START not in readme:
        readme += f"\n## Results\n\n{report.START}\nplaceholder\n{report.END}\n\nTail.\n"
    (root / "README.md").write_text(readme)
    first = _compare(root)
    snap = {name: _read(root / "results" / name, "rb") for name in ("results.json", *PLOTS)}
    snap["README.md"] = _read(root / "README.md", "rb")
    snap["state.json"] = _read(root / "run" / "state.json", "rb")
    second = _compare(root)
    return {
        "root": root,
        "readme_before": readme,
        "first": first,
        "second": second,
        "snap": snap,
        "results": json.loads(snap["results.json"]),
    }


@pytest.mark.slow
def test_every_stage_runs_then_nothing_on_resume(tiny):
    stages = ["data", "cache", *[f"train/{m}" for m in METHODS], "eval", "grad", "timing", "report"]
    assert tiny["first"]["ran"] == stages and tiny["first"]["skipped"] == []
    assert tiny["second"]["ran"] == [] and tiny["second"]["skipped"] == stages
    root = tiny["root"]
    for name, data in tiny["snap"].items():  # byte-identical: nothing was rewritten
        path = root / ("run" if name == "state.json" else "results" if name != "README.md" else "") / name
        assert _read(path, "rb") == data, name


@pytest.mark.slow
def test_results_fields(tiny):
    r = tiny["results"]
    assert [m["method"] for m in r["methods"]] == METHODS
    need = (
        "method",
        "val_loss",
        "ece",
        "val_loss_by_source",
        "gap_closed_pct",
        "kl_to_teacher",
        "top1_agreement",
        "bytes_per_token",
        "step_time_rel_ce",
        "grad_angle_deg",
        "grad_norm_ratio",
    )
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
    assert r["commands"]["reproduce"].startswith("python -m rskd_jax.compare --config")
    assert r["config"]["reproduce"]["methods"][0]["name"] == "ce"
    assert r["gap_ends"] == ["ce", "full_kd"]
    # the eval's per-row sums pool to the reported val losses, and give every other method an interval
    ev = json.loads(_read(tiny["root"] / "run" / "state.json"))["stages"]["eval"]["result"]
    for name in METHODS:
        rows = ev["row_sums"][name]
        assert set(rows) == {"val_mime", "val_json"}
        for split, want in (("val_mime", by[name]["val_loss_by_source"]["mime"]), ("val_json", None)):
            assert len(rows[split]["count"]) == r["setup"]["val_rows_evaluated"][split]
            if want is not None:
                assert sum(rows[split]["nll_sum"]) / sum(rows[split]["count"]) == pytest.approx(want, rel=1e-6)
        pooled = sum(sum(rows[s]["nll_sum"]) for s in rows) / sum(sum(rows[s]["count"]) for s in rows)
        assert pooled == pytest.approx(by[name]["val_loss"], rel=1e-6)
        ci = by[name]["gap_closed_ci95"]
        if name in ("ce", "full_kd"):
            assert ci is None
        else:
            assert ci is not None and ci[0] <= ci[1] and set(by[name]["gap_closed_ci95_by_source"]) == {"mime", "json"}


@pytest.mark.slow
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
    assert tiny["results"]["setup"]["val_rows_evaluated"] == {
        "val_mime": mix.num_rows("val_mime"),
        "val_json": mix.num_rows("val_json"),
    }


@pytest.mark.slow
def test_source_stats_attribute_every_mix_row(tiny):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import source_stats

    stats = source_stats.source_stats(str(tiny["root"] / "run"), ["rskd_n50", "top_k_12"])
    data = json.loads(_read(tiny["root"] / "run" / "state.json"))["stages"]["data"]["result"]
    assert {s: d["rows"] for s, d in stats.items()} == {s: v["rows"]["train"] for s, v in data["sources"].items()}
    for d in stats.values():
        assert d["unique_ids"]["top_k_12"] == 12  # top-K keeps K ids at every position
        assert 1 <= d["unique_ids"]["rskd_n50"] <= 50 and d["entropy_nats"] > 0 and d["teacher_nll_nats"] > 0


@pytest.mark.slow
def test_plots_and_readme(tiny):
    root = tiny["root"]
    for name in PLOTS:
        assert _read(root / "results" / name, "rb")[:8] == b"\x89PNG\r\n\x1a\n"
    text = _read(root / "README.md")
    before = tiny["readme_before"]
    i, j = text.index(report.START), text.index(report.END)
    # only the text between the markers changed
    assert text[:i] == before[: before.index(report.START)]
    assert text[j:] == before[before.index(report.END) :]
    section = text[i:j]
    assert "| method |" in section and all(f"`{m}`" in section for m in METHODS)
    assert "results/val_loss.png" in section and "python -m rskd_jax.compare --config" in section


def test_reference_full_row_only_from_an_identical_run(tmp_path):
    from rskd_jax.compare.results import reference_full_row

    full = {"method": "full_kd", "loss": "full_online", "val_loss": 5.0, "val_loss_by_source": {"a": 4.9, "b": 5.1}}
    ce = {"method": "ce", "loss": "ce", "val_loss": 6.0, "val_loss_by_source": {"a": 6.1, "b": 5.9}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"methods": [ce, full]}))
    here = {"all": 6.0, "val_a": 6.1, "val_b": 5.9}
    row = reference_full_row(str(path), here, ["a", "b"])
    assert row["val_loss"] == 5.0 and row["reference"] == str(path)
    with pytest.raises(CompareError, match=r"val_b: 5\.900100 here vs 5\.9"):
        reference_full_row(str(path), {**here, "val_b": 5.9001}, ["a", "b"])
    path.write_text(json.dumps({"methods": [ce]}))
    with pytest.raises(CompareError, match="no full_online row"):
        reference_full_row(str(path), here, ["a", "b"])
    with pytest.raises(CompareError, match="not a results.json"):
        reference_full_row(str(tmp_path / "missing.json"), here, ["a", "b"])


def test_merge_results_takes_rows_only_from_the_same_setting():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import merge_results

    def res(ce_docs: float, *rows):
        ce = {"method": "ce", "family": "ce", "val_loss": 6.0, "val_loss_by_source": {"docs": ce_docs}}
        return {"setup": {"steps": 10}, "commands": {"reproduce": "python -m rskd_jax.compare"}, "methods": [ce, *rows]}

    old = {"method": "top_k_12", "family": "top_k", "val_loss": 5.9}
    new = {"method": "sys_n50", "family": "systematic", "val_loss": 5.5, "unbiased": True}
    ref = {"method": "full_kd", "family": "full", "val_loss": 5.0, "reference": "x"}
    merged = merge_results.merge(res(6.0, old), [("b.json", res(6.0, new, ref))])
    assert [r["method"] for r in merged["methods"]] == ["ce", "top_k_12", "sys_n50"]  # no ce or borrowed row
    assert merged["methods"][1]["unbiased"] is False and merged["methods"][2]["results"] == "b.json"
    with pytest.raises(SystemExit, match="not the base's"):
        merge_results.merge(res(6.0, old), [("b.json", res(6.1, new))])
    other = res(6.0, new)
    other["setup"]["steps"] = 20
    with pytest.raises(SystemExit, match=r"setup.steps"):
        merge_results.merge(res(6.0, old), [("b.json", other)])
