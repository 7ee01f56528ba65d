"""The student train step: loss composition, chunked loss, gradient accumulation, jit shardings.

Letters: B batch rows, M micro-batches, L positions, C positions per loss chunk, V student
vocabulary (possibly padded beyond the tokenizer's), K stored teacher slots, D hidden size.

Batch convention (host arrays, one global batch): `tokens [B, L] int32`, optional
`mask [B, L]` (1 = real token), and under document masking `segment_ids [B, L]` and
`positions [B, L]` int32 (rskd_jax.documents: the student, and an online teacher, attend only
within a document, RoPE restarting at each document). The student reads the whole row. Cross-entropy at position j
predicts tokens[j + 1] (positions 0..L-2; the last has no label). Teacher targets exist for
all L positions (teacher position j predicts token j + 1), so KD uses every position.
Per method the batch also holds:
  sparse       ids [B, L, K] int32, weights [B, L, K] f32   (sampled / without-replacement /
               top-K stores: weights are final importance weights)
  ghost        ids, weights (= teacher probs of the kept ids), tail_mass [B, L]
  full_cached  logprobs [B, L, Vt] f32 (teacher log-probabilities)
  full_online  nothing: a frozen teacher runs inside the step (its params are an argument)
  ce           nothing

Loss: L = alpha * CE + (1 - alpha) * KD + z * Zloss (method "ce": L = CE + z * Zloss), each
term the mean over the positions of the WHOLE global batch: sums are accumulated over
micro-batches and position chunks and divided by counts taken from the masks up front, so
any micro-batching gives the same loss and gradient (up to float reassociation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rskd_jax import losses, metrics, sharding
from rskd_jax.documents import DOCUMENT_KEYS
from rskd_jax.methods import BATCH_KEYS, LOSS_METHODS
from rskd_jax.optim import TrainState

METHODS = LOSS_METHODS


class LossSpec(NamedTuple):
    """The static loss settings of a step (explicit arguments, not a run config).

    vocab_size: the tokenizer's vocabulary; student (and teacher) logits of ids >= it are
    masked before every loss. chunk_size: positions per loss chunk (0: unchunked).
    """

    method: str = "sparse"
    alpha: float = 0.0
    kd_temperature: float = 1.0
    z_loss: float = 0.0
    vocab_size: int | None = None
    chunk_size: int = 0


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, float32 master params as a plain nested dict)."""
    graphdef, state = nnx.split(model, nnx.Param)
    params = jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, nnx.to_pure_dict(state)
    )
    return graphdef, params


def model_shardings(model: nnx.Module, mesh) -> dict:
    """NamedShardings of `split_model(model)[1]` from the params' logical axis names."""
    return nnx.to_pure_dict(sharding.param_shardings(nnx.state(model, nnx.Param), mesh))


# ------------------------------------------------------------------------------ targets


