"""Optimizer (AdamW, warmup + cosine, clipping, decay mask) and the sharded train state.

The train state is a pytree of float32 master params (a plain nested dict, as
`train_step.split_model` returns it), the optax state, the step counter and a base PRNG key.
Its shardings come from the params' logical axis names (`sharding.param_shardings`); every
optimizer-state array shaped like a parameter (Adam's mu and nu) is sharded like it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rskd_jax import sharding

# Parameter names (any path component) that get no weight decay, besides every 1-D array.
NO_DECAY = ("norm", "bias")


class TrainState(NamedTuple):
    """params: float32 master weights; opt_state: optax state; step: int32 []; rng: uint32 [2]."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def lr_schedule(
    peak_lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.1
) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup to peak_lr, then cosine decay to end_lr_ratio * peak_lr at total_steps.

    lr(s) = peak * (s + 1) / warmup for s < warmup (the first update is not wasted on lr 0);
    afterwards peak * (r + (1 - r) * (1 + cos(pi * min(1, (s - warmup) / (total - warmup)))) / 2).
    """
    end = peak_lr * end_lr_ratio

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak_lr * (count + 1.0) / max(warmup_steps, 1)
        progress = jnp.clip((count - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = end + (peak_lr - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(count < warmup_steps, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: not on norms, biases or 1-D params."""

    def one(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return x.ndim > 1 and not any(tag in n for n in names for tag in NO_DECAY)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(
    schedule: Callable,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the decay mask (clip_norm None or 0: no clipping)."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state (step 0). Under jit with out_shardings it is created already sharded."""
    return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed))


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def like_params(tree: Any, params: Any, param_shardings: Any, default: Any) -> Any:
    """For each leaf of `tree` (e.g. an abstract optimizer state): the sharding of the param
    whose path is a suffix of the leaf's path and whose shape matches, else `default`."""
    by_path = {}
    for (path, p), (_, s) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    ):
        by_path[_path_keys(path)] = (tuple(p.shape), s)

    def pick(path, leaf):
        keys = _path_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(params: Any, param_shardings: Any, tx: optax.GradientTransformation, mesh) -> TrainState:
    """TrainState of NamedShardings: params as given, optimizer state like the params."""
    replicated = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, params)
    return TrainState(
        param_shardings, like_params(abstract_opt, params, param_shardings, replicated), replicated, replicated
    )


def create_state(params: Any, tx: optax.GradientTransformation, seed: int, shardings: TrainState) -> TrainState:
    """The initial state, placed on `shardings` (params are moved there first)."""
    params = jax.device_put(params, shardings.params)
    return jax.jit(lambda p: init_state(p, tx, seed), out_shardings=shardings)(params)


def abstract_state(params: Any, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
    shapes = jax.eval_shape(lambda p: init_state(p, tx, 0), params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
