"""The report stage of tools/reproduce.py: results.json, plots, and the README's Results section.

    results = build_results(rep, runs)          # from state.json: pure bookkeeping, no models
    write_report(rep, runs, results)            # results.json + PNGs + README (or printed)

Plots (matplotlib, Agg) in reproduce.results_dir:
  val_loss.png      val loss during training (each run's metrics.jsonl eval records)
  reliability.png   reliability diagrams (accuracy and mean confidence per confidence bin)
  unique_ids.png    mean unique ids per position vs draws N (our stores, the paper's points)
  ids_tradeoff.png  ECE and % of the CE -> full-KD gap closed vs ids stored per position
"""

from __future__ import annotations

import json
import os
from typing import Any

from rskd_jax.config import config_to_dict

START, END = "<!-- results:start -->", "<!-- results:end -->"
PAPER_UNIQUE_IDS = {4: 2.4, 13: 5.0, 50: 12.1, 150: 24.5}
PLOTS = ("val_loss.png", "reliability.png", "unique_ids.png", "ids_tradeoff.png")
TARGET_ARRAYS = ("ids", "counts", "weights", "num_ids", "tail_mass")
TEACHER_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "random": "random"}


# ----------------------------------------------------------------------------- results


def _output(rep, store: str | None):
    return next((o for o in rep.cfg.cache.outputs if o.name == store), None)


def describe(rep, m) -> tuple[str, str]:
    """(family, human description of the targets) of a method."""
    if m.loss == "ce":
        return "ce", "labels only"
    if m.loss == "full_online":
        return "full", "full distribution, teacher online"
    o = _output(rep, m.store)
    if o.method == "sample":
        tempered = o.temperature != 1.0
        return ("rskd_tempered" if tempered else "rskd",
                f"RS-KD N={o.num_draws}" + (f", proposal T={o.temperature:g}" if tempered else ""))
    if o.method == "sample_wor":
        return ("wor_norm" if o.normalize else "wor",
                f"w/o replacement k={o.num_draws}" + (", self-normalised" if o.normalize else ""))
    if o.method == "top_k":
        return "top_k", f"top-K {o.num_draws}"
    return o.method, f"{o.method} K={o.num_draws}"


def _last_train_loss(run_dir: str) -> float | None:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        recs = [x for x in (json.loads(line) for line in f if line.strip()) if not x.get("eval")]
    return recs[-1]["loss"] if recs else None


def _gap(ce: float, full: float | None, v: float) -> float | None:
    if full is None or abs(ce - full) < 1e-12:
        return None
    return 100.0 * (ce - v) / (ce - full)


