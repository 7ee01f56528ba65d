"""Benchmark the sparse-target samplers against a naive N-draw categorical and a log_softmax.

    python tools/bench_sampler.py                      # readable table
    python tools/bench_sampler.py --json               # one JSON object of figures
    python tools/bench_sampler.py --json --num-draws 12 50   # a JSON list, one object per N

All candidates see the same teacher logits [P, V] (Gaussian * scale: peaked like an LM, ~13
unique ids in 50 draws at V = 49,152). Each is jit-compiled and warmed up, then timed with
block_until_ready in interleaved rounds (every candidate once per round, round-robin, so
machine-load drift hits all alike); the figures are medians over rounds. The naive sampler
(`jax.random.categorical` with shape (N, P): N x V Gumbel noise) is slow and runs in only the
first --naive-reps rounds. The variance-reduced unbiased samplers run beside them:
`systematic_counts` (N stratified points of the CDF) and `head_tail_h4` (top-4 exact + N tail
draws). Without replacement, `sample_tokens(..., replace=False)` (sequential
draws down the sampling tree) runs beside `gumbel_top_k_no_replace`, the first sampler's
algorithm (V Gumbels per position + top_k, kept here as the baseline), same k and logits;
`systematic_cumsum` is the first systematic sampler (a cumsum + cummax + nonzero over V per
position, kept as the baseline of `systematic_counts`, which walks the sampling tree).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from rskd_jax.sampling import head_tail_targets, sample_counts, sample_tokens, systematic_counts, top_k_targets


def gumbel_top_k(key, logits_PxV, k):
    """The first without-replacement sampler (same law and weights as sample_tokens(...,
    replace=False), other draws): per position V Gumbels, top_k(k + 1), w = t / pi with
    pi = 1 - exp(-exp(l - kappa)), kappa the (k+1)-th perturbed value. ids, weights [P, k]."""

    def one(key, l_V):
        perturbed_V = l_V + jax.random.gumbel(key, l_V.shape, jnp.float32)
        # PERF: the barrier keeps XLA's fast TopK on CPU (see sampling._top_k).
        top_K1, idx_K1 = jax.lax.optimization_barrier(jax.lax.top_k(perturbed_V, k + 1))
        valid_K = top_K1[:k] > -jnp.inf
        gap_K = jnp.where(valid_K, l_V[idx_K1[:k]] - top_K1[k], 0.0)
        log_w_K = l_V[idx_K1[:k]] - jax.nn.logsumexp(l_V) - jnp.log(-jnp.expm1(-jnp.exp(gap_K)))
        return jnp.where(valid_K, idx_K1[:k], 0), jnp.where(valid_K, jnp.exp(log_w_K), 0.0)

    keys_P = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(logits_PxV.shape[0]))
    return jax.vmap(one)(keys_P, logits_PxV)


def systematic_cumsum(key, logits_PxV, num_draws):
    """The first systematic sampler (same law as systematic_counts, temperature 1): per
    position the CDF by a cumsum over V made monotone by a cummax, F_i = ceil(N cdf_i - u),
    ids by nonzero. ids, counts [P, N]."""

    def one(key, s_V):
        e_V = jnp.exp(s_V - jnp.max(s_V))
        cdf_V = jax.lax.cummax(jnp.where(e_V > 0, jnp.cumsum(e_V), 0.0))
        u = jax.random.uniform(key, (), jnp.float32)
        f_V = jnp.clip(jnp.ceil(num_draws * (cdf_V / cdf_V[-1]) - u), 0, num_draws).astype(jnp.int32)
        c_V = jnp.diff(f_V, prepend=0)
        (ids_N,) = jnp.nonzero(c_V > 0, size=num_draws, fill_value=0)
        return ids_N, jnp.where(jnp.arange(num_draws) < jnp.sum(c_V > 0), c_V[ids_N], 0)

    keys_P = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(logits_PxV.shape[0]))
    return jax.vmap(one)(keys_P, logits_PxV)


def build_candidates(num_draws: int):
    """name -> jitted fn(key, logits_PxV)."""

    def naive(key, logits_PxV):
        return jax.random.categorical(key, logits_PxV, shape=(num_draws, logits_PxV.shape[0]))

    return {
        "naive_categorical": jax.jit(naive),
        "sample_tokens_replace": jax.jit(lambda k, l: sample_tokens(k, l, num_draws)),
        "sample_tokens_no_replace": jax.jit(lambda k, l: sample_tokens(k, l, num_draws, replace=False)),
        "gumbel_top_k_no_replace": jax.jit(lambda k, l: gumbel_top_k(k, l, num_draws)),
        "systematic_counts": jax.jit(lambda k, l: systematic_counts(k, l, num_draws)),
        "systematic_cumsum": jax.jit(lambda k, l: systematic_cumsum(k, l, num_draws)),
        # the head (h = 4) kept exactly, N draws from the tail
        "head_tail_h4": jax.jit(lambda k, l: head_tail_targets(k, l, 4, num_draws)),
        "top_k_targets": jax.jit(lambda k, l: top_k_targets(l, num_draws)),
        "log_softmax": jax.jit(lambda k, l: jax.nn.log_softmax(l, axis=-1)),
    }


def timed(fn, key, logits_PxV) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(key, logits_PxV))
    return time.perf_counter() - start


def run(vocab: int, num_draws: int, positions: int, scale: float, reps: int, naive_reps: int, seed: int) -> dict:
    load_before = os.getloadavg()[0]
    key = jax.random.key(seed)
    normal_PxV = jax.random.normal(jax.random.fold_in(key, 1), (positions, vocab), jnp.float32)
    logits_PxV = normal_PxV * scale
    candidates = build_candidates(num_draws)
    if naive_reps <= 0:
        candidates.pop("naive_categorical")
    compile_s = {}
    for name, fn in candidates.items():  # compile + one warm-up call each
        compile_s[name] = timed(fn, key, logits_PxV)
        timed(fn, key, logits_PxV)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for rep in range(reps):
        rep_key = jax.random.fold_in(key, 100 + rep)
        for name, fn in candidates.items():
            if name == "naive_categorical" and rep >= naive_reps:
                continue
            times[name].append(timed(fn, rep_key, logits_PxV))
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    lsm = seconds["log_softmax"]
    counts = sample_counts(key, logits_PxV, num_draws).counts
    out = {
        "vocab": vocab,
        "num_draws": num_draws,
        "positions": positions,
        "logit_scale": scale,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "reps": {name: len(ts) for name, ts in times.items()},
        "seconds_per_call": seconds,
        "seconds_min": {name: min(ts) for name, ts in times.items()},
        "first_call_seconds": compile_s,
        "ratio_vs_log_softmax": {name: s / lsm for name, s in seconds.items()},
        "mean_unique_ids": float(jnp.mean(jnp.sum(counts > 0, axis=-1))),
        # Shared machine: the 1-minute load average before and after (interleaving keeps the
        # ratios fair; absolute seconds grow with load).
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "cpu_count": os.cpu_count(),
    }
    out["no_replace_speedup_vs_gumbel"] = seconds["gumbel_top_k_no_replace"] / seconds["sample_tokens_no_replace"]
    out["systematic_speedup_vs_cumsum"] = seconds["systematic_cumsum"] / seconds["systematic_counts"]
    if "naive_categorical" in seconds:
        naive_s = seconds["naive_categorical"]
        out["speedup_vs_naive"] = {name: naive_s / s for name, s in seconds.items()}
    return out


def table(result: dict) -> str:
    lines = [
        f"V={result['vocab']}  N={result['num_draws']}  positions={result['positions']}  "
        f"scale={result['logit_scale']}  backend={result['backend']}  "
        f"mean unique ids (replace=True)={result['mean_unique_ids']:.1f}  "
        f"load average {result['load_average_1m'][0]:.1f} -> {result['load_average_1m'][1]:.1f}",
        f"{'candidate':<26}{'median s':>12}{'x log_softmax':>15}{'x faster than naive':>22}{'reps':>6}",
    ]
    for name, s in result["seconds_per_call"].items():
        speedup = result.get("speedup_vs_naive", {}).get(name)
        lines.append(
            f"{name:<26}{s:>12.4f}{result['ratio_vs_log_softmax'][name]:>15.2f}"
            f"{(f'{speedup:.1f}' if speedup else '-'):>22}{result['reps'][name]:>6}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--num-draws", type=int, nargs="+", default=[50], help="N (or k); several: one run each")
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--scale", type=float, default=6.0, help="logits = N(0, 1) * scale")
    parser.add_argument("--reps", type=int, default=15, help="timed rounds")
    parser.add_argument("--naive-reps", type=int, default=3, help="rounds that include the naive sampler (0: skip it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = [
        run(args.vocab, n, args.positions, args.scale, args.reps, args.naive_reps, args.seed) for n in args.num_draws
    ]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        print("\n\n".join(table(r) for r in results))


if __name__ == "__main__":
    main()
