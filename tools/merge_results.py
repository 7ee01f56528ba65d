"""Adds the rows of comparison runs made in the SAME setting to a results.json, then redraws the
plots that need only results.json and re-renders the README's Results section.

    python tools/merge_results.py docs/results/results.json docs/results/diagnosis/mix/results.json \
        --readme README.md

A run qualifies only if its CE student evaluated to the same val losses as the base's (pooled and
per source, within reproduce.reference's tolerance) and its setup (teacher, student, steps, batch,
sequence length, sources) is the base's: then its students differ from the base's only in their
targets or optimizer settings. Rows already in the base (same method name) are replaced; the base's
rows without an `unbiased` field get it from their family. Each added row records its run's command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rskd_jax.compare import plots, report
from rskd_jax.compare.results import REFERENCE_TOLERANCE

SAME_SETUP = ("teacher", "student", "seq_len", "steps", "batch_size", "train_tokens", "alpha", "sources")
UNBIASED_FAMILIES = {"full", "rskd", "rskd_tempered", "wor", "systematic", "head_tail"}


def check_same_setting(base: dict, other: dict, path: str) -> None:
    for key in SAME_SETUP:
        a, b = base["setup"].get(key), other["setup"].get(key)
        if isinstance(a, dict) and isinstance(b, dict):  # fields added since the base: not compared
            a, b = ({k: d[k] for k in a.keys() & b.keys()} for d in (a, b))
        if a != b:
            raise SystemExit(f"{path}: setup.{key} differs from the base ({b!r} vs {a!r})")
    ce = {r["method"]: r for r in base["methods"]}["ce"]
    ce2 = {r["method"]: r for r in other["methods"]}["ce"]
    pairs = [(ce["val_loss"], ce2["val_loss"])] + [
        (ce["val_loss_by_source"][s], ce2["val_loss_by_source"].get(s)) for s in ce["val_loss_by_source"]
    ]
    if any(b is None or abs(a - b) > REFERENCE_TOLERANCE for a, b in pairs):
        raise SystemExit(f"{path}: its ce student's val losses {pairs} are not the base's: another setting")


def merge(base: dict, others: list[tuple[str, dict]]) -> dict:
    rows = []
    for r in base["methods"]:
        rows.append({**r, "unbiased": r.get("unbiased", r["family"] in UNBIASED_FAMILIES)})
    for path, other in others:
        check_same_setting(base, other, path)
        for r in other["methods"]:
            if r["method"] == "ce" or r.get("reference"):
                continue
            rows = [x for x in rows if x["method"] != r["method"]]
            rows.append({**r, "run": other["commands"]["reproduce"], "results": path})
    merged = dict(base, methods=rows)
    merged["notes"] = {**{k: v for _, o in others for k, v in o.get("notes", {}).items()}, **base.get("notes", {})}
    merged["merged_from"] = [p for p, _ in others]
    return merged


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="results.json to extend (rewritten in place)")
    ap.add_argument("others", nargs="+", help="results.json of runs in the same setting")
    ap.add_argument("--readme", help="README whose Results markers are re-rendered")
    ap.add_argument(
        "--reliability",
        default="ce,top_k_12,rskd_n50,full_kd",
        help="comma-separated methods of the reliability diagram, as the comparison's reproduce.reliability "
        "(those missing from the merged rows are left out; default: %(default)s)",
    )
    args = ap.parse_args(argv)
    with open(args.base, encoding="utf-8") as f:
        base = json.load(f)
    others = []
    for p in args.others:
        with open(p, encoding="utf-8") as f:
            others.append((p, json.load(f)))
    merged = merge(base, others)
    with open(args.base, "w", encoding="utf-8") as f:
        f.write(report.results_text(merged))
    out_dir = os.path.dirname(args.base)
    plots.plot_gap_bytes(merged, os.path.join(out_dir, "gap_bytes.png"))
    plots.plot_tradeoff(merged, os.path.join(out_dir, "ids_tradeoff.png"))
    present = {r["method"] for r in merged["methods"]}
    reliability = [m for m in args.reliability.split(",") if m in present]
    plots.plot_reliability(merged, reliability, os.path.join(out_dir, "reliability.png"))
    if args.readme:
        section = report.render_section(merged, os.path.dirname(args.readme), out_dir)
        print(
            "README",
            {True: "updated", False: "unchanged", None: "has no markers"}[report.update_readme(args.readme, section)],
        )
    print(f"{args.base}: {len(merged['methods'])} rows ({', '.join(r['method'] for r in merged['methods'])})")


if __name__ == "__main__":
    main()