def build_results(rep, runs: dict) -> dict[str, Any]:
    """The results.json object, from the stages' records in state.json."""
    c, r = rep.cfg, rep.cfg.reproduce
    st = rep.state["stages"]
    data, cache, ev = st["data"]["result"], st["cache"]["result"], st["eval"]["result"]
    grad, timing = st["grad"]["result"], st["timing"]["result"]
    srcs = [s.name for s in rep.sources]
    keys = ["all", *[f"val_{s}" for s in srcs]]
    full_name = next((m.name for m in r.methods if m.loss == "full_online"), None)
    ref = {k: ev["students"]["ce"][k]["val_loss"] for k in keys}
    ref_full = {k: ev["students"][full_name][k]["val_loss"] if full_name else None for k in keys}
    rows = []
    for m in r.methods:
        e, family_desc = ev["students"][m.name], describe(rep, m)
        store = cache["stores"].get(m.store) if m.store else None
        by_array = store["bytes_per_token_by_array"] if store else {}
        g = grad["methods"].get(m.name)
        t = timing["methods"][m.name]
        by_src = lambda f: {s: e[f"val_{s}"].get(f) for s in srcs}  # noqa: E731
        rows.append({
            "method": m.name, "loss": m.loss, "store": m.store, "family": family_desc[0],
            "targets": family_desc[1],
            "stored_ids": store["mean_unique_ids"] if store else None,
            "bytes_per_token": store["bytes_per_token"] if store else (0.0 if m.loss == "ce" else None),
            "target_bytes_per_token": sum(by_array.get(a) or 0.0 for a in TARGET_ARRAYS) if store else None,
            "val_loss": e["all"]["val_loss"], "val_loss_by_source": by_src("val_loss"),
            "gap_closed_pct": _gap(ref["all"], ref_full["all"], e["all"]["val_loss"]),
            "gap_closed_pct_by_source": {s: _gap(ref[f"val_{s}"], ref_full[f"val_{s}"], e[f"val_{s}"]["val_loss"])
                                         for s in srcs},
            "ece": e["all"]["ece"], "ece_by_source": by_src("ece"), "accuracy": e["all"]["accuracy"],
            "kl_to_teacher": e["all"].get("kl_to_teacher"), "kl_to_teacher_by_source": by_src("kl_to_teacher"),
            "top1_agreement": e["all"].get("top1_agreement"),
            "step_time_s": t.get("step_s"), "step_time_rel_ce": t.get("step_time_rel_ce"),
            "step_time_source": t.get("step_time_source"),
            "run_tokens_per_s": t.get("run_tokens_per_s"),
            "grad_angle_deg": g["angle_deg"] if g else (0.0 if m.loss == "full_online" else None),
            "grad_angle_deg_std": g["angle_deg_std"] if g else None,
            "grad_norm_ratio": g["norm_ratio"] if g else (1.0 if m.loss == "full_online" else None),
            "grad_norm_ratio_std": g["norm_ratio_std"] if g else None,
            "train_seconds": st[f"train/{m.name}"]["seconds"],
            "final_train_loss": _last_train_loss(runs[m.name].train.output),
            "eval_bins": e["all"]["bins"],
        })
    sample_stores = [{"store": o.name, "num_draws": o.num_draws, "temperature": o.temperature,
                      "mean_unique_ids": cache["stores"][o.name]["mean_unique_ids"]}
                     for o in c.cache.outputs if o.method == "sample"]
    teacher = ev["teacher"]
    steps = rep.train_steps()
    seq_len = c.data.seq_len
    stage_seconds = {k: v["seconds"] for k, v in st.items() if k != "report"}
    return {
        "title": (f"{TEACHER_NAMES.get(c.teacher.source, c.teacher.source)} teacher -> d={c.student.hidden_size} x "
                  f"{c.student.num_layers}-layer "
                  f"students, {steps * c.train.batch_size * seq_len:,} training tokens ({' + '.join(srcs)})"),
        "methods": rows,
        "teacher": {"val_loss": teacher["all"]["val_loss"], "ece": teacher["all"]["ece"],
                    "val_loss_by_source": {s: teacher[f"val_{s}"]["val_loss"] for s in srcs}},
        "unique_ids": sample_stores, "paper_unique_ids": {str(k): v for k, v in PAPER_UNIQUE_IDS.items()},
        "setup": {"teacher": config_to_dict(c.teacher), "student": config_to_dict(c.student), "seq_len": seq_len,
                  "steps": steps, "batch_size": c.train.batch_size, "train_tokens": steps * c.train.batch_size * seq_len,
                  "alpha": c.loss.alpha, "sources": {s: data["sources"][s]["rows"] for s in srcs},
                  "mix_rows": data["mix"]["rows"], "val_rows_evaluated": ev["rows"]},
        "throughput": {"cache_tokens_per_s": cache["tokens_per_s"],
                       "train_tokens_per_s": {m: t.get("run_tokens_per_s") for m, t in timing["methods"].items()}},
        "notes": {"kl_to_teacher": ev["kl"], "gradient_check": grad["note"], "step_time": timing["source"],
                  "gap_closed": "100 (L_CE - L) / (L_CE - L_fullKD), val loss of the same split",
                  "ece": "15 equal-width bins of top-1 confidence", "val_loss": "mean -log p(next token) "
                  "over every position of the evaluated val rows; 'all' pools the sources",
                  "bytes_per_token": "the store's files / positions (diagnostics and row hashes included); "
                  "target_bytes_per_token: ids, counts, weights, num_ids, tail_mass only"},
        "config": config_to_dict(c),
        "commands": {"reproduce": rep.command(),
                     "stages": [f"python -m rskd_jax.data --config {rep.out}/tokens/{s}/config.yaml" for s in srcs]
                     + [f"python -m rskd_jax.cache --config {rep.teacher_dir}/config.yaml"]
                     + [f"python -m rskd_jax.train --config {t.train.output}/config.yaml" for t in runs.values()]},
        "hardware": rep.state.get("hardware"),
        "stage_seconds": stage_seconds, "wall_time_s": round(sum(stage_seconds.values()), 1),
    }


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLE = {"ce": ("k", "o"), "full": ("tab:green", "s"), "top_k": ("tab:red", "v"), "rskd": ("tab:blue", "o"),
         "rskd_tempered": ("tab:cyan", "D"), "wor": ("tab:purple", "^"), "wor_norm": ("tab:pink", "^"),
         "ghost": ("tab:orange", "P")}


def _eval_records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [x for x in (json.loads(line) for line in f if line.strip()) if x.get("eval")]


