"""What the model-running stages (eval, grad, timing, estimate) share: the mesh, the mix, the
teacher, each method's train rows and loss settings.

`cmp` below is a `rskd_jax.compare.stages.Comparison` (its config, the mix's URL and the
teacher stores' URLs).
"""

from __future__ import annotations

from typing import Any


def setup(cmp) -> tuple[Any, Any, int]:
    """(mesh, the mix's token store, the tokenizer's vocabulary size)."""
    from rskd_jax import sharding
    from rskd_jax.store.tokens import open_token_store
    from rskd_jax.train_data import tokenizer_vocab

    mesh = sharding.make_mesh(cmp.cfg.mesh)
    tokens = open_token_store(cmp.mix)
    return mesh, tokens, tokenizer_vocab(tokens)


def build_teacher(cmp, vocab: int, mesh):
    """(graphdef, params placed on the mesh, param shardings) of the `teacher` section."""
    import jax

    from rskd_jax.model_spec import build_model
    from rskd_jax.train_step import model_shardings, split_model

    teacher = build_model(cmp.cfg.teacher, vocab, mesh)
    graphdef, params = split_model(teacher)
    shardings = model_shardings(teacher, mesh)
    return graphdef, jax.device_put(params, shardings), shardings


def method_rows(cmp, m, tokens):
    """(train-split row source of method m with its loss's teacher fields, those fields)."""
    from rskd_jax.methods import BATCH_KEYS
    from rskd_jax.store.teacher import open_teacher_store
    from rskd_jax.train_data import split_rows

    fields = BATCH_KEYS[m.loss]
    store = open_teacher_store(cmp.store_url(m.store)) if m.store else None
    return split_rows(tokens, store, "train", fields, cmp.cfg.context.document_masking), fields


def token_rows(cmp, tokens, split: str = "train"):
    """The rows of a token-store split without teacher fields; under context.document_masking
    each read also holds their segment ids and positions (every model reads them)."""
    from rskd_jax.train_data import split_rows

    return split_rows(tokens, None, split, (), cmp.cfg.context.document_masking)


def loss_spec(cmp, loss: str, vocab: int):
    """The LossSpec of a method's train runs (CE students: alpha 1)."""
    from rskd_jax.train_step import LossSpec

    lc = cmp.cfg.loss
    return LossSpec(loss, 1.0 if loss == "ce" else lc.alpha, lc.kd_temperature, lc.z_loss, vocab, lc.chunk_size)
