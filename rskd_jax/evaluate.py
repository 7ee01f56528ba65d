"""`python -m rskd_jax.evaluate`: val loss, perplexity, ECE, KL to the teacher, top-1 agreement.

    python -m rskd_jax.evaluate --config configs/tiny/train.yaml \\
        evaluate.checkpoint=runs/tiny/train evaluate.tokens=runs/tiny/tokens \\
        [evaluate.teacher=smollm2|PATH|TEACHER_STORE]

Prints ONE JSON object: val_loss, perplexity, accuracy, ece, tokens and, with a teacher,
kl_to_teacher and top1_agreement (estimated from a sparse store, see metrics). A teacher model (or
a `full` store) gives the exact KL; a sampled store gives the estimate
sum_k w_k (-log p_k) - H(t) from its stored entropy (unbiased for the sampled stores).
`evaluate.checkpoint` is a train run dir (its latest checkpoint), one checkpoint step dir, or
an HF directory (e.g. the run's exported `hf/`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from rskd_jax import metrics, sharding
from rskd_jax.config import EvaluateRun, TrainRun, parse_cli
from rskd_jax.train_step import fit_vocab, prepare_targets, sum_over_positions

log = logging.getLogger("rskd_jax.evaluate")


def make_eval_fn(
    graphdef, *, vocab_size: int | None, teacher_graphdef=None, chunk_size: int = 0, per_row: bool = False
) -> Callable:
    """`fn(params, teacher_params, batch) -> sums` (metrics.* sums; jit it).

    batch: tokens, mask, optionally segment_ids and positions (document masking: both models
    read them) and a teacher's ids/weights/entropy (estimated KL) or logprobs (exact KL); with
    teacher_graphdef the teacher model runs here (exact KL). per_row adds each row's nll sum
    and label count (metrics.lm_sums).
    """

    def position_sums(logits_xV, t, teacher_logits_xV):
        logits_xV = metrics.mask_vocab(logits_xV, vocab_size)
        out = metrics.lm_sums(logits_xV, t["labels"], t["ce_where"], per_row=per_row)
        if teacher_logits_xV is not None:
            teacher_xV = metrics.mask_vocab(fit_vocab(teacher_logits_xV, logits_xV.shape[-1]), vocab_size)
            out.update(metrics.teacher_sums(logits_xV, teacher_xV, t["kd_where"]))
        elif "entropy" in t and "ids" in t:
            out.update(metrics.sparse_teacher_sums(logits_xV, t["ids"], t["weights"], t["entropy"], t["kd_where"]))
        return out

    def fn(params, teacher_params, batch):
        t = prepare_targets(batch, "ce")
        t.update({k: batch[k] for k in ("ids", "weights", "entropy") if k in batch})
        if "logprobs" in batch:
            t["teacher_logits"] = batch["logprobs"]
        model = nnx.merge(graphdef, params)
        teacher = None if teacher_graphdef is None else nnx.merge(teacher_graphdef, teacher_params)
        return sum_over_positions(position_sums, model, teacher, t, chunk_size=chunk_size, remat=False)

    return fn


def jit_eval_fn(fn: Callable, param_shardings, mesh, teacher_shardings=None) -> Callable:
    """jit with the params' shardings; batches arrive split over the batch axes."""
    return jax.jit(fn, in_shardings=(param_shardings, teacher_shardings, None), out_shardings=sharding.replicated(mesh))