def plot_val_loss(results, runs, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    tokens_per_step = results["setup"]["batch_size"] * results["setup"]["seq_len"]
    for i, row in enumerate(results["methods"]):
        recs = _eval_records(runs[row["method"]].train.output)
        if not recs:
            continue
        color, marker = STYLE.get(row["family"], ("gray", "."))
        ls = ["-", "--", ":", "-."][i % 4]
        ax.plot([x["step"] * tokens_per_step / 1e6 for x in recs], [x["val_loss"] for x in recs],
                color=color, marker=marker, markersize=3, linestyle=ls, label=row["method"])
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("val loss (train-time eval batches)")
    ax.set_title("Validation loss during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(results, names, path: str) -> None:
    plt = _plt()
    rows = [r for r in results["methods"] if r["method"] in names] or results["methods"][:1]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        b = row["eval_bins"]
        nb = len(b["count"])
        centers = [(i + 0.5) / nb for i in range(nb)]
        acc = [c / n if n else 0.0 for c, n in zip(b["correct"], b["count"])]
        conf = [c / n if n else 0.0 for c, n in zip(b["conf"], b["count"])]
        ax.bar(centers, acc, width=1 / nb, edgecolor="k", linewidth=0.4, label="accuracy")
        ax.bar(centers, [a - c for a, c in zip(conf, acc)], bottom=acc, width=1 / nb, color="tab:red",
               alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{row['method']} (ECE {100 * row['ece']:.2f}%)", fontsize=9)
        ax.set_xlabel("top-1 confidence")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_unique_ids(results, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    paper = sorted((int(k), v) for k, v in results["paper_unique_ids"].items())
    ax.plot([n for n, _ in paper], [v for _, v in paper], "k--o", mfc="none", label="paper")
    ours = sorted((s["num_draws"], s["mean_unique_ids"]) for s in results["unique_ids"] if s["temperature"] == 1.0)
    if ours:
        ax.plot([n for n, _ in ours], [v for _, v in ours], "o-", color="tab:blue", label="ours, T = 1")
    for s in results["unique_ids"]:
        if s["temperature"] != 1.0:
            ax.plot([s["num_draws"]], [s["mean_unique_ids"]], "D", color="tab:cyan")
            ax.annotate(f"T={s['temperature']:g}", (s["num_draws"], s["mean_unique_ids"]), fontsize=7,
                        xytext=(4, -3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("draws per position N")
    ax.set_ylabel("mean unique ids per position")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(results, path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows = [r for r in results["methods"] if r["stored_ids"] is not None]
    for ax, key, label, scale in ((axes[0], "ece", "ECE (%)", 100.0), (axes[1], "gap_closed_pct", "% of CE -> full-KD gap closed", 1.0)):
        for fam in sorted({r["family"] for r in rows}):
            pts = sorted((r["stored_ids"], r[key] * scale, r["method"]) for r in rows if r["family"] == fam and r[key] is not None)
            if not pts:
                continue
            color, marker = STYLE.get(fam, ("gray", "."))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=fam)
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for ref in results["methods"]:
            if ref["family"] in ("ce", "full") and ref[key] is not None:
                ax.axhline(ref[key] * scale, color=STYLE[ref["family"]][0], linestyle=":", linewidth=1,
                           label=ref["method"])
        ax.set_xscale("log")
        xs = sorted({round(r["stored_ids"], 1) for r in rows})
        ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("ids stored per position (mean unique)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- README


def _f(x, fmt: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale + 0.0, fmt).replace("-0", "0") if x * scale == 0 else \
        format(x * scale, fmt)


def render_section(results: dict, readme_dir: str, results_dir: str) -> str:
    """The markdown that goes between the README's results markers."""
    rel = os.path.relpath(results_dir, readme_dir or ".").replace(os.sep, "/")
    srcs = list(results["teacher"]["val_loss_by_source"])
    head = (["method", "targets", "ids/pos", "B/token", "val loss"] + [f"val {s}" for s in srcs]
            + ["gap closed %", "ECE %", "KL to teacher", "top-1 agr. %", "step / CE", "grad angle °", "grad norm ratio"])
    lines = [f"### {results['title']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["methods"]:
        bpt = "online" if r["loss"] == "full_online" else _f(r["bytes_per_token"], ".1f")
        cells = [f"`{r['method']}`", r["targets"], _f(r["stored_ids"], ".1f"), bpt, _f(r["val_loss"], ".4f")]
        cells += [_f(r["val_loss_by_source"][s], ".4f") for s in srcs]
        cells += [_f(r["gap_closed_pct"], ".0f"), _f(r["ece"], ".2f", 100), _f(r["kl_to_teacher"], ".4f"),
                  _f(r["top1_agreement"], ".1f", 100),
                  _f(r["step_time_rel_ce"], ".2f") + ("*" if r["step_time_source"] == "run metrics" else ""),
                  _f(r["grad_angle_deg"], ".1f"), _f(r["grad_norm_ratio"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    t, s, hw = results["teacher"], results["setup"], results["hardware"] or {}
    n = results["notes"]
    lines += [
        "",
        f"Teacher val loss: {t['val_loss']:.4f} (" + ", ".join(f"{k} {v:.4f}" for k, v in t["val_loss_by_source"].items())
        + f"), ECE {100 * t['ece']:.2f}%. Students: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens, "
        f"same init and data order, KD weight 1 - alpha = {1 - s['alpha']:g}; val rows evaluated: "
        + ", ".join(f"{k.removeprefix('val_')} {v}" for k, v in s["val_rows_evaluated"].items()) + ".",
        "",
        f"- **val loss**: {n['val_loss']}. **gap closed**: {n['gap_closed']}. **ECE**: {n['ece']}.",
        f"- **KL to teacher**: {n['kl_to_teacher']}.",
        f"- **B/token**: {n['bytes_per_token']}.",
        f"- **step / CE**: {n['step_time']}" + ("; * from the runs' own median tokens/s (not interleaved)."
                                                if any(r["step_time_source"] == "run metrics" for r in results["methods"])
                                                else "."),
        f"- **grad angle / norm ratio**: {n['gradient_check']}.",
        "",
        f"![val loss]({rel}/val_loss.png)",
        f"![reliability]({rel}/reliability.png)",
        f"![unique ids vs N]({rel}/unique_ids.png)",
        f"![ECE and gap closed vs stored ids]({rel}/ids_tradeoff.png)",
        "",
        "Reproduce (resumable; every number above is in "
        f"[`{rel}/results.json`]({rel}/results.json)):",
        "",
        "```",
        results["commands"]["reproduce"],
        "```",
        "",
        f"Hardware: {hw.get('cpu') or hw.get('platform', '?')} ({hw.get('cpu_count', '?')} cores, "
        f"{hw.get('devices', '?')}, jax {hw.get('jax', '?')}). Wall time {results['wall_time_s'] / 3600:.2f} h: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in _grouped(results["stage_seconds"]).items())
        + f"; teacher cache {results['throughput']['cache_tokens_per_s']} tokens/s.",
    ]
    return "\n".join(lines)


def _grouped(stage_seconds: dict) -> dict:
    """{stage: seconds} with the train/<method> stages summed, in pipeline order."""
    order = ("data", "cache", "train", "eval", "grad", "timing")
    out: dict[str, float] = {}
    for k, v in stage_seconds.items():
        key = "train" if k.startswith("train/") else k
        out[key] = out.get(key, 0.0) + v
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def update_readme(path: str, section: str) -> bool | None:
    """Replaces the text between the markers; True if changed, False if unchanged, None if
    the README has no markers (nothing written)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        return None
    new = text[: i + len(START)] + "\n" + section + "\n" + text[j:]
    if new == text:
        return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return True


# ----------------------------------------------------------------------------- the stage


def _results_text(results: dict) -> str:
    return json.dumps(results, indent=1) + "\n"


def write_report(rep, runs: dict, results: dict) -> dict[str, Any]:
    r = rep.cfg.reproduce
    os.makedirs(r.results_dir, exist_ok=True)
    path = os.path.join(r.results_dir, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_results_text(results))
    d = r.results_dir
    plot_val_loss(results, runs, os.path.join(d, "val_loss.png"))
    plot_reliability(results, r.reliability, os.path.join(d, "reliability.png"))
    plot_unique_ids(results, os.path.join(d, "unique_ids.png"))
    plot_tradeoff(results, os.path.join(d, "ids_tradeoff.png"))
    section = render_section(results, os.path.dirname(r.readme or ""), r.results_dir)
    changed = update_readme(r.readme, section) if r.readme and os.path.exists(r.readme) else None
    if changed is None:
        why = f"{r.readme} has no {START} / {END} markers" if r.readme else "reproduce.readme is null"
        print(f"{why}; the Results section:\n\n{section}\n", flush=True)
        readme = "printed"
    else:
        readme = "updated" if changed else "unchanged"
    print(f"   wrote {path} and {len(PLOTS)} plots; README {readme}", flush=True)
    return {"results": path, "plots": [os.path.join(d, p) for p in PLOTS], "readme": readme}


def report_ok(rep, results: dict) -> bool:
    """True when results.json holds exactly `results`, the plots exist and the README (if it
    has markers) already shows this section."""
    r = rep.cfg.reproduce
    path = os.path.join(r.results_dir, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() != _results_text(results):
                return False
    except OSError:
        return False
    if not all(os.path.exists(os.path.join(r.results_dir, p)) for p in PLOTS):
        return False
    if r.readme and os.path.exists(r.readme):
        with open(r.readme, encoding="utf-8") as f:
            text = f.read()
        section = render_section(results, os.path.dirname(r.readme), r.results_dir)
        if START in text and END in text and f"{START}\n{section}\n{END}" not in text:
            return False
    return True
