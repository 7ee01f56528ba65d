"""`python -m rskd_jax.train`: train a student from a token store and a teacher store.

    python -m rskd_jax.train --config configs/tiny/train.yaml [key=value ...]

The run directory (`train.output`: a local path or a gs://, s3:// or file:// URL, every file
through rskd_jax.runpath) holds config.yaml (the resolved config), checkpoints/
(orbax: train state + input-pipeline position), metrics.jsonl (one JSON object per logged
step: step, loss, ce, kd, z_loss, grad_norm, lr, tokens_per_s; eval records carry
"eval": true), tb/ (TensorBoard) and, at the end, hf/ (the student as an HF directory).

Resume: re-running the same command continues from the latest committed checkpoint, with
the data iterator where it was, after cutting metrics.jsonl (and TensorBoard) back to that
step, so a run killed at any moment logs exactly the losses of an uninterrupted one.

Several processes (multi-host): all of them open the same run directory, restore the same
latest checkpoint (checked: `check_same_start`) and each writes its own shards of every
checkpoint; only process 0 writes config.yaml, metrics.jsonl, TensorBoard and hf/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rskd_jax.config import TrainRun, config_to_dict, parse_cli
from rskd_jax.configlib import dump_config, load_config_dict
from rskd_jax.runpath import is_local, read_text, run_path, upload_tree, write_text

log = logging.getLogger("rskd_jax.train")
# Resume keys: every config key is one (a resumed run must share it with the run it continues,
# since it shapes the trajectory: train.steps through the LR schedule, the optimizer, the loss,
# the batch, the data order and seeds, the stores, the student) except these, which only change
# logging, checkpoint cadence, output or placement. mesh/distributed: a resume may reshard the
# state onto another slice; the losses then agree up to float rounding, not bit for bit.
SAFE_TO_CHANGE = (
    "train.output",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.async_checkpoints",
    "train.export_hf",
    "train.progress",
    "mesh",
    "distributed",
)
ONLINE_TEACHER = "teacher"  # a resume key only when loss.method is full_online (else unused)


class TrainError(ValueError):
    """A train config that cannot run, with what to change."""


class MetricsLog:
    """metrics.jsonl + TensorBoard on process 0, cut back to `resume_step` on open.

    A local run directory is written in place (each record appended and flushed). An object
    store cannot append, and tensorboardX writes only local files here: with `stage` (default:
    a remote `output`) both are written to a local temporary directory and `sync` uploads
    metrics.jsonl whole and the event files under tb/ (the run calls it before every
    checkpoint and at close, so a resume, which cuts back to its checkpoint, loses nothing).
    """

    def __init__(self, output: str, resume_step: int, enabled: bool = True, stage: bool | None = None):
        self.enabled = enabled
        self.out = run_path(output)
        self.path = os.fspath(self.out / "metrics.jsonl")
        self.stage = (not is_local(output)) if stage is None else stage
        self.tb = None
        if not enabled:
            return
        truncate_jsonl(self.path, resume_step)
        local = self.path
        if self.stage:
            self.stage_dir = tempfile.mkdtemp(prefix="rskd-run-")
            local = os.path.join(self.stage_dir, "metrics.jsonl")
            with open(local, "w", encoding="utf-8") as f:
                f.write(read_text(self.path) or "")
        self.file = open(local, "a", encoding="utf-8")
        tb_dir = os.path.join(self.stage_dir, "tb") if self.stage else os.fspath(self.out / "tb")
        self.tb = _summary_writer(tb_dir, purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # a SIGKILL loses nothing flushed; a checkpoint follows its records
        if self.tb is not None:
            group = "eval" if record.get("eval") else "train"
            for k, v in record.items():
                if k not in ("step", "eval") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{group}/{k}", v, record["step"])

    def sync(self) -> None:
        """Uploads the staged metrics.jsonl and TensorBoard events (no-op when not staged)."""
        if self.enabled and self.stage:
            self.file.flush()
            self.tb.flush()
            self._upload()

    def _upload(self) -> None:
        with open(self.file.name, encoding="utf-8") as f:
            write_text(self.path, f.read())
        upload_tree(os.path.join(self.stage_dir, "tb"), self.out / "tb")

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
            if self.stage:
                self._upload()
                shutil.rmtree(self.stage_dir, ignore_errors=True)


def _summary_writer(logdir: str, purge_step: int):
    """tensorboardX's SummaryWriter; `purge_step` drops events of steps >= it (a resume)."""
    # PERF: tensorboardX imports torch when it is installed (3 s here), only to accept torch
    # tensors, which we never pass: hide torch during the import unless it is already loaded.
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            sys.modules.pop("torch", None)
    return SummaryWriter(logdir, purge_step=purge_step)


