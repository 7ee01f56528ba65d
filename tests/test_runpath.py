"""Run directories as URLs (rskd_jax.runpath, etils.epath): a train run to a local path and to
a file:// URL through the same code path (checkpoints, metrics.jsonl, config.yaml, TensorBoard,
resume, evaluate), the staged writer object stores need, and the multi-host resume."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_train import ROOT, make_teacher, make_tokens, overrides

from rskd_jax.config import EvaluateRun, TrainRun, load_config
from rskd_jax.runpath import is_local, read_text, run_path, upload_tree, write_text


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    splits, manifest = make_tokens(str(root / "tokens"))
    make_teacher(str(root / "teacher"), splits, manifest)
    return str(root / "tokens"), str(root / "teacher")


def test_run_path_maps_file_urls_and_keeps_object_store_urls(tmp_path):
    assert os.fspath(run_path(f"file://{tmp_path}/a")) == f"{tmp_path}/a"
    assert os.fspath(run_path("rel/x")) == os.path.abspath("rel/x")
    assert os.fspath(run_path("gs://bucket/run")) == "gs://bucket/run"
    assert is_local(f"file://{tmp_path}") and is_local("x") and not is_local("gs://bucket/run")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.bin").write_bytes(b"\x00\x01")
    upload_tree(str(src), f"file://{tmp_path}/dst")
    assert (tmp_path / "dst" / "sub" / "f.bin").read_bytes() == b"\x00\x01"
    write_text(f"file://{tmp_path}/dst/t.txt", "one")
    assert read_text(tmp_path / "dst" / "t.txt") == "one" and not (tmp_path / "dst" / "t.txt.tmp").exists()


def _records(out):
    return [json.loads(x) for x in read_text(run_path(out) / "metrics.jsonl").splitlines()]


# The local path is slow-marked: after run_path both kinds are one local code path, which
# test-fast keeps through the file:// URL (the default suite runs both).
@pytest.mark.parametrize("kind", [pytest.param("path", marks=pytest.mark.slow), "file_url"])
def test_train_resume_and_evaluate_through_a_url(stores, tmp_path, kind):
    """4 steps with checkpoints at 2 and 4; checkpoint 4 removed, the same command resumes
    from 2 and logs exactly the first run's records; evaluate reads the checkpoint by URL."""
    from rskd_jax import evaluate, train

    out = str(tmp_path / "run") if kind == "path" else f"file://{tmp_path}/run"
    args = overrides(stores, out, "train.steps=4", "train.checkpoint_every=2", "train.export_hf=false")
    cfg = load_config(TrainRun, os.path.join(ROOT, "configs/tiny/train.yaml"), args)
    first = train.run(cfg)
    assert first["checkpoint_step"] == 4 and first["start_step"] == 0
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    local = tmp_path / "run"
    assert (local / "config.yaml").is_file() and any((local / "tb").iterdir())
    assert sorted(p.name for p in (local / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]

    shutil.rmtree(local / "checkpoints" / "4")
    again = train.run(cfg)
    assert again["start_step"] == 2 and again["end_step"] == 4
    same = lambda recs: [(r["step"], r.get("loss"), r.get("val_loss")) for r in recs]
    assert same(_records(out)) == same(records)  # cut back to step 2, then the same records
    ev = load_config(
        EvaluateRun,
        os.path.join(ROOT, "configs/tiny/train.yaml"),
        [*args, f"evaluate.checkpoint={out}", f"evaluate.tokens={stores[0]}", "evaluate.max_batches=1"],
    )
    res = evaluate.run(ev)
    assert res["step"] == 4 and np.isfinite(res["val_loss"])


def test_staged_metrics_log_uploads_at_sync_and_close_and_resumes(tmp_path):
    """The object-store branch (stage=True), on a local directory: records and TensorBoard
    events are written locally and reach the run directory at sync / close; a reopen cuts
    metrics.jsonl back to the resume step."""
    from rskd_jax.train import MetricsLog

    out = f"file://{tmp_path}/run"
    log = MetricsLog(out, 0, stage=True)
    for step in (1, 2):
        log.write({"step": step, "loss": float(step)})
    assert read_text(tmp_path / "run" / "metrics.jsonl") is None  # staged, not yet uploaded
    log.sync()
    assert [json.loads(x)["step"] for x in read_text(tmp_path / "run" / "metrics.jsonl").splitlines()] == [1, 2]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "run" / "tb").iterdir())
    log.write({"step": 3, "loss": 3.0})
    stage = log.stage_dir
    log.close()
    assert not os.path.exists(stage)
    assert len(read_text(tmp_path / "run" / "metrics.jsonl").splitlines()) == 3
    log = MetricsLog(out, 2, stage=True)  # resumed at step 2
    log.write({"step": 3, "loss": 30.0})
    log.close()
    lines = [json.loads(x) for x in read_text(tmp_path / "run" / "metrics.jsonl").splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_every_process_holds_the_same_data_iterator_state(stores):
    """The checkpoint keeps process 0's grain state (orbax writes JSON items from one
    process): the processes' iterators are at the same state after the same steps."""
    from rskd_jax.store.tokens import open_token_store
    from rskd_jax.train_data import Rows, make_batch_iterator

    src = Rows(open_token_store(stores[0]), "train")
    its = [make_batch_iterator(src, global_batch_size=8, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    for it in its:
        for _ in range(5):
            next(it)
    assert its[0].get_state() == its[1].get_state()


SAME_START = """
import sys
from rskd_jax.config import DistributedConfig
from rskd_jax.sharding import initialize_distributed
from rskd_jax.train import TrainError, check_same_start
port, pid, starts = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
initialize_distributed(DistributedConfig(True, f"127.0.0.1:{port}", 2, pid))
check_same_start(starts[0], "OUT")  # same step everywhere: passes
try:
    check_same_start(starts[pid], "OUT")
except TrainError as err:
    print("refused:", err)
"""


@pytest.mark.slow
def test_processes_that_see_different_run_directories_are_refused(tmp_path):
    """Two processes (jax.distributed on CPU): the same latest step passes; different ones
    (each process its own, unshared directory) are refused on every process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAME_START, str(port), str(pid), "4,0"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-2000:]
        assert "refused: the processes found different latest checkpoints" in stdout and "[4, 0]" in stdout
