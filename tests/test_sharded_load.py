"""Sharded loading (models.hf.load_hf_dir with a mesh) on 8 fake CPU devices: the values equal
the unsharded load's exactly, every parameter lands in the sharding the programs jit with
(sharding.param_shardings), each device holds only its shard, and the param dtype conversion
matches; models.safetensors_mmap reads what safetensors wrote."""

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from rskd_jax import sharding
from rskd_jax.config import MeshConfig
from rskd_jax.models import LlamaConfig, from_pretrained, init_model, save_pretrained
from rskd_jax.models.safetensors_mmap import MappedSafetensors, read_slice

CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,  # 2 kv heads on tensor=4: replicated along that dimension
    qkv_bias=True,  # Qwen2: biases too
)


def _params(model) -> dict:
    return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    save_pretrained(init_model(CONFIG, seed=3), path)
    return path


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_sharded_load_equals_unsharded(checkpoint, mesh, param_dtype):
    old = from_pretrained(checkpoint, param_dtype=param_dtype)
    new = from_pretrained(checkpoint, param_dtype=param_dtype, mesh=mesh)
    assert new.fingerprint == old.fingerprint
    want = nnx.to_pure_dict(sharding.param_shardings(nnx.state(old, nnx.Param), mesh))
    want_flat = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    old_p, new_p = _params(old), _params(new)
    assert old_p.keys() == new_p.keys()
    sharded = 0
    for name, var in new_p.items():
        a, ref = var.get_value(), old_p[name].get_value()
        key = "/".join(f"['{p}']" for p in name.split("/"))
        assert a.dtype == ref.dtype == np.dtype(param_dtype), name
        assert a.sharding == want_flat[key], name  # the sharding the cache step jits with
        np.testing.assert_array_equal(np.asarray(a), np.asarray(ref), err_msg=name)
        shard_shape = a.sharding.shard_shape(a.shape)
        assert len(a.addressable_shards) == 8
        for shard in a.addressable_shards:  # one shard per device, of the shard's shape only
            assert shard.data.shape == shard_shape, name
            assert shard.data.devices() == {shard.device}
        sharded += shard_shape != a.shape
    assert sharded >= 10  # embed, lm_head and the projections are split, not replicated


@pytest.mark.slow  # test-fast keeps the float32 sharded == unsharded load
def test_bfloat16_checkpoint_loads_as_float32(tmp_path, mesh):
    model = init_model(CONFIG.replace(param_dtype="bfloat16"), seed=1)
    save_pretrained(model, tmp_path)
    st = MappedSafetensors(sorted(tmp_path.glob("*.safetensors")))
    assert st["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    loaded = from_pretrained(tmp_path, param_dtype="float32", mesh=mesh)
    want = np.asarray(model.embed[...]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded.embed[...]), want)
    assert loaded.embed[...].dtype == np.float32


def test_mapped_safetensors_reads_what_safetensors_wrote(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((5, 7)).astype(np.float32),
        "b": rng.integers(-9, 9, (3,)).astype(np.int64),
        "c": np.array(2.5, np.float16),
        "d": np.zeros((0, 4), np.float32),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    st = MappedSafetensors([tmp_path / "x.safetensors"])
    assert set(st) == set(tensors) and st.nbytes() == sum(t.nbytes for t in tensors.values())
    for name, want in tensors.items():
        got = st[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(st["a"][1:3, 2:], tensors["a"][1:3, 2:])


def test_sharded_load_refuses_a_missing_tensor(tmp_path, mesh):
    from safetensors.numpy import load_file, save_file

    save_pretrained(init_model(CONFIG, seed=0), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.2.mlp.up_proj.weight'"):
        from_pretrained(tmp_path, mesh=mesh)


@pytest.mark.parametrize(
    "idx", [(slice(None), slice(3, 9)), (slice(2, 17), slice(None)), (slice(1, 20, 3), slice(0, 4)), ()]
)
def test_read_slice_reads_blocks_through_fresh_views(tmp_path, idx):
    from safetensors.numpy import save_file

    a = np.arange(20 * 12, dtype=np.float32).reshape(20, 12)
    save_file({"a": a}, str(tmp_path / "x.safetensors"))
    st, calls = MappedSafetensors([tmp_path / "x.safetensors"]), []

    def fresh():
        calls.append(1)
        return st["a"]

    got = read_slice(fresh, idx, block_bytes=4 * 12 * 4)  # 4 rows a block
    np.testing.assert_array_equal(got, a[idx])
    assert not isinstance(got, np.memmap)
    rows = len(range(20)[idx[0] if idx else slice(None)])
    assert len(calls) == 1 + -(-rows // 4)  # the shape, then one fresh map per 4-row block
