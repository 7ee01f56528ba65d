"""Parity with transformers for each decoder family (tiny random float32 checkpoints, sequences
longer than every sliding window), HF export round trips, and refusal of what is not implemented.

Print the parity table: `python tests/test_families.py`.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from rskd_jax.models import LlamaConfig, from_pretrained, save_pretrained  # noqa: E402

forward = nnx.jit(lambda model, tokens: model(tokens))
SHAPE = dict(
    vocab_size=131,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
WINDOW, LENGTH = 24, 80  # every window is shorter than the sequence
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
# name: (HF config class, fields beyond SHAPE, a change of our config (same parameters) that
# must matter, or None)
FAMILIES = {
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, tie_word_embeddings=True), None),
    "qwen3_sliding": (
        transformers.Qwen3Config,
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        dict(sliding_window=None, layer_types=None),
    ),
    "mistral": (transformers.MistralConfig, dict(sliding_window=WINDOW), dict(sliding_window=None, layer_types=None)),
    "qwen2_yarn": (
        transformers.Qwen2Config,
        dict(rope_scaling=YARN, max_position_embeddings=128),
        dict(rope_scaling=None),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
        dict(attn_softcap=None),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            head_dim=16,
            num_hidden_layers=3,
            sliding_window=WINDOW,
            sliding_window_pattern=2,
            query_pre_attn_scalar=24,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
        dict(rope_local_theta=None),
    ),
}


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (2, LENGTH))


def _hf_logits(model, tokens):
    with torch.inference_mode():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def _ours(model, tokens):
    return np.asarray(forward(model, jnp.asarray(tokens, jnp.int32)))


def make_checkpoint(name, path):
    """A transformers model of family `name` with O(1) random weights, saved to `path`."""
    cls, fields, _ = FAMILIES[name]
    torch.manual_seed(0)
    config = cls(**{**SHAPE, **fields})
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    gemma = name.startswith("gemma")  # Gemma norms scale by (1 + w): centre them on 0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in pname and not gemma else 0.0))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, make_checkpoint(request.param, path), path


def parity(ref, ours, tokens):
    """(max |logit diff|, logit scale = max |HF logit|)."""
    want = _hf_logits(ref, tokens)
    return float(np.abs(_ours(ours, tokens) - want).max()), float(np.abs(want).max())


def test_logits_match_transformers(family):
    name, ref, path = family
    ours = from_pretrained(path)
    tokens = _tokens()
    diff, scale = parity(ref, ours, tokens)
    assert scale > 1.0 and diff <= 1e-4 * scale, (name, diff, scale)
    # The family's variation matters at this size: without it the logits are far off.
    if FAMILIES[name][2] is None:
        return
    changed = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: _like(ours, FAMILIES[name][2]))), nnx.state(ours))
    assert parity(ref, changed, tokens)[0] > 100 * max(diff, 1e-6), name


def _like(model, changes):
    from rskd_jax.models.llama import Llama

    return Llama(model.config.replace(**changes), rngs=nnx.Rngs(0))


def test_export_round_trip(family, tmp_path):
    name, _, path = family
    ours = from_pretrained(path)
    tokens = _tokens(seed=1)
    logits = _ours(ours, tokens)
    save_pretrained(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(back).__name__ == ours.config.to_hf()["architectures"][0]
    assert type(back).__name__ == FAMILIES[name][0].__name__.replace("TextConfig", "ForCausalLM").replace(
        "Config", "ForCausalLM"
    )
    np.testing.assert_allclose(_hf_logits(back, tokens), logits, rtol=0, atol=1e-4)
    reloaded = from_pretrained(tmp_path)
    assert reloaded.config == ours.config
    np.testing.assert_array_equal(_ours(reloaded, tokens), logits)


def test_xla_attention_and_bfloat16(family):
    """attention="xla" (jax.nn.dot_product_attention) also matches transformers; bfloat16 compute
    and storage run and stay close to float32."""
    name, ref, path = family
    tokens = _tokens(seed=3)
    diff, scale = parity(ref, from_pretrained(path, attention="xla"), tokens)
    assert diff <= 1e-4 * scale, (name, diff, scale)
    f32 = _ours(from_pretrained(path), tokens)
    bf16 = _ours(from_pretrained(path, dtype="bfloat16", param_dtype="bfloat16"), tokens)
    assert np.isfinite(bf16).all() and np.abs(bf16 - f32).max() <= 0.1 * np.abs(f32).max()


def test_chunked_head_keeps_the_final_softcap(family):
    """logits_from_hidden(hidden_states, lm_head_weight) is the model's logits (soft-cap too)."""
    _, _, path = family
    ours = from_pretrained(path)
    tokens = jnp.asarray(_tokens(seed=2), jnp.int32)
    via_parts = nnx.jit(lambda m, t: m.logits_from_hidden(m.hidden_states(t)[:, :8], m.lm_head_weight()[:, :50]))
    np.testing.assert_allclose(via_parts(ours, tokens), _ours(ours, tokens)[:, :8, :50], rtol=1e-6, atol=1e-6)


