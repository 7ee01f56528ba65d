"""Paired bootstrap of the val-loss difference between two students of one comparison run.

    python tools/paired_diff.py --run runs/diag_epochs rskd_n50_fresh rskd_n50_same [--json]

Reads the eval stage's per-row sums from <run>/state.json (rskd_jax.compare.evaluation) and prints
L_a - L_b pooled over all sources and per source, with the 2.5-97.5 percentiles of 2000 paired
resamples of the val rows (rskd_jax.compare.bootstrap.difference_interval). A negative figure:
student a has the lower val loss.
"""

from __future__ import annotations

import argparse
import json
import sys

from rskd_jax.compare import bootstrap
from rskd_jax.runpath import read_text, run_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the comparison's reproduce.output")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--json", action="store_true", help="one JSON object")
    args = p.parse_args(argv)
    text = read_text(run_path(args.run) / "state.json")
    if text is None:
        p.error(f"{args.run}/state.json does not exist")
    ev = (json.loads(text)["stages"].get("eval") or {}).get("result") or {}
    rows = ev.get("row_sums")
    if not rows:
        p.error(f"{args.run}: its eval stage kept no per-row sums (re-run the eval stage with this version)")
    for name in (args.a, args.b):
        if name not in rows:
            p.error(f"{name!r} was not evaluated in {args.run} (it has {sorted(rows)})")
    splits = sorted(rows[args.a])
    out = {"a": args.a, "b": args.b, "reps": args.reps}
    for key, group in [("all", splits), *[(s.removeprefix("val_"), [s]) for s in splits]]:
        out[key] = bootstrap.difference_interval(rows[args.a], rows[args.b], group, reps=args.reps)
    if args.json:
        print(json.dumps(out))
    else:
        for key in ["all", *[s.removeprefix("val_") for s in splits]]:
            d = out[key]
            print(f"{key}: L({args.a}) - L({args.b}) = {d['diff']:+.4f} nats [{d['lo']:+.4f}, {d['hi']:+.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