def evaluate_batches(
    eval_fn: Callable,
    params,
    batches: Iterable[dict[str, np.ndarray]],
    mesh,
    *,
    teacher_params=None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Accumulates eval_fn's sums over host batches (float64) and finalizes them."""
    total = None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        total = metrics.accumulate(total, eval_fn(params, teacher_params, sharding.global_batch(batch, mesh)))
    if total is None:
        raise ValueError("no evaluation batches: the split is empty")
    return metrics.finalize(total)


# ------------------------------------------------------------------------------ the program


def _is_teacher_store(path: str) -> bool:
    from rskd_jax.store.common import read_json

    try:
        return (read_json(path) or {}).get("kind") == "teacher"
    except Exception:
        return False


def load_student(path: str, vocab: int, mesh) -> tuple[Any, Any, dict]:
    """(graphdef, sharded params, info) of an HF dir or a train checkpoint (a local path or a
    gs://, s3:// or file:// URL; a remote HF dir is copied to a temporary directory first)."""
    import tempfile

    import yaml

    from rskd_jax import checkpoint, models
    from rskd_jax.configlib import load_config_dict
    from rskd_jax.model_spec import build_model
    from rskd_jax.runpath import download_tree, is_local, read_text, run_path
    from rskd_jax.train_step import model_shardings, split_model

    if (run_path(path) / "config.json").is_file():
        with tempfile.TemporaryDirectory(prefix="rskd-hf-") as tmp:
            local = os.fspath(run_path(path)) if is_local(path) else download_tree(path, tmp)
            model = models.from_pretrained(local)
        graphdef, params = split_model(model)
        return graphdef, jax.device_put(params, model_shardings(model, mesh)), {"hf": path}
    directory, step = checkpoint.find_checkpoint(path)
    run_cfg = run_path(directory).parent / "config.yaml"
    text = read_text(run_cfg)
    if text is None:
        raise checkpoint.CheckpointError(
            f"{run_cfg} not found: the student's architecture comes from the run's saved config"
        )
    student = load_config_dict(TrainRun, yaml.safe_load(text) or {}).student  # the run's own architecture
    ckpt = checkpoint.Checkpointer(directory, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise checkpoint.CheckpointError(f"no checkpoint in {directory}")
    abstract = jax.eval_shape(lambda: split_model(build_model(student, vocab)))
    graphdef, shapes = abstract
    model_sh = model_shardings(nnx.merge(graphdef, shapes), mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, model_sh)
    params = ckpt.restore_params(step, target)
    ckpt.close()
    return graphdef, params, {"checkpoint": directory, "step": int(step)}


def run(cfg: EvaluateRun) -> dict[str, Any]:
    """Evaluates a student; returns the JSON summary `main` prints."""
    from rskd_jax.model_spec import build_model
    from rskd_jax.store.teacher import open_teacher_store
    from rskd_jax.store.tokens import open_token_store
    from rskd_jax.train_data import (
        check_stores,
        eval_batch_iterator,
        host_batch,
        split_rows,
        teacher_fields,
        tokenizer_vocab,
    )
    from rskd_jax.train_step import model_shardings, split_model

    e = cfg.evaluate
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(e.batch_size, mesh, key="evaluate.batch_size")
    tokens = open_token_store(e.tokens or cfg.train.tokens)
    vocab = tokenizer_vocab(tokens)
    graphdef, params, info = load_student(e.checkpoint or cfg.train.output, vocab, mesh)
    store = open_teacher_store(e.teacher) if e.teacher and _is_teacher_store(e.teacher) else None
    masking = cfg.context.document_masking
    check_stores(tokens, store, student_vocab=params["embed"].shape[0], method=None, document_masking=masking)
    fields = teacher_fields(store)
    rows = split_rows(tokens, store, e.split, fields, documents=masking)
    teacher_graphdef = teacher_params = teacher_sh = None
    if e.teacher and store is None:
        spec = cfg.teacher if e.teacher == "random" else dataclasses.replace(cfg.teacher, source=e.teacher)
        teacher = build_model(spec, vocab, mesh)
        teacher_graphdef, teacher_params = split_model(teacher)
        teacher_sh = model_shardings(teacher, mesh)
        teacher_params = jax.device_put(teacher_params, teacher_sh)
    fn = make_eval_fn(graphdef, vocab_size=vocab, teacher_graphdef=teacher_graphdef, chunk_size=e.chunk_size)
    param_sh = jax.tree.map(lambda a: a.sharding, params)
    eval_fn = jit_eval_fn(fn, param_sh, mesh, teacher_sh)
    it = eval_batch_iterator(rows, global_batch_size=e.batch_size)
    batches = (host_batch(b, fields) for b in it)
    out = evaluate_batches(eval_fn, params, batches, mesh, teacher_params=teacher_params, max_batches=e.max_batches)
    return {**out, "split": e.split, "teacher": e.teacher, **info}


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_cli(EvaluateRun, argv, prog="python -m rskd_jax.evaluate")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if cfg.distributed.enabled:
        from rskd_jax.sharding import initialize_distributed

        initialize_distributed(cfg.distributed)
    from rskd_jax.checkpoint import CheckpointError
    from rskd_jax.config import ConfigError
    from rskd_jax.store.common import StoreError

    try:
        summary = run(cfg)
    except (StoreError, ConfigError, CheckpointError) as err:
        print(f"python -m rskd_jax.evaluate: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if jax.process_index() == 0:
        print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
