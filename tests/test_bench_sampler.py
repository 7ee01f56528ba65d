"""tools/bench_sampler.py: its Gumbel-top-k baseline has the law of sample_tokens(replace=False)
(so the side-by-side timing compares like with like), and a tiny run reports every ratio."""

import importlib.util
import os

import jax
import numpy as np
import pytest
from scipy import stats
from test_sampling import (
    ALPHA,
    WOR_K,
    WOR_M,
    WOR_V,
    _ordered_law,
    _tuple_index,
    _wor_logits,
    chisquare_pvalue,
    softmax64,
)

from rskd_jax.sampling import sample_tokens, systematic_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    """tools/bench_sampler.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_sampler", os.path.join(ROOT, "tools/bench_sampler.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # benchmark baselines: test-fast keeps the samplers' own law tests
def test_gumbel_baseline_has_the_same_law():
    logits = _wor_logits()
    ids, w = jax.jit(_bench().gumbel_top_k, static_argnums=2)(
        jax.random.key(40), np.broadcast_to(logits, (WOR_M, WOR_V)), WOR_K
    )
    cells = _tuple_index(np.asarray(ids), WOR_V)
    assert chisquare_pvalue(cells, _ordered_law(softmax64(logits), WOR_K)) > ALPHA
    st = sample_tokens(jax.random.key(41), np.broadcast_to(logits, (WOR_M, WOR_V)), WOR_K, replace=False)
    # the total weight (ids and kappa), rounded alike (float32 pi = 1 atoms; see test_sampling)
    a, b = (np.round(np.asarray(x, np.float64), 4).sum(-1) for x in (w, st.weights))
    assert stats.ks_2samp(a, b).pvalue > ALPHA


@pytest.mark.slow
def test_tiny_run_reports_every_ratio():
    out = _bench().run(vocab=300, num_draws=5, positions=4, scale=2.0, reps=2, naive_reps=1, seed=0)
    names = {"naive_categorical", "sample_tokens_replace", "sample_tokens_no_replace", "gumbel_top_k_no_replace"}
    assert names <= set(out["ratio_vs_log_softmax"]) and out["ratio_vs_log_softmax"]["log_softmax"] == 1.0
    assert out["reps"]["naive_categorical"] == 1 and out["reps"]["log_softmax"] == 2
    assert out["no_replace_speedup_vs_gumbel"] > 0 and out["systematic_speedup_vs_cumsum"] > 0


def test_systematic_baseline_gives_the_same_counts():
    """The cumsum baseline and the tree walk locate the same u's points (ties aside: none here)."""
    logits = np.random.default_rng(3).normal(size=(32, 1000)).astype(np.float32) * 3.0
    logits[:, ::7] = -np.inf
    ids, counts = jax.jit(_bench().systematic_cumsum, static_argnums=2)(jax.random.key(5), logits, 20)
    sc = systematic_counts(jax.random.key(5), logits, 20)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(sc.ids))
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(sc.counts))
