"""Per-source statistics of a comparison's teacher stores: the teacher's entropy and loss and the
stored ids per position, on the train rows of each source of the mix.

    python tools/source_stats.py --run runs/diag_mix --stores rskd_n50 sys_n50 [--json]

A mix row is attributed to its source by its token hash (the teacher store keeps one per row;
each source's token store gives its own). Reads stores only; no model runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def source_stats(run: str, stores: list[str], block: int = 256) -> dict:
    """{source: {"rows", "entropy_nats", "teacher_nll_nats", "unique_ids": {store: mean}}}."""
    from rskd_jax.runpath import run_path
    from rskd_jax.store.teacher import open_teacher_store, token_hash
    from rskd_jax.store.tokens import open_token_store

    root = run_path(run)
    names = sorted(p.name for p in (root / "tokens").iterdir() if p.name != "mix")
    owner: dict[int, str] = {}
    for name in names:
        tokens = open_token_store(os.fspath(root / "tokens" / name))
        n = tokens.num_rows("train")
        for lo in range(0, n, block):
            owner.update(
                (h, name) for h in token_hash(tokens.read("train", np.arange(lo, min(n, lo + block)))).tolist()
            )
    out: dict[str, dict] = {}
    for store in stores:
        s = open_teacher_store(os.fspath(root / "teacher" / store))
        n = s.num_rows("train")
        sums: dict[str, dict[str, float]] = {}
        for lo in range(0, n, block):
            rows = s.read_rows("train", np.arange(lo, min(n, lo + block)))
            src = np.array([owner.get(h, "?") for h in rows["token_hash"].tolist()])
            for name in names:
                sel = src == name
                acc = sums.setdefault(name, {"rows": 0, "positions": 0, "ids": 0.0, "ent": 0.0, "nll": 0.0, "nll_n": 0})
                acc["rows"] += int(sel.sum())
                acc["positions"] += int(rows["num_ids"][sel].size)
                acc["ids"] += float(rows["num_ids"][sel].sum())
                if "entropy" in rows:
                    acc["ent"] += float(rows["entropy"][sel].sum())
                    acc["nll"] -= float(rows["gold_logprob"][sel][:, :-1].sum())  # the last has no next token
                    acc["nll_n"] += int(rows["gold_logprob"][sel][:, :-1].size)
            if "?" in src:
                raise SystemExit(f"{store}: train rows whose tokens are in no source of {run}/tokens")
        for name, acc in sums.items():
            d = out.setdefault(name, {"rows": acc["rows"], "unique_ids": {}})
            d["unique_ids"][store] = acc["ids"] / max(acc["positions"], 1)
            if acc["nll_n"] and "entropy_nats" not in d:
                d["entropy_nats"] = acc["ent"] / acc["positions"]
                d["teacher_nll_nats"] = acc["nll"] / acc["nll_n"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the comparison's reproduce.output")
    p.add_argument("--stores", nargs="+", required=True, help="cache outputs (sample-like stores with num_ids)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    stats = source_stats(args.run, args.stores)
    if args.json:
        print(json.dumps(stats))
    else:
        for name, d in stats.items():
            ids = ", ".join(f"{k} {v:.2f}" for k, v in d["unique_ids"].items())
            ent = (
                f"entropy {d['entropy_nats']:.3f} nats, teacher loss {d['teacher_nll_nats']:.3f}; "
                if "entropy_nats" in d
                else ""
            )
            print(f"{name}: {d['rows']} train rows; {ent}unique ids per position: {ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