def prepare_targets(batch: dict[str, jax.Array], method: str) -> dict[str, jax.Array]:
    """Per-position arrays [B, L, ...] the losses read: labels, ce_where, kd_where + targets."""
    tokens_BxL = batch["tokens"].astype(jnp.int32)
    b, l = tokens_BxL.shape
    mask_BxL = batch["mask"].astype(bool) if "mask" in batch else jnp.ones((b, l), bool)
    # label of position j is token j + 1; the last position has none.
    labels_BxL = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    has_next_BxL = jnp.concatenate([mask_BxL[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
    t = {"tokens": tokens_BxL, "labels": labels_BxL, "ce_where": mask_BxL & has_next_BxL, "kd_where": mask_BxL}
    t.update({k: batch[k] for k in DOCUMENT_KEYS if k in batch})  # document masking
    missing = [k for k in BATCH_KEYS[method] if k not in batch]
    if missing:
        raise KeyError(f"loss.method={method!r} needs batch keys {missing}; got {sorted(batch)}")
    for k in BATCH_KEYS[method]:
        t[k] = batch[k]
    if method == "full_cached":
        t["teacher_logits"] = t.pop("logprobs")
    return t


def fit_vocab(logits_xV: jax.Array, v: int) -> jax.Array:
    """Teacher logits padded (with MASKED_LOGIT) or cut to the student's vocabulary size."""
    vt = logits_xV.shape[-1]
    if vt >= v:
        return logits_xV[..., :v]
    pad = [(0, 0)] * (logits_xV.ndim - 1) + [(0, v - vt)]
    return jnp.pad(logits_xV.astype(jnp.float32), pad, constant_values=metrics.MASKED_LOGIT)


def chunk_sums(logits_xV, t, teacher_logits_xV, spec: LossSpec) -> dict[str, tuple]:
    """The loss terms of one chunk of positions as {"ce"|"kd"|"z": (sum, count)}."""
    logits_xV = metrics.mask_vocab(logits_xV, spec.vocab_size)  # padded ids never count
    # PERF: CE, sparse KD and the z-loss share ONE logsumexp and ONE gather (the label in slot
    # 0, the teacher's ids after it): the RS-KD step then makes exactly the CE step's V-sized
    # passes and buffers. Computing the reported CE separately on stop_gradient(logits) (as
    # before) kept one more [B, L, V] float32 buffer alive at alpha = 0 (XLA memory_analysis:
    # +363 MB temporaries at d=128, 8 x 256 tokens) and cost +4..9% per step on CPU
    # (tools/bench_step.py, N = 50 and N = 13 alike).
    ce_in_loss = spec.method == "ce" or spec.alpha > 0
    lse_x = jax.nn.logsumexp(logits_xV, axis=-1)
    kdw = t["kd_where"]
    sparse = spec.method == "sparse"
    slots_xK = t["labels"][..., None]
    if sparse:
        slots_xK = jnp.concatenate([slots_xK, t["ids"].astype(jnp.int32)], axis=-1)
    x_xK = jnp.take_along_axis(logits_xV, slots_xK, axis=-1)
    ce_x = losses.sparse_kd_from_target_logits(lse_x, x_xK[..., :1], jnp.ones_like(x_xK[..., :1]), where=t["ce_where"])
    if not ce_in_loss:  # only reported: no backward through it
        ce_x = jax.lax.stop_gradient(ce_x)
    if sparse:
        kd_x = losses.sparse_kd_from_target_logits(lse_x, x_xK[..., 1:], t["weights"], where=kdw)
    elif spec.method == "ghost":
        kd_x = losses.ghost_kd_loss(logits_xV, t["ids"], t["weights"], t["tail_mass"], where=kdw)
    elif spec.method in ("full_online", "full_cached"):
        teacher_xV = metrics.mask_vocab(fit_vocab(teacher_logits_xV, logits_xV.shape[-1]), spec.vocab_size)
        kd_x = losses.full_kd_loss(logits_xV, teacher_xV, temperature=spec.kd_temperature, where=kdw)
    else:
        kd_x = jnp.zeros_like(ce_x)
    # z-loss (log Z)^2 from the shared logsumexp (= losses.z_loss)
    z_x = jnp.square(lse_x) if spec.z_loss else jnp.zeros_like(ce_x)
    return {
        "ce": losses.reduce_sum_count(ce_x, t["ce_where"]),
        "kd": losses.reduce_sum_count(kd_x, kdw),
        "z": losses.reduce_sum_count(z_x, t["ce_where"]),
    }


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def sum_over_positions(fn: Callable, model, teacher, t: dict, *, chunk_size: int = 0, remat: bool = True) -> Any:
    """sum over position chunks of fn(logits [B, C, V] f32, t chunk, teacher logits or None).

    `fn` returns a pytree of additive sums over the positions its masks (t["ce_where"],
    t["kd_where"]) select. The teacher logits come from `teacher` (a model, run here) or else
    from t["teacher_logits"] (cached), or are None. The chunking is `losses.map_logit_chunks`
    (the driver of the pure `*_from_hidden` losses): chunk_size > 0 computes each chunk's
    logits from the hidden states and the lm-head weight under jax.checkpoint (with remat), so
    no [B, L, V] array exists; a last partial chunk is padded with masked positions (any
    chunk_size works). chunk_size=0: the whole rows at once.
    """
    tokens_BxL = t["tokens"]
    documents = [t.get(k) for k in DOCUMENT_KEYS]  # segment ids, positions (or None, None)
    xs = {"t": t}
    tw_DxV = None
    if teacher is not None:
        xs["th"] = teacher.hidden_states(tokens_BxL, *documents)
        tw_DxV = teacher.lm_head_weight()

    def chunk_fn(logits_BxCxV, x):
        teacher_logits = x["t"].get("teacher_logits")
        if teacher is not None:
            # PERF: with remat the backward recomputes the teacher's chunk logits too.
            teacher_logits = teacher.logits_from_hidden(x["th"], tw_DxV)
        return fn(logits_BxCxV, x["t"], teacher_logits)

    sums_n = losses.map_logit_chunks(
        chunk_fn,
        model.hidden_states(tokens_BxL, *documents),
        model.lm_head_weight(),
        xs,
        chunk_size=chunk_size,
        remat=remat,
        softcap=model.config.final_softcap,
    )
    return jax.tree.map(lambda y: jnp.sum(y, axis=0), sums_n)


def loss_sums(params, teacher_params, t, *, graphdef, teacher_graphdef, spec: LossSpec):
    """{"ce"|"kd"|"z": (sum, count)} of the rows in `t` (see chunk_sums), chunked if asked."""
    model = nnx.merge(graphdef, params)
    teacher = None
    if spec.method == "full_online":  # frozen: no gradient flows into the teacher
        teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    return sum_over_positions(
        functools.partial(chunk_sums, spec=spec), model, teacher, t, chunk_size=spec.chunk_size, remat=True
    )


# ------------------------------------------------------------------------------ the step


def _to_micro(x_Bx: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...]. Micro-batch i takes rows i, M+i, 2M+i, ...: with the batch
    split in contiguous blocks over devices, every device holds B/M/shards rows of each."""
    return jnp.moveaxis(x_Bx.reshape(x_Bx.shape[0] // m, m, *x_Bx.shape[1:]), 1, 0)


def check_spec(spec: LossSpec, teacher_graphdef=None) -> None:
    """Refuses an unknown loss method, or "full_online" without a teacher model."""
    if spec.method not in METHODS:
        raise ValueError(f"loss.method={spec.method!r}; choose one of {METHODS}")
    if spec.method == "full_online" and teacher_graphdef is None:
        raise ValueError("loss.method='full_online' needs a teacher model")


def loss_and_grad(
    params,
    teacher_params,
    batch: dict,
    *,
    graphdef,
    spec: LossSpec,
    teacher_graphdef=None,
    micro_batches: int = 1,
    mesh=None,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """(loss, aux, grads): the train loss of one global batch and its gradient w.r.t. params.

    L = alpha * CE + (1 - alpha) * KD + z * Zloss (spec.method "ce": L = CE + z * Zloss), each
    term a mean over the positions of the whole batch (counts from the masks up front, so the
    `micro_batches` split, a lax.scan accumulating gradients, changes only float rounding).
    `batch`: tokens [B, L], optional mask [B, L] and the method's fields (BATCH_KEYS);
    `teacher_params` / `teacher_graphdef` only for "full_online" (frozen). `mesh`: keeps every
    micro-batch spread over the batch axes. aux: ce, kd, z_loss (the terms' means), ce_tokens,
    kd_tokens (the counts). Un-jitted; the train step applies exactly these gradients.
    """
    check_spec(spec, teacher_graphdef)
    ce_w, kd_w = (1.0, 0.0) if spec.method == "ce" else (spec.alpha, 1.0 - spec.alpha)
    sums_fn = functools.partial(loss_sums, graphdef=graphdef, teacher_graphdef=teacher_graphdef, spec=spec)
    t = prepare_targets(batch, spec.method)
    ce_n = jnp.maximum(jnp.sum(t["ce_where"].astype(jnp.float32)), 1.0)
    kd_n = jnp.maximum(jnp.sum(t["kd_where"].astype(jnp.float32)), 1.0)

    def objective(params, t_micro):
        s = sums_fn(params, teacher_params, t_micro)
        # L = alpha * CE + (1 - alpha) * KD + z * Z, means over the whole global batch.
        loss = ce_w * s["ce"][0] / ce_n + kd_w * s["kd"][0] / kd_n + spec.z_loss * s["z"][0] / ce_n
        return loss, s

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if micro_batches == 1:
        (loss, sums), grads = grad_fn(params, t)
    else:
        t_micro = jax.tree.map(functools.partial(_to_micro, m=micro_batches), t)
        if mesh is not None:  # keep every micro-batch spread over the batch axes
            spread = NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES))
            t_micro = jax.lax.with_sharding_constraint(t_micro, jax.tree.map(lambda _: spread, t_micro))
        first = jax.tree.map(lambda x: x[0], t_micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first))

        def accumulate(acc, tm):
            return _tree_add(acc, grad_fn(params, tm)), None

        ((loss, sums), grads), _ = jax.lax.scan(accumulate, zeros, t_micro)
    aux = {
        "ce": sums["ce"][0] / ce_n,
        "kd": sums["kd"][0] / kd_n,
        "z_loss": sums["z"][0] / ce_n,
        "ce_tokens": ce_n,
        "kd_tokens": kd_n,
    }
    return loss, aux, grads


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    schedule: Callable,
    spec: LossSpec,
    *,
    micro_batches: int = 1,
    teacher_graphdef=None,
    mesh=None,
) -> Callable:
    """`step(state, batch, teacher_params=None) -> (state, metrics)`, un-jitted (see jit_step).

    The update applies `loss_and_grad`'s gradients. metrics: loss, ce, kd, z_loss (means over
    the global batch), grad_norm (before clipping), lr (of this update), ce_tokens, kd_tokens.
    """
    check_spec(spec, teacher_graphdef)
    grad_fn = functools.partial(
        loss_and_grad,
        graphdef=graphdef,
        spec=spec,
        teacher_graphdef=teacher_graphdef,
        micro_batches=micro_batches,
        mesh=mesh,
    )

    def step(state: TrainState, batch: dict, teacher_params=None):
        loss, aux, grads = grad_fn(state.params, teacher_params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {
            "loss": loss,
            "ce": aux["ce"],
            "kd": aux["kd"],
            "z_loss": aux["z_loss"],
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "ce_tokens": aux["ce_tokens"],
            "kd_tokens": aux["kd_tokens"],
        }
        return TrainState(params, opt_state, state.step + 1, state.rng), out

    return step


def batch_shardings(batch: dict[str, Any], mesh) -> dict[str, NamedSharding]:
    """Every batch array split over the batch axes along its leading dimension."""
    return {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch.items()}


def check_step_batch(global_batch_size: int, micro_batches: int, mesh) -> None:
    """Refuses batch sizes that the micro-batching and the mesh's batch axes cannot split."""
    sharding.check_batch(global_batch_size, mesh, key="train.batch_size")
    if micro_batches < 1 or global_batch_size % micro_batches:
        raise sharding.ShardingError(
            f"train.batch_size={global_batch_size} is not divisible by "
            f"train.grad_accum={micro_batches}; choose a divisor"
        )
    sharding.check_batch(global_batch_size // micro_batches, mesh, key="train.batch_size / train.grad_accum")


def jit_step(
    step: Callable, state_shardings: TrainState, batch_shardings_: dict, mesh, teacher_shardings=None
) -> Callable:
    """jax.jit with the state's, the batch's and the teacher's shardings; the state is donated."""
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings_, teacher_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnames=("state",),
    )

    def call(state, batch, teacher_params=None):
        return jitted(state, batch, teacher_params)

    call.jitted = jitted  # .lower(...) for memory analysis / benchmarks
    return call
