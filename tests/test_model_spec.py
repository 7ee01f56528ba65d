"""ModelSpec (a config section) and LlamaConfig share one schema: the section's architecture
keys are LlamaConfig's own field names, and a random model's config is derived from them."""

import dataclasses

from rskd_jax.config import ModelSpec
from rskd_jax.model_spec import NOT_ARCHITECTURE, build_model
from rskd_jax.models import LlamaConfig


def test_architecture_keys_are_llama_config_fields():
    spec_fields = {f.name: f for f in dataclasses.fields(ModelSpec)}
    llama_fields = {f.name: f for f in dataclasses.fields(LlamaConfig)}
    arch = set(spec_fields) - set(NOT_ARCHITECTURE)
    assert set(NOT_ARCHITECTURE) <= set(spec_fields)
    assert arch <= set(llama_fields), sorted(arch - set(llama_fields))
    for name in arch - {"vocab_size"}:  # vocab_size: None in the spec = the tokenizer's
        assert spec_fields[name].type == llama_fields[name].type, name


def test_random_model_config_is_the_spec():
    spec = ModelSpec(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=1, rope_theta=5e5, remat=True)
    config = build_model(spec, 48).config
    assert config == LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=192,
        num_layers=3,
        num_heads=4,
        num_kv_heads=1,
        head_dim=8,
        rope_theta=5e5,
        tie_embeddings=True,
        max_position_embeddings=2048,
        dtype="float32",
        param_dtype="float32",
        remat=True,
        attention="auto",
    )
    assert build_model(dataclasses.replace(spec, vocab_size=64, head_dim=16), 48).config.vocab_size == 64
    assert build_model(dataclasses.replace(spec, vocab_size=64, head_dim=16), 48).config.head_dim == 16
