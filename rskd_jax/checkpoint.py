"""Train checkpoints with orbax: the sharded train state plus the input pipeline's position.

Layout: `<run>/checkpoints/<step>/{state, data}` (the run directory a local path or a gs://,
s3:// or file:// URL: orbax reads and writes it through etils.epath, rskd_jax.runpath) where
`state` is the TrainState (params, optimizer state, step, rng; orbax's sharded array format,
written by every process for its own shards) and `data` the grain iterator state (JSON,
written by process 0: it is the same on every process, which all cut their rows from the same
global batches), so a resumed run reads exactly the batches an uninterrupted one would have.

Kept: the latest `keep` checkpoints, and also the best one by val_loss (the checkpoints saved
with `metrics={"val_loss": ...}`), through one orbax manager with a combined preservation
policy. Saves are asynchronous by default: `save` returns once the arrays are copied off the
devices, orbax writes them in the background and commits the step directory atomically at
the end, so a process killed mid-write leaves only a temporary directory that the next
manager ignores and cleans up.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from rskd_jax.runpath import run_path

BEST_METRIC = "val_loss"


def _val_loss(metrics: Any) -> float:
    return float(metrics[BEST_METRIC])


class CheckpointError(ValueError):
    """No usable checkpoint where one was expected."""


class Checkpointer:
    """Save / restore train states and data-iterator states under `directory`.

    >>> import tempfile, jax.numpy as jnp
    >>> ckpt = Checkpointer(tempfile.mkdtemp() + "/checkpoints", keep=3)
    >>> state = {"w": jnp.arange(4.0)}
    >>> ckpt.save(10, state, {"epoch": 0}); ckpt.wait()
    True
    >>> abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    >>> restored, data = ckpt.restore(ckpt.latest_step(), abstract)
    >>> restored["w"].tolist(), data
    ([0.0, 1.0, 2.0, 3.0], {'epoch': 0})
    >>> ckpt.close()
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = directory = run_path(directory)  # orbax takes epath paths (gs://, s3://, local)
        policy = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=_val_loss,
                    reverse=True,
                    n=1,  # reverse: min is best
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=_val_loss,
            best_mode="min",
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            save_interval_steps=1,
        )
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))

    def save(
        self, step: int, state: Any, data_state: dict | None = None, metrics: dict[str, float] | None = None
    ) -> bool:
        """Starts saving `state` (and the iterator state) as `step`; metrics rank the best."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(_jsonable(data_state or {}))
        )
        return self.manager.save(int(step), args=args, metrics=metrics, force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the lowest val_loss (None if no checkpoint has metrics)."""
        with_metrics = [s for s in self.manager.all_steps() if self.manager.metrics(s)]
        return self.manager.best_step() if with_metrics else None

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed on abstract_state's shardings, data-iterator state) of `step`.

        abstract_state: a pytree of jax.ShapeDtypeStruct with `sharding` set (see
        optim.abstract_state); each process reads only its own shards.
        """
        if step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["data"] or {})

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the params of a checkpoint (evaluation): the optimizer state is not read."""
        if step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        item = {"params": abstract_params}
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), item
        )
        path = self.directory / str(int(step)) / "state"
        with ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(
                path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
            )
        return restored["params"]

    def wait(self) -> None:
        """Blocks until every pending background save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _jsonable(obj: Any) -> Any:
    """Grain iterator states are plain dicts but may hold bytes / numpy scalars."""
    return json.loads(
        json.dumps(
            obj, default=lambda o: o.decode() if isinstance(o, bytes) else o.item() if hasattr(o, "item") else str(o)
        )
    )


def find_checkpoint(path: str) -> tuple[str, int | None]:
    """(checkpoints directory, step) for a run dir, its checkpoints dir, or one step dir (a
    local path or URL; the directory is returned as a path or URL string, file:// resolved).

    step None means "the latest". Raises CheckpointError naming what was looked for.
    """
    p = run_path(path)
    if (p / "checkpoints").is_dir():
        return os.fspath(p / "checkpoints"), None
    if p.name.isdigit() and (p / "state").is_dir():
        return os.fspath(p.parent), int(p.name)
    if p.is_dir() and any(child.name.isdigit() for child in p.iterdir()):
        return os.fspath(p), None
    raise CheckpointError(
        f"{path} is not a run directory (no checkpoints/), a checkpoints directory, or a checkpoint step directory"
    )
