"""rskd_jax.cache_step on its own: the step's shared sampling trees and its kept LM head change
no stored value. A padded vocabulary (the model's V = 1,037 > the tokenizer's 1,000, not a
multiple of the tree's 16: masked ids share a leaf row with live ones), several micro-batches
and position chunks, and outputs on and off the shared tree (temperature 1 or not).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rskd_jax import cache_step, sampling
from rskd_jax.config import CacheRun, load_config
from rskd_jax.model_spec import build_model

TOKENIZER_V, MODEL_V = 1000, 1037
OUTPUTS = (
    "[{name: s, method: sample, num_draws: 24}, {name: y, method: systematic, num_draws: 16},"
    " {name: t, method: sample, num_draws: 12, temperature: 0.8},"
    " {name: h, method: head_tail, head: 2, num_draws: 8}]"
)


@pytest.fixture(scope="module")
def run():
    return load_config(
        CacheRun,
        None,
        [
            "cache.tokens=unused",
            "cache.output=unused",
            f"cache.outputs={OUTPUTS}",
            "teacher.source=random",
            "teacher.hidden_size=32",
            "teacher.intermediate_size=64",
            "teacher.num_layers=1",
            "teacher.num_heads=2",
            "teacher.num_kv_heads=1",
            f"teacher.vocab_size={MODEL_V}",
        ],
    )


def test_outputs_draw_the_same_from_the_shared_trees(run):
    """output_targets with the step's temperature-1 trees (`tree_P`) stores what each sampler
    stores alone; the diagnostics from the trees match float64."""
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 6, MODEL_V)) * 3).astype(np.float32)
    logits[..., TOKENIZER_V:] = -np.inf  # as mask_padded_vocab leaves them
    logits_BxCxV = jnp.asarray(logits)
    keys_BxC = jax.random.split(jax.random.key(1), 12).reshape(2, 6)
    next_BxC = jnp.asarray(rng.integers(0, TOKENIZER_V, (2, 6)), jnp.int32)

    @jax.jit
    def shared(keys_BxC, logits_BxCxV, next_BxC):
        tree_P = jax.vmap(sampling.mass_tree)(logits_BxCxV.reshape(-1, MODEL_V))
        res = {
            o.name: cache_step.output_targets(o, keys_BxC, logits_BxCxV, TOKENIZER_V, tree_P) for o in run.cache.outputs
        }
        return res, cache_step.diagnostics(logits_BxCxV, next_BxC, tree_P)

    @jax.jit
    def alone(keys_BxC, logits_BxCxV, next_BxC):
        res = {o.name: cache_step.output_targets(o, keys_BxC, logits_BxCxV, TOKENIZER_V) for o in run.cache.outputs}
        return res, cache_step.diagnostics(logits_BxCxV, next_BxC)

    got, diag = shared(keys_BxC, logits_BxCxV, next_BxC)
    want, diag_alone = alone(keys_BxC, logits_BxCxV, next_BxC)
    for name in want:
        assert sorted(got[name]) == sorted(want[name])
        for k in want[name]:
            np.testing.assert_array_equal(got[name][k], want[name][k], err_msg=f"{name}.{k}")
        assert (np.asarray(got[name]["ids"]) < TOKENIZER_V).all()
    x = logits.astype(np.float64)
    log_z = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    logp = x - log_z[..., None]
    entropy = -(np.exp(logp) * np.where(np.isfinite(logp), logp, 0.0)).sum(-1)
    gold = np.take_along_axis(logp, np.asarray(next_BxC)[..., None], -1)[..., 0]
    for d in (diag, diag_alone):
        np.testing.assert_allclose(d["log_z"], log_z, rtol=1e-6)
        np.testing.assert_allclose(d["entropy"], entropy, rtol=1e-5)
        np.testing.assert_allclose(d["gold_logprob"], gold, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # compiles the step twice; test-fast keeps the shared-tree test above
def test_step_with_the_kept_lm_head_is_the_same_step(run):
    """make_step's head_DxV (the LM head the cache keeps on CPU, `lm_head_once`) gives the same
    outputs bit for bit as the step taking it from the state: 2 micro-batches of 2 rows,
    4 LM-head chunks of 4 positions per row."""
    model = build_model(run.teacher, TOKENIZER_V)
    graphdef, state = nnx.split(model)
    head_DxV = cache_step.lm_head_once(graphdef, state, jax.devices()[:1])
    assert head_DxV is not None and head_DxV.shape == (32, MODEL_V)
    np.testing.assert_array_equal(head_DxV, model.lm_head_weight())
    step = jax.jit(
        cache_step.make_step(
            graphdef,
            run.cache.outputs,
            seed=3,
            vocab_size=TOKENIZER_V,
            with_diagnostics=True,
            device_batch=2,
            positions=4,
        )
    )
    tokens_BxL = jnp.asarray(np.random.default_rng(2).integers(0, TOKENIZER_V, (4, 16)), jnp.int32)
    rows_B, split = jnp.arange(4, dtype=jnp.int32), jnp.int32(0)
    a = jax.tree.map(np.asarray, step(state, tokens_BxL, rows_B, split))
    b = jax.tree.map(np.asarray, step(state, tokens_BxL, rows_B, split, None, head_DxV))
    doubled = step(state, tokens_BxL, rows_B, split, None, head_DxV * 2)  # the step reads the head it is given
    assert np.abs(np.asarray(doubled["diagnostics"]["entropy"]) - a["diagnostics"]["entropy"]).max() > 0.01
    assert a["finite"].all()
    for path, x in jax.tree_util.tree_flatten_with_path(a)[0]:
        y = b
        for k in path:
            y = y[k.key]
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert (a["s"]["ids"] < TOKENIZER_V).all() and (a["s"]["counts"].sum(-1) == 24).all()
