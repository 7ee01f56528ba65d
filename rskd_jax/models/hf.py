"""Hugging Face interop: safetensors directories <-> Llama (config.json: models.hf_config).

Supported: the families of hf_config.ARCHS (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3
text), tied or untied embeddings. Anything that would silently change the math is refused
with an error naming the field. Weights are read with numpy (memory-mapped) and become jax
arrays once.

The intermediate format shared with the GGUF loader is an HF-named dict of numpy arrays in
HF layout (Linear weights [out, in]); `model_from_hf_tensors` turns it into a `Llama`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rskd_jax.models.config import config_from_hf
from rskd_jax.models.hf_config import ARCHS, config_to_hf  # noqa: F401 (API)
from rskd_jax.models.llama import DTYPES, Llama, LlamaConfig
from rskd_jax.models.safetensors_mmap import MappedSafetensors, read_slice

_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------- weights

_LAYER_NAMES = {  # our stacked name -> HF per-layer name
    "attn_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
# Gemma 2/3 name their four norms after their place: post_attention_layernorm is the norm of
# the attention output, not the MLP input.
_SANDWICH_NAMES = {
    **_LAYER_NAMES,
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
}


def layer_names(config: LlamaConfig) -> dict[str, str]:
    """Our stacked parameter name -> the HF per-layer tensor name, for this config."""
    return _SANDWICH_NAMES if config.sandwich_norms else _LAYER_NAMES


def _to_ours(name: str, w: np.ndarray, c: LlamaConfig) -> np.ndarray:
    """One layer's HF tensor -> our per-layer layout (a reshape: both are [out, in])."""
    h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
    shapes = {
        "q_proj": (h, e, -1),
        "k_proj": (k, e, -1),
        "v_proj": (k, e, -1),
        "o_proj": (-1, h, e),
        "q_bias": (h, e),
        "k_bias": (k, e),
        "v_bias": (k, e),
    }
    return w.reshape(shapes[name]) if name in shapes else w


def _to_hf(name: str, w: np.ndarray) -> np.ndarray:
    """Inverse of _to_ours for one layer."""
    if name in ("q_proj", "k_proj", "v_proj"):
        return w.reshape(-1, w.shape[-1])
    if name == "o_proj":
        return w.reshape(w.shape[0], -1)
    if name in ("q_bias", "k_bias", "v_bias"):
        return w.reshape(-1)
    return w


def _check_shape(var: nnx.Param, shape: tuple[int, ...], name: str) -> None:
    want = tuple(var.get_value().shape)
    if tuple(shape) != want:
        raise ValueError(f"weight {name}: shape {tuple(shape)}, model expects {want}")


def _place(var: nnx.Param, shape: tuple[int, ...], read: Callable, name: str, dtype, sharding) -> None:
    """Sets `var` to the array of `shape` whose slice `idx` is read(idx) (numpy, any dtype).

    sharding None: read whole and put on the default device (the unsharded load). Else each
    of this process's devices gets its shard, read on its own (read(idx) for that device's
    index), converted to the param dtype and put on that device, then the shards are assembled
    (what jax.make_array_from_callback does). PERF: one shard at a time, so the host holds one
    shard, not make_array_from_callback's list of every device's host copy.
    """
    _check_shape(var, shape, name)
    if sharding is None:
        var.set_value(jnp.asarray(np.ascontiguousarray(read(tuple(slice(None) for _ in shape))), dtype=dtype))
        return
    shards = []
    for device, idx in sharding.addressable_devices_indices_map(shape).items():
        shards.append(jax.device_put(np.asarray(read(idx), dtype=dtype), device).block_until_ready())
    var.set_value(jax.make_array_from_single_device_arrays(shape, sharding, shards))


