"""The train and evaluate programs end to end on tiny stores built through the store APIs:
SIGKILL mid-run + resume == an uninterrupted run, HF export parity, refusals."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tiny_stores import tokenizer, unique_counts

from rskd_jax.config import ConfigError, TrainRun, load_config, parse_cli, save_config
from rskd_jax.store.common import StoreError
from rskd_jax.store.teacher import create_teacher_store
from rskd_jax.store.tokens import write_token_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, L, K = 60, 32, 8
TOKENIZER = tokenizer(VOCAB)


def make_tokens(url, seed=0, rows=(64, 16), seq_len=L):
    rng = np.random.default_rng(seed)
    splits = {
        "train": rng.integers(0, VOCAB, (rows[0], seq_len)).astype(np.int32),
        "val": rng.integers(0, VOCAB, (rows[1], seq_len)).astype(np.int32),
    }
    return splits, write_token_store(url, splits, {"tokenizer": TOKENIZER})


def make_teacher(url, splits, token_manifest, seed=0, done_rows=None, **facts):
    """A `sample` store (N = K draws) from random teacher distributions, with entropies;
    `facts` go into its manifest (e.g. document_masking=True)."""
    rng = np.random.default_rng(seed)
    seq_len = token_manifest["seq_len"]
    manifest = {
        "tokens": {"fingerprint": token_manifest["content_hash"], "seq_len": seq_len},
        "tokenizer": TOKENIZER,
        "teacher": {"fingerprint": "test", "vocab_size": VOCAB},
        **facts,
    }
    store = create_teacher_store(
        url,
        manifest=manifest,
        num_rows={s: len(a) for s, a in splits.items()},
        seq_len=seq_len,
        method="sample",
        k=K,
        vocab_size=VOCAB,
        chunk_rows=8,
    )
    for split, toks in splits.items():
        s = done_rows or len(toks)
        logits = rng.normal(size=(s, seq_len, VOCAB)) * 2.0
        t = np.exp(logits - logits.max(-1, keepdims=True))
        t /= t.sum(-1, keepdims=True)
        cdf = np.cumsum(t, -1)
        draws = np.minimum((cdf[..., None, :] < rng.random((s, seq_len, K, 1))).sum(-1), VOCAB - 1)
        ids, counts = unique_counts(draws)
        store.write_rows(
            split,
            0,
            {
                "ids": ids,
                "counts": counts,
                "entropy": -(t * np.log(t)).sum(-1),
                "gold_logprob": np.log(np.take_along_axis(t, np.roll(toks[:s], -1, 1)[..., None], -1)[..., 0]),
            },
        ).result()
    store.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    splits, manifest = make_tokens(str(root / "tokens"))
    make_teacher(str(root / "teacher"), splits, manifest)
    return str(root / "tokens"), str(root / "teacher")


def overrides(stores, output, *extra):
    return [
        f"train.tokens={stores[0]}",
        f"train.teacher_store={stores[1]}",
        f"train.output={output}",
        "student.hidden_size=32",
        "student.intermediate_size=64",
        "student.vocab_size=64",
        "loss.chunk_size=8",
        "train.progress=false",
        *extra,
    ]


def _cli(module, args, cache_dir):
    """The program as a subprocess; runs share a persistent compilation cache (test speed)."""
    cmd = [sys.executable, "-m", module, "--config", os.path.join(ROOT, "configs/tiny/train.yaml"), *args]
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("kl_to_teacher")) for r in map(json.loads, f)]


def _finish(proc):
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kill_resume_export_and_evaluate(stores, tmp_path):
    cache = tmp_path / "jax_cache"
    run_args = ["train.steps=10", "train.checkpoint_every=2", "train.eval_every=5", "loss.alpha=0.25"]
    out = str(tmp_path / "run")
    metrics = os.path.join(out, "metrics.jsonl")
    # 1. SIGKILL at two points: as soon as the run directory has its config (before any
    #    checkpoint), then, re-run, in the middle (after >= 5 logged steps)
    kill_points = (
        lambda: os.path.exists(os.path.join(out, "config.yaml")),
        lambda: os.path.exists(metrics) and sum('"loss"' in x for x in open(metrics)) >= 5,
    )
    for reached in kill_points:
        proc = _cli("rskd_jax.train", overrides(stores, out, *run_args), cache)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not reached():
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # 2. the same command again resumes from the last committed checkpoint and finishes
    summary = _finish(_cli("rskd_jax.train", overrides(stores, out, *run_args), cache))
    assert 0 < summary["start_step"] < 10 and summary["end_step"] == 10
    # 3. an uninterrupted run logs exactly the same losses
    ref = str(tmp_path / "ref")
    _finish(_cli("rskd_jax.train", overrides(stores, ref, *run_args), cache))
    got, want = _records(metrics), _records(os.path.join(ref, "metrics.jsonl"))
    assert got == want
    assert [s for s, *_ in got if _[1] is not None] == [5, 10]  # two eval records
    assert os.path.exists(os.path.join(out, "config.yaml")) and os.listdir(os.path.join(out, "tb"))

    # 4. evaluate the run: one JSON object, the same val_loss as the run's final eval
    ev = _finish(
        _cli(
            "rskd_jax.evaluate",
            overrides(stores, out)
            + [f"evaluate.checkpoint={out}", f"evaluate.tokens={stores[0]}", f"evaluate.teacher={stores[1]}"],
            cache,
        )
    )
    assert ev["step"] == 10 and {"val_loss", "perplexity", "ece", "kl_to_teacher", "top1_agreement"} <= set(ev)
    assert ev["val_loss"] == pytest.approx(got[-1][2], rel=1e-6)
    assert ev["kl_to_teacher"] == pytest.approx(got[-1][3], rel=1e-5)

    # 5. the exported HF directory gives transformers the trained student's logits
    _check_hf_export(out)


def _check_hf_export(out):
    import jax
    import torch
    from flax import nnx
    from transformers import LlamaForCausalLM

    from rskd_jax import evaluate, sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
    graphdef, params, info = evaluate.load_student(out, VOCAB, mesh)
    assert info["step"] == 10
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, L))
    ours = np.asarray(nnx.merge(graphdef, params)(tokens))
    hf = LlamaForCausalLM.from_pretrained(os.path.join(out, "hf"), torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)


def test_unknown_and_bad_keys_are_refused(capsys):
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        load_config(TrainRun, None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="loss.method"):
        load_config(TrainRun, None, ["loss.method=topk"])
    with pytest.raises(SystemExit) as err:
        parse_cli(TrainRun, ["--config", os.path.join(ROOT, "configs/tiny/train.yaml"), "optim.lr=1"])
    assert err.value.code == 2 and "unknown key 'optim.lr'" in capsys.readouterr().err


def _run_expect(stores, tmp_path, error, match, *extra):
    from rskd_jax import train

    cfg = load_config(
        TrainRun,
        os.path.join(ROOT, "configs/tiny/train.yaml"),
        overrides(stores, str(tmp_path / "never"), "train.steps=1", *extra),
    )
    with pytest.raises(error, match=match):
        train.run(cfg)


def test_mismatched_stores_are_refused(stores, tmp_path):
    other = str(tmp_path / "other_tokens")
    _, manifest = make_tokens(other, seed=1)
    _run_expect(
        (other, stores[1]),
        tmp_path,
        StoreError,
        f"token-store fingerprint '[0-9a-f]+'.*has '{manifest['content_hash']}'",
    )
    _run_expect(stores, tmp_path, ConfigError, "vocab_size 50.*60", "student.vocab_size=50")
    _run_expect(stores, tmp_path, StoreError, "cannot train from a 'sample'", "loss.method=full_cached")
    _run_expect((stores[0], None), tmp_path, ValueError, "set train.teacher_store", "train.teacher_store=null")


def test_corrupt_or_unfinished_store_is_refused(stores, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(stores[1], broken)
    with open(os.path.join(broken, "manifest.json"), "w") as f:
        f.write('{"kind": "teach')
    _run_expect((stores[0], broken), tmp_path, StoreError, "not valid JSON")
    shutil.rmtree(broken)
    shutil.copytree(stores[1], broken)
    shutil.rmtree(os.path.join(broken, "train", "ids"))
    _run_expect((stores[0], broken), tmp_path, StoreError, "train/ids")
    partial = str(tmp_path / "partial")
    splits, manifest = make_tokens(str(tmp_path / "tok"))
    make_teacher(partial, splits, manifest, done_rows=8)
    _run_expect((str(tmp_path / "tok"), partial), tmp_path, StoreError, "only 8 of 64 train rows")


def test_checkpointer_keeps_latest_and_best_and_restores_shardings(tmp_path):
    import jax
    import jax.numpy as jnp

    from rskd_jax import checkpoint, optim, sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    sh = {
        "w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor")),
        "norm": sharding.replicated(mesh),
    }
    params = jax.device_put({"w": jnp.arange(32.0).reshape(4, 8), "norm": jnp.ones(8)}, sh)
    tx = optim.make_optimizer(optim.lr_schedule(1e-3, 0, 10))
    state_sh = optim.state_shardings(params, sh, tx, mesh)
    state = optim.create_state(params, tx, 0, state_sh)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=2)
    val = {2: 5.0, 4: 1.0, 6: 3.0}  # steps saved with a val_loss; 4 is the best
    for step in range(1, 9):
        metrics = {"val_loss": val[step]} if step in val else None
        ckpt.save(step, state._replace(step=jnp.asarray(step, jnp.int32)), {"pos": step}, metrics)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 7, 8] and ckpt.best_step() == 4
    ckpt.close()
    again = checkpoint.Checkpointer(str(tmp_path / "ck"), keep=2)
    restored, data = again.restore(4, optim.abstract_state(params, tx, state_sh))
    assert data == {"pos": 4} and int(restored.step) == 4
    assert restored.params["w"].sharding == sh["w"]
    mu = restored.opt_state[1][0].mu["w"]  # clip, then adamw's scale_by_adam state
    assert mu.sharding == sh["w"]
    np.testing.assert_array_equal(restored.params["w"], params["w"])
    only = again.restore_params(8, optim.abstract_state(params, tx, state_sh).params)
    assert only["w"].sharding == sh["w"]
    again.close()


def test_truncate_jsonl_drops_later_and_torn_records(tmp_path):
    from rskd_jax.train import truncate_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "eval": true}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    truncate_jsonl(str(path), 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "eval": true}\n'


def test_resume_with_a_different_run_config_is_refused(tmp_path):
    from rskd_jax.train import TrainError, check_resume_config

    tiny = os.path.join(ROOT, "configs/tiny/train.yaml")
    cfg = load_config(TrainRun, tiny)
    save_config(cfg, str(tmp_path))
    # logging / checkpoint cadence / placement may change
    check_resume_config(
        load_config(
            TrainRun,
            tiny,
            [
                "train.eval_every=3",
                "train.log_every=7",
                "train.checkpoint_every=5",
                "mesh.data=2",
                "teacher.hidden_size=8",
            ],
        ),
        str(tmp_path),
    )
    steps = cfg.train.steps
    for change, shown in (
        (f"train.steps={steps + 99}", f"train.steps: {steps} -> {steps + 99}"),
        ("loss.alpha=0.5", "loss.alpha: 0.0 -> 0.5"),
        ("optim.b2=0.99", "optim.b2: 0.95 -> 0.99"),
        ("optim.warmup_steps=3", "optim.warmup_steps"),
        ("train.seed=5", "train.seed: 0 -> 5"),
        ("student.num_layers=3", "student.num_layers"),
    ):
        with pytest.raises(TrainError, match=re.escape(shown) + ".*another train.output"):
            check_resume_config(load_config(TrainRun, tiny, [change]), str(tmp_path))
    online = load_config(TrainRun, tiny, ["loss.method=full_online"])
    save_config(online, str(tmp_path))
    with pytest.raises(TrainError, match="teacher.hidden_size"):
        check_resume_config(
            load_config(TrainRun, tiny, ["loss.method=full_online", "teacher.hidden_size=8"]), str(tmp_path)
        )


def test_train_refuses_a_changed_step_count_from_the_command_line(stores, tmp_path, capsys):
    """The message a user sees when resuming with another train.steps (exit 1, no traceback).
    The run directory is what a started run leaves for the check: its saved config (the
    2-step training itself would add nothing the check reads; see test_kill_resume_...)."""
    from rskd_jax import train

    out = str(tmp_path / "run")
    first = load_config(
        TrainRun,
        os.path.join(ROOT, "configs/tiny/train.yaml"),
        overrides(stores, out, "train.steps=2", "train.export_hf=false"),
    )
    save_config(first, out)
    with pytest.raises(SystemExit) as exc:
        train.main(
            [
                "--config",
                os.path.join(ROOT, "configs/tiny/train.yaml"),
                *overrides(stores, out, "train.steps=4", "train.export_hf=false"),
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "train.steps: 2 -> 4" in err and "Traceback" not in err
    print(err)


def test_batches_whose_tokens_changed_after_caching_are_refused(tmp_path):
    """A teacher store with per-row token hashes catches a token store edited in place (same
    manifest fingerprint, different tokens): the trainer names the row."""
    from rskd_jax.store.common import open_array
    from rskd_jax.store.teacher import open_teacher_store, token_hash
    from rskd_jax.store.tokens import open_token_store
    from rskd_jax.train_data import DataMismatch, Rows

    splits, manifest = make_tokens(str(tmp_path / "tok"), rows=(16, 8))
    meta = {
        "tokens": {"fingerprint": manifest["content_hash"], "seq_len": L},
        "tokenizer": TOKENIZER,
        "teacher": {"fingerprint": "test", "vocab_size": VOCAB},
    }
    store = create_teacher_store(
        str(tmp_path / "teacher"),
        manifest=meta,
        num_rows={"train": 16},
        seq_len=L,
        method="top_k",
        k=2,
        vocab_size=VOCAB,
        chunk_rows=8,
        diagnostics=False,
        token_hash=True,
    )
    ids = np.tile(np.array([3, 5], np.int32), (16, L, 1))
    store.write_rows(
        "train", 0, {"ids": ids, "weights": np.full((16, L, 2), 0.5, np.float32), "tokens": splits["train"]}
    ).result()
    store.close()
    tokens, teacher = open_token_store(str(tmp_path / "tok")), open_teacher_store(str(tmp_path / "teacher"))
    rows = Rows(tokens, "train", teacher, ("ids", "weights"))
    np.testing.assert_array_equal(rows.read(np.arange(16))["ids"], ids)  # untouched: accepted
    assert (teacher.read_rows("train", np.arange(16))["token_hash"] == token_hash(splits["train"])).all()
    edited = splits["train"][5].copy()
    edited[7] = (edited[7] + 1) % VOCAB
    open_array(str(tmp_path / "tok"), "train/tokens", write=True)[5].write(edited).result()
    rows = Rows(open_token_store(str(tmp_path / "tok")), "train", teacher, ("ids", "weights"))
    rows.read(np.array([0, 1]))  # other rows still pass
    with pytest.raises(DataMismatch, match="train row 5: its tokens differ"):
        rows.read(np.array([2, 5, 9]))


@pytest.mark.slow  # the train and evaluate programs end to end; test_integrity.py checks the store's refusal
def test_a_corrupt_chunk_stops_training_with_the_message(stores, tmp_path, capsys):
    """One flipped bit in the teacher store: the trainer exits 1 naming the store, array and
    row, and no step after the corrupt batch's is logged (it was never trained on)."""
    from rskd_jax import train

    bad = str(tmp_path / "teacher")
    shutil.copytree(stores[1], bad)
    chunk = os.path.join(bad, "train", "ids", "c", "2", "0")  # rows 16-23; byte 40: row 16's chunk
    data = bytearray(open(chunk, "rb").read())
    data[40] ^= 4
    open(chunk, "wb").write(bytes(data))
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        train.main(
            [
                "--config",
                os.path.join(ROOT, "configs/tiny/train.yaml"),
                *overrides(
                    (stores[0], bad),
                    out,
                    "train.steps=12",
                    "train.batch_size=8",
                    "train.export_hf=false",
                    "train.checkpoint_every=1",
                ),
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert "is corrupt or truncated: train/ids rows [16]" in err, err[-2000:]
    steps = [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))]
    assert len(steps) < 8  # an epoch is 8 steps: the step with row 16 never ran
    # the evaluator, given the corrupt store as its KL reference on the train split, stops too
    from rskd_jax import evaluate

    with pytest.raises(SystemExit) as exc:
        evaluate.main(
            [
                "--config",
                os.path.join(ROOT, "configs/tiny/train.yaml"),
                *overrides(
                    (stores[0], bad),
                    out,
                    f"evaluate.checkpoint={out}",
                    "evaluate.split=train",
                    f"evaluate.tokens={stores[0]}",
                    f"evaluate.teacher={bad}",
                ),
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "train/ids rows [16]" in err and "Traceback" not in err, err[-2000:]


# ----------------------------------------------------------------------------- fresh targets per epoch


@pytest.fixture(scope="module")
def epoch_stores(tmp_path_factory):
    """A token store and three `sample` stores of it: a (stream 0), b (another stream: other
    draws) and c (another num_draws: another kind of targets)."""
    root = tmp_path_factory.mktemp("epochs")
    splits, manifest = make_tokens(str(root / "tokens"))
    make_teacher(str(root / "a"), splits, manifest, seed=0, params={"num_draws": K})
    make_teacher(str(root / "b"), splits, manifest, seed=1, params={"num_draws": K, "stream": 1})
    make_teacher(str(root / "c"), splits, manifest, seed=2, params={"num_draws": 4})
    return {k: str(root / k) for k in ("tokens", "a", "b", "c")}


def test_epoch_stores_feed_their_epochs_and_resume_exactly(epoch_stores, caplog):
    from rskd_jax.store.teacher import open_teacher_store
    from rskd_jax.store.tokens import open_token_store
    from rskd_jax.train_data import DataMismatch, epoch_rows, make_batch_iterator, run_rows

    tokens = open_token_store(epoch_stores["tokens"])
    a, b, c = (open_teacher_store(epoch_stores[k]) for k in "abc")
    rows = run_rows(tokens, a, method="sparse", student_vocab=VOCAB)
    sources = [rows.train, *epoch_rows(tokens, a, [b], fields=rows.fields)]
    make = lambda: make_batch_iterator(sources, global_batch_size=16, seed=3)  # 4 batches per epoch
    reference = [batch for batch, _ in zip(make(), range(12))]
    for i, batch in enumerate(reference):  # epochs 0, 1, 2 read a, b, a
        mine, other = sources[(i // 4) % 2], sources[1 - (i // 4) % 2]
        assert np.array_equal(batch["ids"], mine.read(batch["index"])["ids"]), i
        assert not np.array_equal(batch["ids"], other.read(batch["index"])["ids"]), i
    for k in (3, 4, 6):  # 4 = the first batch of epoch 1
        it = make()
        for _ in range(k):
            next(it)
        resumed = make()
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        for want in reference[k:]:
            got = next(resumed)
            assert np.array_equal(got["index"], want["index"]) and np.array_equal(got["ids"], want["ids"])
    with pytest.raises(DataMismatch, match=r"epoch store .*/c.* differs from train.teacher_store .*/a.* in params"):
        epoch_rows(tokens, a, [c], fields=rows.fields)
    with caplog.at_level("WARNING", logger="rskd_jax"):
        epoch_rows(tokens, a, [a], fields=rows.fields)
    assert "the same draws, not fresh ones" in caplog.text


@pytest.mark.slow  # two train runs; test-fast keeps the epoch_rows checks
def test_train_with_epoch_stores_crosses_the_epoch_boundary(epoch_stores, tmp_path):
    from rskd_jax import train

    stores = (epoch_stores["tokens"], epoch_stores["a"])
    out = tmp_path / "run"
    cfg = load_config(
        TrainRun,
        os.path.join(ROOT, "configs/tiny/train.yaml"),
        overrides(
            stores, str(out), "train.steps=10", f"train.epoch_stores=[{epoch_stores['b']}]", "train.export_hf=false"
        ),
    )  # 64 rows / batch 8: steps 9 and 10 train on b's draws
    train.run(cfg)
    assert [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if not r.get("eval")][-1] == 10
    bad = dataclasses_replace_train(cfg, output=str(tmp_path / "never"), epoch_stores=(epoch_stores["c"],))
    with pytest.raises(StoreError, match="differs from train.teacher_store"):
        train.run(bad)
    with pytest.raises(ConfigError, match="epoch_stores needs train.teacher_store"):
        load_config(TrainRun, None, [f"train.epoch_stores=[{epoch_stores['b']}]"])


def dataclasses_replace_train(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
