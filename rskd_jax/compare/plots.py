"""The comparison's plots (matplotlib, Agg), drawn from a results.json object.

val_loss.png      val loss during training (each run's metrics.jsonl eval records)
reliability.png   reliability diagrams (accuracy and mean confidence per confidence bin)
unique_ids.png    mean unique ids per position vs draws N (our stores, the paper's points)
ids_tradeoff.png  ECE and % of the CE -> full-KD gap closed vs ids stored per position
gap_tokens.png    % of the CE -> full-KD gap closed vs training tokens (train-time eval records)
gap_bytes.png     % of the gap closed (all and per source) vs stored bytes per token, unbiased marked
"""

from __future__ import annotations

from rskd_jax.compare.results import read_metrics

PLOTS = ("val_loss.png", "reliability.png", "unique_ids.png", "ids_tradeoff.png", "gap_tokens.png", "gap_bytes.png")
STYLE = {
    "ce": ("k", "o"),
    "full": ("tab:green", "s"),
    "top_k": ("tab:red", "v"),
    "rskd": ("tab:blue", "o"),
    "rskd_tempered": ("tab:cyan", "D"),
    "wor": ("tab:purple", "^"),
    "wor_norm": ("tab:pink", "^"),
    "ghost": ("tab:orange", "P"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(results, runs) -> dict[str, tuple[list[float], list[float]]]:
    """method -> (training tokens, train-time val loss), for the methods trained here."""
    seq_len = results["setup"]["seq_len"]
    out = {}
    for row in results["methods"]:
        run = runs.get(row["method"])
        if run is None:  # a row taken from reproduce.reference
            continue
        recs = read_metrics(run.train.output, eval_records=True)
        if recs:
            out[row["method"]] = (
                [x["step"] * run.train.batch_size * seq_len for x in recs],
                [x["val_loss"] for x in recs],
            )
    return out


def plot_val_loss(results, runs, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    curves = _curves(results, runs)
    for i, row in enumerate(results["methods"]):
        if row["method"] not in curves:
            continue
        tokens, losses = curves[row["method"]]
        color, marker = STYLE.get(row["family"], ("gray", "."))
        ls = ["-", "--", ":", "-."][i % 4]
        ax.plot(
            [t / 1e6 for t in tokens],
            losses,
            color=color,
            marker=marker,
            markersize=3,
            linestyle=ls,
            label=row["method"],
        )
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
        ax.bar(
            centers,
            [a - c for a, c in zip(conf, acc)],
            bottom=acc,
            width=1 / nb,
            color="tab:red",
            alpha=0.3,
            label="gap to confidence",
        )
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
            ax.annotate(
                f"T={s['temperature']:g}",
                (s["num_draws"], s["mean_unique_ids"]),
                fontsize=7,
                xytext=(4, -3),
                textcoords="offset points",
            )
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
    panels = ((axes[0], "ece", "ECE (%)", 100.0), (axes[1], "gap_closed_pct", "% of CE -> full-KD gap closed", 1.0))
    for ax, key, label, scale in panels:
        for fam in sorted({r["family"] for r in rows}):
            pts = sorted(
                (r["stored_ids"], r[key] * scale, r["method"])
                for r in rows
                if r["family"] == fam and r[key] is not None
            )
            if not pts:
                continue
            color, marker = STYLE.get(fam, ("gray", "."))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=fam)
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for ref in results["methods"]:
            if ref["family"] in ("ce", "full") and ref[key] is not None:
                ax.axhline(
                    ref[key] * scale, color=STYLE[ref["family"]][0], linestyle=":", linewidth=1, label=ref["method"]
                )
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


def gap_curves(results, runs) -> dict[str, tuple[list[float], list[float]]]:
    """method -> (training tokens, % of the CE -> full-KD gap closed) along training: each train-time
    eval against the CE and full-KD students' losses at the same tokens (linear interpolation),
    where both were trained here."""
    import numpy as np

    curves = _curves(results, runs)
    full = next((r["method"] for r in results["methods"] if r["loss"] == "full_online"), None)
    ce_name, full = results.get("gap_ends", ["ce", full])
    if ce_name not in curves or full not in curves:
        return {}
    out = {}
    for name, (tokens, losses) in curves.items():
        ce = np.interp(tokens, *curves[ce_name])
        fk = np.interp(tokens, *curves[full])
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = np.where(np.abs(ce - fk) > 1e-9, 100.0 * (ce - np.asarray(losses)) / (ce - fk), np.nan)
        out[name] = (list(tokens), [float(g) for g in gap])
    return out


def plot_gap_tokens(results, runs, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    families = {r["method"]: r["family"] for r in results["methods"]}
    for i, (name, (tokens, gap)) in enumerate(gap_curves(results, runs).items()):
        color, marker = STYLE.get(families[name], ("gray", "."))
        ax.plot(
            [t / 1e6 for t in tokens],
            gap,
            color=color,
            marker=marker,
            markersize=3,
            linestyle=["-", "--", ":", "-."][i % 4],
            label=name,
        )
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("% of CE -> full-KD gap closed (train-time eval)")
    ax.set_ylim(-50, 150)
    ax.set_title("Gap closed along training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gap_bytes(results, path: str) -> None:
    """Gap closed vs bytes/token, one panel for the pool and one per source; filled markers for
    unbiased targets, open for biased ones."""
    plt = _plt()
    rows = [r for r in results["methods"] if r.get("bytes_per_token") and r.get("gap_closed_pct") is not None]
    srcs = list(results["teacher"]["val_loss_by_source"])
    panels = [("all", "gap_closed_pct", None)] + [(s, "gap_closed_pct_by_source", s) for s in srcs]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (title, key, src) in zip(axes[0], panels):
        for r in rows:
            y = r[key] if src is None else r[key].get(src)
            if y is None:
                continue
            color, marker = STYLE.get(r["family"], ("gray", "."))
            ax.scatter(
                r["bytes_per_token"],
                y,
                color=color,
                marker=marker,
                s=36,
                facecolors=color if r.get("unbiased") else "none",
            )
            ax.annotate(r["method"], (r["bytes_per_token"], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(100, color=STYLE["full"][0], linestyle=":", linewidth=1)
        ax.axhline(90, color="gray", linestyle="--", linewidth=0.8)
        ax.axvline(30, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("stored bytes per token")
        ax.set_ylabel("% of CE -> full-KD gap closed")
        ax.set_title(f"{title} (filled: unbiased)")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict, runs: dict, reliability, results_dir: str) -> list[str]:
    """Every plot of PLOTS into results_dir; their paths."""
    import os

    paths = [os.path.join(results_dir, p) for p in PLOTS]
    plot_val_loss(results, runs, paths[0])
    plot_reliability(results, reliability, paths[1])
    plot_unique_ids(results, paths[2])
    plot_tradeoff(results, paths[3])
    plot_gap_tokens(results, runs, paths[4])
    plot_gap_bytes(results, paths[5])
    return paths