BASE = {
    "vocab_size": 97,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
}
QWEN3 = {**BASE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
GEMMA2 = {
    **BASE,
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "head_dim": 8,
    "sliding_window": 16,
    "hidden_activation": "gelu_pytorch_tanh",
}
GEMMA3 = {**GEMMA2, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
MISTRAL = {**BASE, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16}


@pytest.mark.parametrize(
    "hf, match",
    [
        ({**QWEN3, "attention_bias": True}, "attention_bias"),
        ({**QWEN3, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
        ({**GEMMA2, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({**GEMMA2, "hidden_activation": "gelu"}, "hidden_act"),
        ({**GEMMA2, "layer_types": ["chunked_attention"] * 3}, "chunked_attention"),
        ({**GEMMA3, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        (
            {
                **GEMMA3,
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                },
            },
            "sliding_attention",
        ),
        ({**MISTRAL, "layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types"),
        ({**BASE, "architectures": ["Gemma3ForConditionalGeneration"]}, "Gemma3ForConditionalGeneration"),
        ({**BASE, "architectures": ["LlamaForCausalLM"], "final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ],
)
def test_unimplemented_fields_are_refused_by_name(hf, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(hf)


def test_legacy_config_fields():
    """transformers 4.x config.json files (no layer_types / rope_parameters) read the same."""
    g2 = LlamaConfig.from_hf(GEMMA2)
    assert g2.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (g2.query_pre_attn_scalar, g2.tie_embeddings, g2.hidden_act) == (256, True, "gelu_tanh")
    g3 = LlamaConfig.from_hf(
        {
            **GEMMA3,
            "num_hidden_layers": 6,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "sliding_window_pattern": 3,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }
    )
    assert g3.sliding_layers == (True, True, False) * 2
    assert (g3.rope_theta, g3.rope_local_theta) == (1e6, 1e4)
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    q2 = LlamaConfig.from_hf(
        {
            **BASE,
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "use_sliding_window": True,
            "sliding_window": 16,
            "max_window_layers": 2,
        }
    )
    assert q2.sliding_layers == (False, False, True) and q2.qkv_bias
    off = LlamaConfig.from_hf(
        {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16, "use_sliding_window": False}
    )
    assert off.layer_types is None and off.sliding_window is None
    yarn = LlamaConfig.from_hf(
        {
            **BASE,
            "architectures": ["Qwen2ForCausalLM"],
            "max_position_embeddings": 128,
            "rope_scaling": {"type": "yarn", "factor": 4.0},
        }
    )
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}


if __name__ == "__main__":  # the parity table of the report
    import tempfile

    print("| family | HF class | max abs logit diff | logit scale | diff / scale | export round trip |")
    print("|---|---|---|---|---|---|")
    for name in FAMILIES:
        with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as out:
            ref = make_checkpoint(name, d)
            ours = from_pretrained(d)
            tokens = _tokens()
            diff, scale = parity(ref, ours, tokens)
            save_pretrained(ours, out)
            back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            trip = np.abs(_hf_logits(back.eval(), tokens) - _ours(ours, tokens)).max()
            same = np.array_equal(_ours(from_pretrained(out), tokens), _ours(ours, tokens))
            ok = "yes" if trip <= 1e-4 * scale and same else "NO"
            print(
                f"| {name} | {type(ref).__name__} | {diff:.2e} | {scale:.2f} | {diff / scale:.1e} "
                f"| {ok} (HF reload diff {trip:.1e}) |"
            )
