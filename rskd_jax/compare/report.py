"""The report stage: results.json, the plots, and the README's Results section.

    results = build_results(cmp, runs)          # rskd_jax.compare.results: bookkeeping only
    write_report(cmp, runs, results)            # results.json + PNGs + README (or printed)

The section goes between `<!-- results:start -->` and `<!-- results:end -->` of
reproduce.readme; without the markers (or with readme null) it is printed instead.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rskd_jax.compare.plots import PLOTS, write_plots

START, END = "<!-- results:start -->", "<!-- results:end -->"
PLOT_ALT = {
    "val_loss.png": "val loss",
    "reliability.png": "reliability",
    "unique_ids.png": "unique ids vs N",
    "ids_tradeoff.png": "ECE and gap closed vs stored ids",
    "gap_bytes.png": "gap closed vs bytes per token",
    "gap_tokens.png": "gap closed vs training tokens",
}
# drawn from results.json alone (the others need the runs' metrics, absent in a merged table)
ALWAYS_PLOTTED = ("reliability.png", "unique_ids.png", "ids_tradeoff.png", "gap_bytes.png")


def _f(x, fmt: str, scale: float = 1.0) -> str:
    """A table cell: '-' for None, no '-0' for a zero.

    >>> _f(None, ".1f"), _f(-0.0, ".1f"), _f(0.1234, ".2f", 100)
    ('-', '0.0', '12.34')
    """
    if x is None:
        return "-"
    if x * scale == 0:
        return format(x * scale + 0.0, fmt).replace("-0", "0")
    return format(x * scale, fmt)


def _gap(pct: float | None, ci: list[float] | None) -> str:
    """A gap-closed cell: the figure, with its bootstrap interval when there is one.

    >>> _gap(87.04, [80.2, 93.9]), _gap(63.0, None), _gap(None, None)
    ('87 [80, 94]', '63', '-')
    """
    return _f(pct, ".0f") + (f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci and pct is not None else "")


def _grouped(stage_seconds: dict) -> dict:
    """{stage: seconds} with the train/<method> stages summed, in pipeline order."""
    order = ("data", "cache", "train", "eval", "grad", "timing")
    out: dict[str, float] = {}
    for k, v in stage_seconds.items():
        key = "train" if k.startswith("train/") else k
        out[key] = out.get(key, 0.0) + v
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def render_section(results: dict, readme_dir: str, results_dir: str) -> str:
    """The markdown that goes between the README's results markers."""
    rel = os.path.relpath(results_dir, readme_dir or ".").replace(os.sep, "/")
    srcs = list(results["teacher"]["val_loss_by_source"])
    head = (
        ["method", "targets", "unbiased", "ids/pos", "B/token", "val loss"]
        + [f"val {s}" for s in srcs]
        + ["gap closed %"]
        + ([f"gap {s} %" for s in srcs] if len(srcs) > 1 else [])
        + ["ECE %", "KL to teacher", "top-1 agr. %", "step / CE", "grad angle °", "grad norm ratio"]
    )
    lines = [f"### {results['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["methods"]:
        bpt = "online" if r["loss"] == "full_online" else _f(r["bytes_per_token"], ".1f")
        name = f"`{r['method']}`" + (" (ref.)" if r.get("reference") else "")
        flag = {True: "yes", False: "no"}.get(r.get("unbiased"), "-")
        cells = [name, r["targets"], flag, _f(r["stored_ids"], ".1f"), bpt, _f(r["val_loss"], ".4f")]
        cells += [_f(r["val_loss_by_source"][s], ".4f") for s in srcs]
        cells += [_gap(r["gap_closed_pct"], r.get("gap_closed_ci95"))]
        by_ci = r.get("gap_closed_ci95_by_source") or {}
        cells += [_gap(r["gap_closed_pct_by_source"][s], by_ci.get(s)) for s in srcs] if len(srcs) > 1 else []
        cells += [
            _f(r["ece"], ".2f", 100),
            _f(r["kl_to_teacher"], ".4f"),
            _f(r["top1_agreement"], ".1f", 100),
            _f(r["step_time_rel_ce"], ".2f") + ("*" if r["step_time_source"] == "run metrics" else ""),
            _f(r["grad_angle_deg"], ".1f"),
            _f(r["grad_norm_ratio"], ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    t, s, hw = results["teacher"], results["setup"], results["hardware"] or {}
    n = results["notes"]
    starred = any(r["step_time_source"] == "run metrics" for r in results["methods"])
    lines += [
        "",
        f"Teacher val loss: {t['val_loss']:.4f} ("
        + ", ".join(f"{k} {v:.4f}" for k, v in t["val_loss_by_source"].items())
        + f"), ECE {100 * t['ece']:.2f}%. Students: {s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens, "
        f"same init and data order, KD weight 1 - alpha = {1 - s['alpha']:g}; val rows evaluated: "
        + ", ".join(f"{k.removeprefix('val_')} {v}" for k, v in s["val_rows_evaluated"].items())
        + ".",
        "",
        f"- **val loss**: {n['val_loss']}. **gap closed**: {n['gap_closed']}. **ECE**: {n['ece']}.",
        *(
            [f"- **[lo, hi]** after a gap closed: {n['gap_closed_ci95']}."]
            if any(r.get("gap_closed_ci95") for r in results["methods"]) and "gap_closed_ci95" in n
            else []
        ),
        f"- **KL to teacher**: {n['kl_to_teacher']}.",
        f"- **B/token**: {n['bytes_per_token']}.",
        f"- **step / CE**: {n['step_time']}"
        + ("; * from the runs' own median tokens/s (not interleaved)." if starred else "."),
        f"- **grad angle / norm ratio**: {n['gradient_check']}.",
        f"- **unbiased**: {n['unbiased']}.",
    ]
    lines += [
        f"- **(ref.)**: the row of `{r['reference']}`, an earlier run whose CE student evaluated to the same val "
        "losses (same data, student, init, order and eval): the gap's full-KD end, not retrained here."
        for r in results["methods"]
        if r.get("reference")
    ]
    lines += [
        "",
        *[
            f"![{alt}]({rel}/{png})"
            for png, alt in PLOT_ALT.items()
            if os.path.exists(os.path.join(results_dir, png)) or png in ALWAYS_PLOTTED
        ],
        "",
        f"Reproduce (resumable; every number above is in [`{rel}/results.json`]({rel}/results.json)):",
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


def results_text(results: dict) -> str:
    return json.dumps(results, indent=1) + "\n"


def write_report(cmp, runs: dict, results: dict) -> dict[str, Any]:
    """results.json, the plots, and the README section (or the section printed)."""
    import tempfile

    from rskd_jax.runpath import is_local, run_path, upload_tree, write_text

    r = cmp.cfg.reproduce
    out = run_path(r.results_dir)  # a local path or a gs://, s3://, file:// URL
    path = os.fspath(out / "results.json")
    write_text(path, results_text(results))
    if is_local(r.results_dir):
        plots = write_plots(results, runs, r.reliability, os.fspath(out))
    else:  # matplotlib writes local files: drawn in a temporary directory, then uploaded
        with tempfile.TemporaryDirectory(prefix="rskd-plots-") as tmp:
            write_plots(results, runs, r.reliability, tmp)
            upload_tree(tmp, out)
        plots = [os.fspath(out / p) for p in PLOTS]
    section = render_section(results, os.path.dirname(r.readme or ""), r.results_dir)
    changed = update_readme(r.readme, section) if r.readme and os.path.exists(r.readme) else None
    if changed is None:
        why = f"{r.readme} has no {START} / {END} markers" if r.readme else "reproduce.readme is null"
        print(f"{why}; the Results section:\n\n{section}\n", flush=True)
        readme = "printed"
    else:
        readme = "updated" if changed else "unchanged"
    print(f"   wrote {path} and {len(PLOTS)} plots; README {readme}", flush=True)
    return {"results": path, "plots": plots, "readme": readme}


def report_ok(cmp, results: dict) -> bool:
    """True when results.json holds exactly `results`, the plots exist and the README (if it
    has markers) already shows this section."""
    from rskd_jax.runpath import read_text, run_path

    r = cmp.cfg.reproduce
    out = run_path(r.results_dir)
    if read_text(out / "results.json") != results_text(results):
        return False
    if not all((out / p).exists() for p in PLOTS):
        return False
    if r.readme and os.path.exists(r.readme):
        with open(r.readme, encoding="utf-8") as f:
            text = f.read()
        section = render_section(results, os.path.dirname(r.readme), r.results_dir)
        if START in text and END in text and f"{START}\n{section}\n{END}" not in text:
            return False
    return True
