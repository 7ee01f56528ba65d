"""Mesh construction, logical-axis rules and batch checks on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rskd_jax import sharding as sh


def test_mesh_places_every_device_once():
    assert jax.device_count() == 8  # conftest's fake devices: every test here relies on them
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    sub = sh.make_mesh(sh.MeshConfig(data=-1, tensor=2), devices=jax.devices()[4:])  # given devices, in order
    assert sub.devices.shape == (2, 1, 2)
    assert [d.id for d in sub.devices.flat] == [d.id for d in jax.devices()[4:]]
    assert sh.mesh_shape(sh.MeshConfig(data=-1, fsdp=4), 32) == (8, 4, 1)  # a pod-sized count
    assert sh.mesh_shape(sh.MeshConfig(data=2, fsdp=-1, tensor=2), 16) == (2, 4, 2)


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (sh.MeshConfig(), (8, 1, 1)),
        (sh.MeshConfig(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
        (sh.MeshConfig(data=1, fsdp=-1, tensor=1), (1, 8, 1)),
        (sh.MeshConfig(data=2, fsdp=4, tensor=1), (2, 4, 1)),
    ],
)
def test_mesh_shapes(cfg, shape):
    mesh = sh.make_mesh(cfg)
    assert tuple(mesh.shape[a] for a in sh.MESH_AXES) == shape
    assert mesh.axis_names == sh.MESH_AXES


@pytest.mark.parametrize(
    "cfg, msg",
    [
        (sh.MeshConfig(data=3, fsdp=1, tensor=1), "needs 3 devices but 8"),
        (sh.MeshConfig(data=-1, fsdp=3, tensor=1), "not divisible"),
        (sh.MeshConfig(data=-1, fsdp=-1, tensor=1), "at most one axis"),
        (sh.MeshConfig(data=0), "positive"),
    ],
)
def test_mesh_errors(cfg, msg):
    with pytest.raises(sh.ShardingError, match=msg):
        sh.make_mesh(cfg)


def test_logical_to_spec_rules():
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    assert sh.logical_to_spec(("vocab", "embed"), (64, 16), mesh) == P("tensor", "fsdp")
    assert sh.logical_to_spec(("layers", "embed", "mlp"), (3, 16, 32), mesh) == P(None, "fsdp", "tensor")
    # 9 heads on tensor=2: replicated rather than an XLA error.
    assert sh.logical_to_spec(("embed", "heads", "head_dim"), (16, 9, 8), mesh) == P("fsdp", None, None)
    # a mesh axis is used once per array; size-1 axes are dropped.
    assert sh.logical_to_spec(("mlp", "heads"), (4, 4), mesh) == P("tensor", None)
    mesh1 = sh.make_mesh(sh.MeshConfig(data=8))
    assert sh.logical_to_spec(("vocab", "embed"), (64, 16), mesh1) == P(None, None)
    assert sh.logical_to_spec(None, (3,), mesh) == P()
    with pytest.raises(sh.ShardingError, match="no sharding rule for logical axis 'bogus'"):
        sh.logical_to_spec(("bogus",), (4,), mesh)
    with pytest.raises(sh.ShardingError, match="do not match shape"):
        sh.logical_to_spec(("embed",), (4, 4), mesh)


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.normal(0.02)
        self.w = nnx.Param(init(rngs.params(), (16, 32)), logical_axes=("embed", "mlp"))
        self.b = nnx.Param(jnp.zeros((32,)), logical_axes=("norm",))

    def __call__(self, x):
        return x @ self.w + self.b


def test_param_shardings_and_sharded_step_matches_single_device():
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    model = _Tiny(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    shardings = sh.param_shardings(state, mesh)
    assert shardings["w"].get_value().spec == P("fsdp", "tensor")
    assert shardings["b"].get_value().spec == P(None)
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    expected = np.asarray(model(jnp.asarray(x)))

    @jax.jit
    def fwd(state, x):
        return nnx.merge(graphdef, state)(x)

    state_s = jax.device_put(state, shardings)
    batch = sh.global_batch({"x": x}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
    out = fwd(state_s, batch["x"])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_check_batch_message():
    mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=2, tensor=2))
    sh.check_batch(8, mesh)
    with pytest.raises(
        sh.ShardingError, match=r"batch_size=6 is not divisible .* \(data x fsdp = 4\); set batch_size=4 or 8"
    ):
        sh.check_batch(6, mesh)