def model_from_hf_tensors(
    config: LlamaConfig, tensors: Mapping[str, np.ndarray], fingerprint: str, mesh: Mesh | None = None
) -> Llama:
    """Build a Llama from HF-named numpy tensors without a random init (one copy to jax).

    mesh: place every parameter straight into its NamedSharding on `mesh`, the one the
    programs jit with (`sharding.param_shardings` of the model's logical axis names). Each
    device's shard is read from `tensors` per layer (slices of memory-mapped arrays for
    `load_hf_dir`: only the bytes that device needs) and converted to param_dtype on its own;
    no parameter is stacked whole in host memory or put on one device.
    """
    c = config
    pd = DTYPES[c.param_dtype]
    model = nnx.eval_shape(lambda: Llama(c, rngs=nnx.Rngs(0), fingerprint=fingerprint))
    shardings: dict = {"layers": {}}
    if mesh is not None:
        from rskd_jax.sharding import param_shardings

        shardings = nnx.to_pure_dict(param_shardings(nnx.state(model, nnx.Param), mesh))
    used = set()

    def get(name):
        if name not in tensors:
            raise ValueError(f"checkpoint lacks tensor {name!r}")
        used.add(name)
        return name

    def whole(ours, hf_name):
        shape, sharding = tensors[get(hf_name)].shape, shardings.get(ours)

        def read(idx):  # sharded: read_slice, a fresh memory map per block of rows
            return tensors[hf_name][idx] if sharding is None else read_slice(lambda: tensors[hf_name], idx)

        _place(getattr(model, ours), shape, read, hf_name, pd, sharding)

    whole("embed", "model.embed_tokens.weight")
    whole("final_norm", "model.norm.weight")
    if not c.tie_embeddings:
        whole("lm_head", "lm_head.weight")
    elif "lm_head.weight" in tensors:
        used.add("lm_head.weight")  # some tied checkpoints store the copy; it is the embedding
    n = c.num_layers
    for ours, theirs in layer_names(c).items():
        if not hasattr(model.layers, ours):
            continue
        names = [get(f"model.layers.{i}.{theirs}") for i in range(n)]

        def layer(i, ours=ours, names=names):  # a fresh (memory-mapped) view per read
            return _to_ours(ours, tensors[names[i]], c)

        sharding = shardings["layers"].get(ours)

        def read(idx, layer=layer, sharded=sharding is not None):
            if not sharded:
                return np.stack([layer(i) for i in range(n)])
            return np.stack([read_slice(lambda i=i: layer(i), idx[1:]) for i in range(*idx[0].indices(n))])

        shape = (n, *layer(0).shape)
        _place(getattr(model.layers, ours), shape, read, f"model.layers.*.{theirs}", pd, sharding)
    extra = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_TENSOR_SUFFIXES))
    if extra:
        raise ValueError(
            f"checkpoint has tensors this architecture does not use: {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    return model


def hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The model's weights as HF-named numpy arrays in HF layout (param dtype)."""
    c = model.config
    out = {
        "model.embed_tokens.weight": np.asarray(model.embed[...]),
        "model.norm.weight": np.asarray(model.final_norm[...]),
    }
    if not c.tie_embeddings:
        out["lm_head.weight"] = np.asarray(model.lm_head[...])
    for ours, theirs in layer_names(c).items():
        if not hasattr(model.layers, ours):
            continue
        stacked = np.asarray(getattr(model.layers, ours)[...])
        for i in range(c.num_layers):
            out[f"model.layers.{i}.{theirs}"] = _to_hf(ours, stacked[i])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------- directories


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{path} has no *.safetensors files (pytorch_model.bin is not "
            "supported; re-save with safe_serialization=True)"
        )
    return files


def _sha256_files(files: list[Path], h=None) -> hashlib._Hash:
    h = h or hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h


def source_fingerprint(source_digest: str, config: LlamaConfig) -> str:
    """sha256 hex over the source files' digest and the resolved config (incl. dtypes)."""
    blob = json.dumps({"source": source_digest, "config": config.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_hf_dir(path: str | os.PathLike, *, mesh: Mesh | None = None, **overrides) -> Llama:
    """A Llama from an HF directory (config.json + *.safetensors, sharded or not).

    overrides: LlamaConfig fields (dtype, param_dtype, remat) applied on top of config.json.
    mesh: the sharded load (model_from_hf_tensors): the files are memory-mapped and each
    device reads only its shard. Without a mesh every tensor is read into host memory and the
    parameters are put on the default device.
    """
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    config = config_from_hf(hf, **overrides)
    files = _safetensors_files(path)
    digest = _sha256_files([path / "config.json", *files]).hexdigest()
    if mesh is not None:
        tensors: Mapping[str, np.ndarray] = MappedSafetensors(files)
    else:
        from safetensors import safe_open

        tensors = {}
        for f in files:
            with safe_open(str(f), framework="np") as st:
                for name in st.keys():
                    tensors[name] = st.get_tensor(name)
    return model_from_hf_tensors(config, tensors, source_fingerprint(digest, config), mesh)


def save_pretrained(model: Llama, out_dir: str | os.PathLike, *, arch: str | None = None) -> None:
    """Write config.json + model.safetensors that transformers' from_pretrained loads."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(model.config, arch)
    tensors = hf_tensors(model)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
