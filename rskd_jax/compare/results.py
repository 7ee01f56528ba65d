"""The results.json object, built from the stages' records in state.json (no models run).

One row per method: its targets, stored ids and bytes per token, val loss and ECE (pooled and
per source), % of the CE -> full-KD gap closed, KL and top-1 agreement to the teacher, step
time vs CE and the gradient check. docs/results/results.json is one of these.
"""

from __future__ import annotations

import json
from typing import Any

from rskd_jax.compare import bootstrap
from rskd_jax.config import config_to_dict

PAPER_UNIQUE_IDS = {4: 2.4, 13: 5.0, 50: 12.1, 150: 24.5}
TARGET_ARRAYS = ("ids", "counts", "weights", "num_ids", "tail_mass")
TEACHER_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "random": "random"}


def _output(cmp, store: str | None):
    return next((o for o in cmp.cfg.cache.outputs if o.name == store), None)


def describe(cmp, m) -> tuple[str, str]:
    """(family, human description of the targets) of a method."""
    if m.loss == "ce":
        return "ce", "labels only"
    if m.loss == "full_online":
        return "full", "full distribution, teacher online"
    o = _output(cmp, m.store)
    if o.method == "sample":
        tempered = o.temperature != 1.0
        return (
            "rskd_tempered" if tempered else "rskd",
            f"RS-KD N={o.num_draws}" + (f", proposal T={o.temperature:g}" if tempered else ""),
        )
    if o.method == "systematic":
        t = f", proposal T={o.temperature:g}" if o.temperature != 1.0 else ""
        return "systematic", f"systematic N={o.num_draws}" + t
    if o.method == "head_tail":
        t = f", tail proposal T={o.temperature:g}" if o.temperature != 1.0 else ""
        return "head_tail", f"head {o.head} + tail N={o.num_draws}" + t
    if o.method == "sample_wor":
        return (
            "wor_norm" if o.normalize else "wor",
            f"w/o replacement k={o.num_draws}" + (", self-normalised" if o.normalize else ""),
        )
    if o.method == "top_k":
        return "top_k", f"top-K {o.num_draws}"
    return o.method, f"{o.method} K={o.num_draws}"


# store methods whose stored weights are unbiased for the teacher's distribution (E[w_i] = t_i)
UNBIASED_STORES = frozenset({"sample", "systematic", "head_tail"})


def unbiased(cmp, m) -> bool:
    """Whether the method's KD targets equal the teacher's distribution in expectation (CE: no
    teacher targets; full KD: exactly; sample_wor only with its unnormalised weights)."""
    if m.loss in ("ce", "full_online"):
        return m.loss == "full_online"
    o = _output(cmp, m.store)
    return o.method in UNBIASED_STORES or (o.method == "sample_wor" and not o.normalize)


def read_metrics(run_dir: str, *, eval_records: bool) -> list[dict]:
    """A run's metrics.jsonl records: the eval ones, or the train-step ones."""
    from rskd_jax.runpath import read_text, run_path

    text = read_text(run_path(run_dir) / "metrics.jsonl")  # a local path or a URL
    if text is None:
        return []
    lines = text.splitlines()
    return [x for x in (json.loads(line) for line in lines if line.strip()) if bool(x.get("eval")) == eval_records]


def gap_closed(ce: float, full: float | None, v: float) -> float | None:
    """100 (ce - v) / (ce - full): % of the CE -> full-KD gap closed (None without full KD).

    >>> gap_closed(6.0, 5.0, 5.25), gap_closed(6.0, None, 5.0)
    (75.0, None)
    """
    if full is None or abs(ce - full) < 1e-12:
        return None
    return 100.0 * (ce - v) / (ce - full)


# |CE val loss here - in the reference run| above which the reference's full-KD row is refused
REFERENCE_TOLERANCE = 1e-6