def truncate_jsonl(path: str, step: int) -> None:
    """Keeps the complete records with record["step"] <= step (drops a torn last line)."""
    text = read_text(path)
    if text is None:
        return
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n") and record.get("step", math.inf) <= step:
            kept.append(line)
    write_text(path, "".join(kept))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resume_diff(old: TrainRun, new: TrainRun) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every resume key on which two run configs differ."""
    a, b = _flatten(config_to_dict(old)), _flatten(config_to_dict(new))
    safe = SAFE_TO_CHANGE + (() if new.loss.method == "full_online" else (ONLINE_TEACHER,))
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not any(k == s or k.startswith(s + ".") for s in safe)
    }


def check_resume_config(cfg: TrainRun, output: str) -> None:
    """Refuses to continue a run whose saved config differs in a resume key (naming each key
    with its old and new value); keys in SAFE_TO_CHANGE may differ."""
    import yaml

    text = read_text(run_path(output) / "config.yaml")
    if text is None:
        return
    diff = resume_diff(load_config_dict(TrainRun, yaml.safe_load(text) or {}), cfg)
    if diff:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise TrainError(
            f"{output} holds a run this config would change: {lines}. These settings shape the "
            "trajectory (e.g. train.steps sets the cosine schedule), so resuming would not be the run "
            "that was started. Restore the original values, or use another train.output to start a "
            f"new run. Safe to change on resume: {', '.join(SAFE_TO_CHANGE)}."
        )


def check_same_start(start: int, output: str) -> None:
    """Every process must resume from the same checkpoint: refuses (on every process alike)
    when they found different latest steps, i.e. do not share the run directory."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    starts = np.asarray(multihost_utils.process_allgather(np.int64(start))).reshape(-1)
    if (starts != starts[0]).any():
        raise TrainError(
            f"the processes found different latest checkpoints in train.output={output} (per process: "
            f"{starts.tolist()}): every process must see the same run directory. Use a shared file "
            "system or an object-store URL (gs://..., s3://...)."
        )


def _to_float(metrics_: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics_).items()}


