"""rskd_jax.compare.bootstrap: the paired bootstrap interval of the gap closed.

Rows are simulated with a known population gap: each row has a difficulty shared by the three
students (what makes pairing matter) and student-specific noise. Tolerances come from the
binomial standard error of the coverage over the simulated datasets.
"""

import numpy as np
import pytest

from rskd_jax.compare import bootstrap


def _dataset(rng, rows: int, gap: float):
    """Per-row sums of three students whose population losses are 6.0 (CE), 5.0 (full KD) and
    6.0 - gap (method): 100 * gap % of the gap closed. Row lengths vary (pooled = token-weighted)."""
    count = rng.integers(50, 250, size=rows).astype(np.float64)
    difficulty = rng.normal(0.0, 0.8, size=rows)  # shared by the students
    out = []
    for mean in (6.0, 5.0, 6.0 - gap):
        per_token = mean + difficulty + rng.normal(0.0, 0.15, size=rows)
        out.append({"val": {"nll_sum": (per_token * count).tolist(), "count": count.tolist()}})
    return out


def test_interval_covers_the_population_gap_at_its_level():
    rng = np.random.default_rng(0)
    sims, truth = 200, 60.0
    hits = 0
    for i in range(sims):
        ce, full, m = _dataset(rng, rows=120, gap=truth / 100.0)
        ci = bootstrap.gap_interval(ce, full, m, ["val"], reps=400, seed=i)
        hits += ci["lo"] <= truth <= ci["hi"]
    se = np.sqrt(0.95 * 0.05 / sims)
    assert abs(hits / sims - 0.95) < 3.5 * se, hits  # 3.5 SE of a binomial proportion


def test_interval_has_power_and_pairing_narrows_it():
    rng = np.random.default_rng(1)
    ce, full, m = _dataset(rng, rows=120, gap=0.6)
    ci = bootstrap.gap_interval(ce, full, m, ["val"], reps=1000)
    assert not ci["lo"] <= 80.0 <= ci["hi"]  # a 20-point difference is resolved at 120 rows
    # unpaired: the method's rows resampled independently of the ends' rows (another seed)
    idx_a = bootstrap.resample_indices({"val": 120}, 1000, 0)
    idx_b = bootstrap.resample_indices({"val": 120}, 1000, 1)
    l_ce, l_full = (bootstrap.pooled_losses(x, ["val"], idx_a) for x in (ce, full))
    unpaired = 100 * (l_ce - bootstrap.pooled_losses(m, ["val"], idx_b)) / (l_ce - l_full)
    assert ci["se"] * 3 < np.std(unpaired)


def test_strata_keep_their_row_counts_and_pooling_is_token_weighted():
    a = {"s": {"nll_sum": [10.0, 20.0], "count": [10.0, 10.0]}, "t": {"nll_sum": [300.0], "count": [100.0]}}
    idx = {"s": np.array([[0, 1]]), "t": np.array([[0]])}
    assert bootstrap.pooled_losses(a, ["s", "t"], idx)[0] == pytest.approx(330.0 / 120.0)
    idx = bootstrap.resample_indices({"s": 2, "t": 1}, 50, 0)
    assert idx["t"].shape == (50, 1) and np.all(idx["t"] == 0)  # a one-row stratum stays that row


def test_unpaired_rows_give_no_interval():
    ce = {"v": {"nll_sum": [1.0, 2.0], "count": [1.0, 1.0]}}
    other = {"v": {"nll_sum": [1.0, 2.0], "count": [1.0, 2.0]}}  # not the same rows' tokens
    assert bootstrap.gap_interval(ce, ce, other, ["v"]) is None


def test_difference_interval_covers_the_population_difference():
    rng = np.random.default_rng(2)
    sims, hits = 200, 0
    for i in range(sims):
        ce, _, m = _dataset(rng, rows=80, gap=0.3)  # population L_m - L_ce = -0.3
        d = bootstrap.difference_interval(m, ce, ["val"], reps=400, seed=i)
        hits += d["lo"] <= -0.3 <= d["hi"]
    assert abs(hits / sims - 0.95) < 3.5 * np.sqrt(0.95 * 0.05 / sims), hits


def test_paired_diff_tool_reads_a_run_state(tmp_path, capsys):
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "paired_diff.py")
    spec = importlib.util.spec_from_file_location("paired_diff", path)  # tools/ is not a package
    paired_diff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paired_diff)

    rng = np.random.default_rng(4)
    ce, full, m = _dataset(rng, rows=40, gap=0.5)
    rows = {"ce": {"val_x": ce["val"], "val_y": full["val"]}, "m": {"val_x": m["val"], "val_y": full["val"]}}
    (tmp_path / "state.json").write_text(json.dumps({"stages": {"eval": {"result": {"row_sums": rows}}}}))
    assert paired_diff.main(["--run", str(tmp_path), "m", "ce", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["y"]["diff"] == 0.0 and out["x"]["lo"] <= out["x"]["diff"] <= out["x"]["hi"] < 0
    with pytest.raises(SystemExit):
        paired_diff.main(["--run", str(tmp_path), "m", "nope"])