def reference_full_row(path: str, ce_val: dict[str, float], srcs: list[str]) -> dict[str, Any]:
    """The full-KD row of an earlier results.json (`reproduce.reference`), provided its CE student
    evaluated to the same val losses as this run's (same data, student, init, order and eval)."""
    from rskd_jax.compare.state import CompareError

    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        rows = {row["method"]: row for row in old["methods"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CompareError(f"reproduce.reference {path}: not a results.json ({err})") from None
    full = next((row for row in rows.values() if row.get("loss") == "full_online"), None)
    if full is None or "ce" not in rows:
        raise CompareError(f"reproduce.reference {path} has no full_online row or no ce row")
    theirs = {"all": rows["ce"]["val_loss"], **{f"val_{s}": rows["ce"]["val_loss_by_source"].get(s) for s in srcs}}
    off = {
        k: (ce_val[k], theirs[k])
        for k in ce_val
        if theirs[k] is None or abs(ce_val[k] - theirs[k]) > REFERENCE_TOLERANCE
    }
    if off:
        raise CompareError(
            f"reproduce.reference {path} is another setting: its ce student's val loss differs from this run's "
            f"({', '.join(f'{k}: {a:.6f} here vs {b}' for k, (a, b) in off.items())}); train the full-KD student here"
        )
    return {**full, "unbiased": True, "reference": path}


def build_results(cmp, runs: dict) -> dict[str, Any]:
    """The results.json object, from the stages' records in state.json."""
    c, r = cmp.cfg, cmp.cfg.reproduce
    st = cmp.log.stages
    data, cache, ev = st["data"]["result"], st["cache"]["result"], st["eval"]["result"]
    grad, timing = st["grad"]["result"], st["timing"]["result"]
    srcs = [s.name for s in cmp.sources]
    keys = ["all", *[f"val_{s}" for s in srcs]]
    ce_name, full_name = r.ce_end, r.full_end
    ref = {k: ev["students"][ce_name][k]["val_loss"] for k in keys}
    ref_full = {k: ev["students"][full_name][k]["val_loss"] if full_name else None for k in keys}
    borrowed = None
    if full_name is None and r.reference:  # the full-KD student of an earlier, identical run
        borrowed = reference_full_row(r.reference, ref, srcs)
        ref_full = {"all": borrowed["val_loss"], **{f"val_{s}": borrowed["val_loss_by_source"][s] for s in srcs}}
    rows = [borrowed] if borrowed else []
    row_sums = ev.get("row_sums")  # per-row sums (evals before they were kept: no intervals)

    def interval(name: str, splits: list[str]) -> list[float] | None:
        if not row_sums or full_name is None or name in (ce_name, full_name):
            return None
        ci = bootstrap.gap_interval(row_sums[ce_name], row_sums[full_name], row_sums[name], splits)
        return None if ci is None else [round(ci["lo"], 2), round(ci["hi"], 2)]

    for m in r.methods:
        e, family_desc = ev["students"][m.name], describe(cmp, m)
        if m.set:  # the method's own train/loss/optim overrides
            family_desc = (family_desc[0], f"{family_desc[1]}; {', '.join(m.set)}")
        store = cache["stores"].get(m.store) if m.store else None
        by_array = store["bytes_per_token_by_array"] if store else {}
        g = grad["methods"].get(m.name)
        t = timing["methods"][m.name]
        train_recs = read_metrics(runs[m.name].train.output, eval_records=False)

        def by_src(f, e=e):
            return {s: e[f"val_{s}"].get(f) for s in srcs}

        rows.append(
            {
                "method": m.name,
                "loss": m.loss,
                "store": m.store,
                "family": family_desc[0],
                "targets": family_desc[1],
                "stored_ids": store["mean_unique_ids"] if store else None,
                "bytes_per_token": store["bytes_per_token"] if store else (0.0 if m.loss == "ce" else None),
                "target_bytes_per_token": sum(by_array.get(a) or 0.0 for a in TARGET_ARRAYS) if store else None,
                "unbiased": unbiased(cmp, m),
                "val_loss": e["all"]["val_loss"],
                "val_loss_by_source": by_src("val_loss"),
                "gap_closed_pct": gap_closed(ref["all"], ref_full["all"], e["all"]["val_loss"]),
                "gap_closed_pct_by_source": {
                    s: gap_closed(ref[f"val_{s}"], ref_full[f"val_{s}"], e[f"val_{s}"]["val_loss"]) for s in srcs
                },
                "gap_closed_ci95": interval(m.name, [f"val_{s}" for s in srcs]),
                "gap_closed_ci95_by_source": {s: interval(m.name, [f"val_{s}"]) for s in srcs},
                "ece": e["all"]["ece"],
                "ece_by_source": by_src("ece"),
                "accuracy": e["all"]["accuracy"],
                "kl_to_teacher": e["all"].get("kl_to_teacher"),
                "kl_to_teacher_by_source": by_src("kl_to_teacher"),
                "top1_agreement": e["all"].get("top1_agreement"),
                "step_time_s": t.get("step_s"),
                "step_time_rel_ce": t.get("step_time_rel_ce"),
                "step_time_source": t.get("step_time_source"),
                "run_tokens_per_s": t.get("run_tokens_per_s"),
                "grad_angle_deg": g["angle_deg"] if g else (0.0 if m.loss == "full_online" else None),
                "grad_angle_deg_std": g["angle_deg_std"] if g else None,
                "grad_norm_ratio": g["norm_ratio"] if g else (1.0 if m.loss == "full_online" else None),
                "grad_norm_ratio_std": g["norm_ratio_std"] if g else None,
                "train_seconds": st[f"train/{m.name}"]["seconds"],
                "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
                "eval_bins": e["all"]["bins"],
            }
        )
    sample_stores = [
        {
            "store": o.name,
            "num_draws": o.num_draws,
            "temperature": o.temperature,
            "mean_unique_ids": cache["stores"][o.name]["mean_unique_ids"],
        }
        for o in c.cache.outputs
        if o.method == "sample"
    ]
    teacher = ev["teacher"]
    steps = cmp.train_steps()
    seq_len = c.data.seq_len
    stage_seconds = {k: v["seconds"] for k, v in st.items() if k != "report"}
    return {
        "title": (
            f"{TEACHER_NAMES.get(c.teacher.source, c.teacher.source)} teacher -> d={c.student.hidden_size} x "
            f"{c.student.num_layers}-layer "
            f"students, {steps * c.train.batch_size * seq_len:,} training tokens ({' + '.join(srcs)})"
        ),
        "methods": rows,
        "gap_ends": [ce_name, borrowed["method"] if borrowed else full_name],
        "teacher": {
            "val_loss": teacher["all"]["val_loss"],
            "ece": teacher["all"]["ece"],
            "val_loss_by_source": {s: teacher[f"val_{s}"]["val_loss"] for s in srcs},
        },
        "unique_ids": sample_stores,
        "paper_unique_ids": {str(k): v for k, v in PAPER_UNIQUE_IDS.items()},
        "setup": {
            "teacher": config_to_dict(c.teacher),
            "student": config_to_dict(c.student),
            "seq_len": seq_len,
            "steps": steps,
            "batch_size": c.train.batch_size,
            "train_tokens": steps * c.train.batch_size * seq_len,
            "alpha": c.loss.alpha,
            "sources": {s: data["sources"][s]["rows"] for s in srcs},
            "mix_rows": data["mix"]["rows"],
            "val_rows_evaluated": ev["rows"],
        },
        "throughput": {
            "cache_tokens_per_s": cache["tokens_per_s"],
            "train_tokens_per_s": {m: t.get("run_tokens_per_s") for m, t in timing["methods"].items()},
        },
        "notes": {
            "kl_to_teacher": ev["kl"],
            "gradient_check": grad["note"],
            "step_time": timing["source"],
            "gap_closed": "100 (L_CE - L) / (L_CE - L_fullKD), val loss of the same split (the CE and full-KD "
            "students: gap_ends)",
            "gap_closed_ci95": "2.5-97.5 percentiles of the gap closed over 2000 paired bootstrap resamples of the "
            "val rows (within each source; the same rows for the CE, full-KD and method students): the "
            "uncertainty from which rows were evaluated, not from the store's or the data order's seed",
            "unbiased": "whether the stored targets equal the teacher's distribution in expectation "
            "(E[w_i] = t_i for every id: RS-KD, systematic, head + tail, unnormalised w/o replacement)",
            "ece": "15 equal-width bins of top-1 confidence",
            "val_loss": "mean -log p(next token) "
            "over every position of the evaluated val rows; 'all' pools the sources",
            "bytes_per_token": "the store's files / positions (diagnostics and row hashes included); "
            "target_bytes_per_token: ids, counts, weights, num_ids, tail_mass only",
        },
        "config": config_to_dict(c),
        "commands": {
            "reproduce": cmp.command(),
            "stages": [f"python -m rskd_jax.data --config {cmp.out}/tokens/{s}/config.yaml" for s in srcs]
            + [f"python -m rskd_jax.cache --config {cmp.teacher_dir}/config.yaml"]
            + [f"python -m rskd_jax.train --config {t.train.output}/config.yaml" for t in runs.values()],
        },
        "hardware": cmp.log.state.get("hardware"),
        "stage_seconds": stage_seconds,
        "wall_time_s": round(sum(stage_seconds.values()), 1),
    }