def run(cfg: TrainRun) -> dict[str, Any]:
    """Trains (or resumes) the run `cfg` describes; returns a summary dict."""
    from tqdm import tqdm

    from rskd_jax import evaluate, optim, sharding
    from rskd_jax import train_step as ts
    from rskd_jax.checkpoint import Checkpointer
    from rskd_jax.model_spec import build_model
    from rskd_jax.store.teacher import open_teacher_store
    from rskd_jax.store.tokens import open_token_store
    from rskd_jax.train_data import (
        epoch_rows,
        eval_batch_iterator,
        host_batch,
        make_batch_iterator,
        run_rows,
        tokenizer_vocab,
    )

    t, lc, oc = cfg.train, cfg.loss, cfg.optim
    started = time.perf_counter()
    mesh = sharding.make_mesh(cfg.mesh)
    ts.check_step_batch(t.batch_size, t.grad_accum, mesh)
    main = jax.process_index() == 0

    # ---- stores, checked against each other and the student
    tokens = open_token_store(t.tokens)
    vocab = tokenizer_vocab(tokens)
    store = open_teacher_store(t.teacher_store) if t.teacher_store else None
    more = [open_teacher_store(url) for url in t.epoch_stores]  # fresh targets per epoch
    student = build_model(cfg.student, vocab)
    rows = run_rows(
        tokens,
        store,
        method=lc.method,
        student_vocab=student.config.vocab_size,
        document_masking=cfg.context.document_masking,
    )

    # ---- model, optimizer, sharded state
    graphdef, params = ts.split_model(student)
    schedule = optim.lr_schedule(oc.learning_rate, oc.warmup_steps, t.steps, oc.end_lr_ratio)
    tx = optim.make_optimizer(
        schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay, clip_norm=oc.clip_norm
    )
    param_sh = ts.model_shardings(student, mesh)
    state_sh = optim.state_shardings(params, param_sh, tx, mesh)
    teacher_graphdef = teacher_params = teacher_sh = None
    if lc.method == "full_online":
        teacher = build_model(cfg.teacher, vocab, mesh)
        teacher_graphdef, teacher_params = ts.split_model(teacher)
        teacher_sh = ts.model_shardings(teacher, mesh)
        teacher_params = jax.device_put(teacher_params, teacher_sh)
    spec = ts.LossSpec(lc.method, lc.alpha, lc.kd_temperature, lc.z_loss, vocab, lc.chunk_size)
    step_fn = ts.make_train_step(
        graphdef, tx, schedule, spec, micro_batches=t.grad_accum, teacher_graphdef=teacher_graphdef, mesh=mesh
    )
    eval_fn = evaluate.jit_eval_fn(
        evaluate.make_eval_fn(graphdef, vocab_size=vocab, teacher_graphdef=teacher_graphdef, chunk_size=lc.chunk_size),
        param_sh,
        mesh,
        teacher_sh,
    )

    # ---- run directory: config, checkpoints, iterator, metrics (resumed if present)
    out = run_path(t.output)
    out.mkdir(parents=True, exist_ok=True)
    check_resume_config(cfg, t.output)
    ckpt = Checkpointer(os.fspath(out / "checkpoints"), keep=t.keep_checkpoints, async_save=t.async_checkpoints)
    train_sources = [
        rows.train,
        *epoch_rows(tokens, store, more, fields=rows.fields, document_masking=cfg.context.document_masking),
    ]
    it = make_batch_iterator(
        train_sources,
        global_batch_size=t.batch_size,
        seed=t.seed,
        shuffle=True,
        num_epochs=None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    start = ckpt.latest_step() or 0
    check_same_start(start, t.output)
    if start:
        state, data_state = ckpt.restore(start, optim.abstract_state(params, tx, state_sh))
        it.set_state(data_state)
    else:
        state = optim.create_state(params, tx, t.seed, state_sh)
    del params, student
    if main:
        write_text(out / "config.yaml", dump_config(cfg))
    logs = MetricsLog(t.output, start, enabled=main)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info(
        "%s: %s steps %d -> %d, %.2fM params, loss %s, mesh %s, batch %d x %d tokens",
        t.output,
        "resuming" if start else "training",
        start,
        t.steps,
        n_params / 1e6,
        lc.method,
        dict(mesh.shape),
        t.batch_size,
        tokens.seq_len,
    )

    def run_eval(step: int) -> dict[str, float]:
        if rows.val is None:
            return {}
        val = eval_batch_iterator(rows.val, global_batch_size=t.batch_size)
        out = evaluate.evaluate_batches(
            eval_fn,
            state.params,
            (host_batch(b, rows.eval_fields) for b in val),
            mesh,
            teacher_params=teacher_params,
            max_batches=t.eval_batches,
        )
        logs.write({"step": step, "eval": True, **out})
        return out

    # ---- the loop
    tokens_per_step = t.batch_size * tokens.seq_len
    pending: list = []  # (step, device metrics, dispatch time): fetched one step late
    clock = {"step": start, "time": time.perf_counter()}
    last: dict[str, float] = {}

    def flush(upto: int) -> None:
        while pending and pending[0][0] <= upto:
            step, m, when = pending.pop(0)
            rec = {"step": step, **_to_float(m)}
            rec["tokens_per_s"] = (step - clock["step"]) * tokens_per_step / max(when - clock["time"], 1e-9)
            clock.update(step=step, time=when)
            logs.write(rec)
            last.update(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")

    bar = tqdm(total=t.steps, initial=start, disable=not (t.progress and main), unit="step", dynamic_ncols=True)
    jitted = None
    step, evaluation = start, {}
    try:
        for step in range(start + 1, t.steps + 1):
            batch = sharding.global_batch(host_batch(next(it), rows.fields), mesh)
            if jitted is None:
                jitted = ts.jit_step(step_fn, state_sh, ts.batch_shardings(batch, mesh), mesh, teacher_sh)
            state, m = jitted(state, batch, teacher_params)
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                pending.append((step, m, time.perf_counter()))
            is_eval = (t.eval_every and step % t.eval_every == 0) or step == t.steps
            is_ckpt = step % t.checkpoint_every == 0 or is_eval
            if is_ckpt:
                flush(step)  # records up to a checkpoint's step are written before it is
            else:
                flush(step - 1)
            evaluation = run_eval(step) if is_eval else {}
            if is_ckpt:
                metric = {"val_loss": evaluation["val_loss"]} if "val_loss" in evaluation else None
                logs.sync()  # staged metrics reach the run directory before the checkpoint
                ckpt.save(step, state, it.get_state(), metrics=metric)
    except BaseException:
        # a corrupt batch, an interrupt: the checkpoints already started are committed (the
        # batch that failed was never trained on), then the error goes to the caller
        bar.close()
        ckpt.close()
        logs.close()
        raise
    flush(step)
    bar.close()
    hf_dir = None
    ckpt.wait()
    if t.export_hf:
        hf_dir = export_hf(graphdef, state.params, os.fspath(out / "hf"), main)
    best, latest = ckpt.best_step(), ckpt.latest_step()
    ckpt.close()
    logs.close()
    return {
        "output": t.output,
        "steps": t.steps,
        "start_step": start,
        "end_step": int(step),
        "loss": last.get("loss"),
        "eval": evaluation,
        "checkpoint_step": latest,
        "best_step": best,
        "hf": hf_dir,
        "seconds": round(time.perf_counter() - started, 3),
    }


def export_hf(graphdef, params, out_dir: str, main: bool) -> str:
    """Writes the student as an HF directory (config.json + safetensors) from process 0; to a
    remote `out_dir` through a local temporary directory."""
    from flax import nnx
    from jax.experimental import multihost_utils

    from rskd_jax.models import save_pretrained

    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if main:
        host = jax.device_get(params)  # float32 master weights -> the model's param dtype
        dtype = jnp.dtype(nnx.merge(graphdef, host).config.param_dtype)
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), host))
        if not is_local(out_dir):
            with tempfile.TemporaryDirectory(prefix="rskd-hf-") as tmp:
                save_pretrained(model, tmp)
                upload_tree(tmp, out_dir, replace=True)
            return out_dir
        out_dir = os.fspath(run_path(out_dir))
        # written beside, then renamed into place: a crash mid-export never leaves a partial hf/
        tmp = out_dir.rstrip("/") + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    from rskd_jax.checkpoint import CheckpointError
    from rskd_jax.config import ConfigError
    from rskd_jax.sharding import ShardingError
    from rskd_jax.store.common import StoreError

    cfg = parse_cli(TrainRun, argv, prog="python -m rskd_jax.train")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax: "no metrics" per plain save
    if cfg.distributed.enabled:
        from rskd_jax.sharding import initialize_distributed

        initialize_distributed(cfg.distributed)
    try:
        summary = run(cfg)
    except (TrainError, StoreError, ConfigError, ShardingError, CheckpointError) as err:
        # a corrupt store chunk, a changed resume key, mismatched stores: the message says what
        # to do; nothing of the failing batch was trained on, the last checkpoint is intact
        print(f"python -m rskd_jax.train: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if jax.process_index() == 0:
        print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
