"""Paired bootstrap over val rows: a confidence interval for the % of the gap closed.

Every student is evaluated on the same val rows, so one resample of rows (with replacement,
within each source: the mix keeps its per-source row counts) re-pools the CE, full-KD and
method losses together; the interval is the 2.5 and 97.5 percentiles of the resampled gaps.
It measures how much the figure depends on which val rows were evaluated, not the seed of the
store or of the data order (those need retrained students).

Pure numpy; inputs are the eval stage's `row_sums` ({split: {"nll_sum": [R], "count": [R]}}).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RowSums = Mapping[str, Mapping[str, Sequence[float]]]  # split -> {"nll_sum": [R], "count": [R]}


def resample_indices(rows_per_split: Mapping[str, int], reps: int, seed: int) -> dict[str, np.ndarray]:
    """{split: [reps, R] row indices drawn with replacement within the split}.

    >>> idx = resample_indices({"a": 3, "b": 2}, 4, 0)
    >>> idx["a"].shape, idx["b"].shape, int(idx["a"].max()) < 3
    ((4, 3), (4, 2), True)
    """
    rng = np.random.default_rng(seed)
    return {s: rng.integers(0, n, size=(reps, n)) for s, n in sorted(rows_per_split.items())}


def pooled_losses(row_sums: RowSums, splits: Sequence[str], idx: Mapping[str, np.ndarray]) -> np.ndarray:
    """[reps] pooled val loss (sum nll / sum labels) of the resampled rows of `splits`."""
    nll = sum(np.asarray(row_sums[s]["nll_sum"], np.float64)[idx[s]].sum(axis=1) for s in splits)
    count = sum(np.asarray(row_sums[s]["count"], np.float64)[idx[s]].sum(axis=1) for s in splits)
    return nll / count


def gap_interval(
    ce: RowSums,
    full: RowSums,
    method: RowSums,
    splits: Sequence[str],
    *,
    reps: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float] | None:
    """{"lo", "hi", "se"} of 100 (L_CE - L) / (L_CE - L_full) over `splits` pooled, from `reps`
    paired resamples (the same rows for the three students); None if the rows disagree.

    >>> ce = {"a": {"nll_sum": [6.0, 6.2, 5.8, 6.1], "count": [1, 1, 1, 1]}}
    >>> full = {"a": {"nll_sum": [5.0, 5.1, 4.9, 5.0], "count": [1, 1, 1, 1]}}
    >>> half = {"a": {"nll_sum": [5.5, 5.65, 5.35, 5.55], "count": [1, 1, 1, 1]}}
    >>> ci = gap_interval(ce, full, half, ["a"], reps=200)
    >>> ci["lo"] <= 50.0 <= ci["hi"]
    True
    """
    sizes = {s: len(ce[s]["count"]) for s in splits}
    if any(
        len(x[s]["count"]) != n or list(x[s]["count"]) != list(ce[s]["count"])
        for x in (full, method)
        for s, n in sizes.items()
    ):
        return None  # not the same rows (or tokens): no pairing
    idx = resample_indices(sizes, reps, seed)
    l_ce, l_full, l_m = (pooled_losses(x, splits, idx) for x in (ce, full, method))
    denom = l_ce - l_full
    ok = np.abs(denom) > 1e-12
    gaps = 100.0 * (l_ce[ok] - l_m[ok]) / denom[ok]
    if gaps.size < reps // 2:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(gaps, [tail, 100.0 - tail])
    return {"lo": float(lo), "hi": float(hi), "se": float(np.std(gaps, ddof=1))}


def difference_interval(
    a: RowSums, b: RowSums, splits: Sequence[str], *, reps: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float] | None:
    """{"diff", "lo", "hi", "se"} of the pooled val loss L_a - L_b over `splits` (paired resamples of
    the same rows); None if the rows disagree.

    >>> a = {"v": {"nll_sum": [5.0, 6.0, 7.0], "count": [1, 1, 1]}}
    >>> b = {"v": {"nll_sum": [5.5, 6.5, 7.5], "count": [1, 1, 1]}}
    >>> d = difference_interval(a, b, ["v"], reps=100)
    >>> round(d["diff"], 6), round(d["lo"], 6), round(d["hi"], 6), round(d["se"], 6)
    (-0.5, -0.5, -0.5, 0.0)
    """
    if any(list(a[s]["count"]) != list(b[s]["count"]) for s in splits):
        return None
    everything = {s: np.arange(len(a[s]["count"]))[None] for s in splits}
    diff = float((pooled_losses(a, splits, everything) - pooled_losses(b, splits, everything))[0])
    idx = resample_indices({s: len(a[s]["count"]) for s in splits}, reps, seed)
    d = pooled_losses(a, splits, idx) - pooled_losses(b, splits, idx)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(d, [tail, 100.0 - tail])
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "se": float(np.std(d, ddof=1))}
