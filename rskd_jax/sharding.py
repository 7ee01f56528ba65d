"""Device mesh, logical-axis rules and the shardings of params, optimizer state and batches.

Sharding is declared once: every parameter carries logical axis names (see
`rskd_jax.models`), one rules table maps them to mesh axes, and the jitted steps take the
resulting `NamedSharding`s as `in_shardings` / `out_shardings`.

Mesh axes:
  data    pure data parallelism (batch split, params replicated)
  fsdp    batch split AND params/optimizer state sharded along their "embed" dimension
  tensor  Megatron-style model parallelism over heads, MLP hidden units and the vocabulary

A dimension whose size the mapped mesh axes do not divide stays replicated (SmolLM2's 9
heads on tensor=2, say); `param_shardings` reports which.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rskd_jax.config import MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axes (None: replicated). The order matters only for the batch.
DEFAULT_RULES: Mapping[str, tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,
    "layers": None,
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "q": ("tensor",),
    "kv": ("tensor",),
    "head_dim": None,
    "norm": None,
}


class ShardingError(ValueError):
    """A mesh or batch layout that cannot work, with what to change."""


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 and checks that the axes multiply to the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ShardingError(f"mesh {cfg}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh {cfg}: axis sizes must be positive or -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ShardingError(
                f"mesh {cfg}: {num_devices} devices are not divisible by the fixed axes "
                f"(product {fixed}); choose sizes whose product divides {num_devices}"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ShardingError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} "
            f"devices but {num_devices} are available; set mesh.data=-1 to use them all"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over all (global) devices, or the given ones."""
    cfg = MeshConfig() if cfg is None else cfg
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    # Auto axes: GSPMD propagates shardings from the jit's in/out shardings (explicit-axis
    # meshes, jax.make_mesh's default, would demand a sharding on every gather).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        try:  # topology-aware placement on TPU/GPU slices; plain reshape elsewhere.
            return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
        except (TypeError, ValueError, NotImplementedError):
            pass
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, tuple[str, ...] | None] = DEFAULT_RULES,
) -> PartitionSpec:
    """Maps one array's logical axis names to a PartitionSpec on `mesh`.

    A mesh axis is used at most once per array (first dimension wins), mesh axes of size 1 are
    dropped, and a dimension not divisible by its mesh axes stays replicated.

    >>> mesh = jax.sharding.AbstractMesh((1, 2, 2), MESH_AXES)  # data=1, fsdp=2, tensor=2
    >>> logical_to_spec(("vocab", "embed"), (8, 4), mesh) == PartitionSpec("tensor", "fsdp")
    True
    """
    if not names:
        return PartitionSpec()
    if len(names) != len(shape):
        raise ShardingError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(names, shape):
        if name is not None and name not in rules:
            raise ShardingError(f"no sharding rule for logical axis {name!r}; known: {sorted(rules)}")
        axes = [a for a in (rules.get(name) or ()) if a not in used and mesh.shape[a] > 1] if name else []
        if axes and dim % math.prod(mesh.shape[a] for a in axes):
            log.info("dimension %s (%d) not divisible by mesh axes %s: replicated", name, dim, axes)
            axes = []
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def _logical_names(variable: Any) -> Sequence[str | None] | None:
    # Params carry `logical_axes=(...)` metadata. flax's own `out_sharding` key would shard
    # eagerly at creation and needs a mesh then; we only need the names, so both are read.
    metadata = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("logical_axes", "out_sharding", "sharding_names", "sharding"):
        if metadata.get(key):
            return metadata[key]
    return None


def param_shardings(state: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for an `nnx.State` (same tree; each Variable's value a NamedSharding)."""
    from flax import nnx  # the pure modules of this package never import flax

    def one(x):
        if isinstance(x, nnx.Variable):
            spec = logical_to_spec(_logical_names(x), x.get_value().shape, mesh, rules)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch_size: int, mesh: Mesh, *, key: str = "batch_size") -> None:
    """Refuses a global batch that the mesh's batch axes (and processes) cannot split evenly."""
    shards = batch_shards(mesh)
    if global_batch_size % shards:
        lo = global_batch_size // shards * shards
        raise ShardingError(
            f"{key}={global_batch_size} is not divisible by the batch axes of the mesh "
            f"(data x fsdp = {shards}); set {key}={lo or shards} or {lo + shards}, "
            f"or change mesh.data / mesh.fsdp"
        )
    if global_batch_size % jax.process_count():
        raise ShardingError(f"{key}={global_batch_size} is not divisible by the {jax.process_count()} processes")


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local rows into global arrays sharded over the batch axes.

    Every process passes its own slice (rows [p*b : (p+1)*b] of the global batch); nothing is
    gathered. On one process this is a plain sharded device_put.
    """
    out = {}
    for name, arr in local.items():
        arr = np.asarray(arr)
        sharding = batch_sharding(mesh, arr.ndim)
        if jax.process_count() == 1:
            out[name] = jax.device_put(arr, sharding)
        else:
            out[name] = jax.make_array_from_process_local_data(sharding, arr)
    return out


def initialize_distributed(cfg) -> None:
    """`jax.distributed.initialize` when configured (before any other jax call)."""
    if not cfg.enabled:
        return
    import jax

    # CPU processes need cross-process collectives (the done-mask broadcast, barriers); gloo
    # is jax 0.10's default for jax_cpu_collectives_implementation, older ones had none.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id
    )
