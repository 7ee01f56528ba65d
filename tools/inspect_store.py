"""Summarise a token store or a teacher store.

    python tools/inspect_store.py PATH [--json] [--sample-rows 1024]

Prints one JSON object with --json (kind, num_sequences, seq_len, positions_done,
bytes_on_disk, bytes_per_token, mean_unique_ids, manifest, and per-split / per-array detail),
else a readable summary. mean_unique_ids is estimated from up to --sample-rows done rows per
split (0 = all rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rskd_jax.store import common
from rskd_jax.store.common import StoreError


def token_summary(url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Token store: splits from the manifest, shapes from the arrays themselves."""
    splits = {}
    for name, info in sorted(manifest.get("splits", {}).items()):
        arr = common.open_array(url, info.get("array", f"{name}/tokens"))
        splits[name] = {"num_sequences": int(arr.shape[0]), "seq_len": int(arr.shape[1]),
                        "manifest_num_sequences": info.get("num_sequences")}
    positions = sum(s["num_sequences"] * s["seq_len"] for s in splits.values())
    total = common.bytes_on_disk(url)
    return {
        "kind": "tokens", "num_sequences": sum(s["num_sequences"] for s in splits.values()),
        "seq_len": manifest.get("seq_len"), "complete": manifest.get("complete"),
        "positions_done": positions if manifest.get("complete") else 0,
        "bytes_on_disk": total, "bytes_per_token": total / positions if positions else None,
        "mean_unique_ids": None, "splits": splits,
    }


def summary(path: str, sample_rows: int | None) -> dict[str, Any]:
    url = common.store_url(path)
    manifest = common.read_json(url)
    if manifest is None:
        raise StoreError(f"no store at {url} (no {common.MANIFEST})")
    kind = manifest.get("kind")
    if kind == "teacher":
        from rskd_jax.store.teacher import open_teacher_store

        info = open_teacher_store(url).stats(sample_rows=sample_rows)
    elif kind == "tokens":
        info = token_summary(url, manifest)
    else:
        raise StoreError(f"{url} has a manifest of unknown kind {kind!r}")
    return {"path": url, **info, "manifest": manifest}


def _fmt(value: Any) -> str:
    return f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def print_text(info: dict[str, Any]) -> None:
    print(f"{info['kind']} store {info['path']}")
    for key in ("method", "k", "vocab_size", "num_sequences", "seq_len", "chunk_rows", "positions_done",
                "bytes_on_disk", "bytes_per_token", "mean_unique_ids", "bytes_per_entry"):
        if key in info:
            print(f"  {key:20s} {_fmt(info[key])}")
    for name, split in info.get("splits", {}).items():
        print(f"  split {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in split.items()))
    for name, value in info.get("bytes_per_token_by_array", {}).items():
        print(f"  bytes/token {name:14s} {_fmt(value)}")
    manifest = {k: v for k, v in info["manifest"].items() if k != "layout"}
    print("  manifest " + json.dumps(manifest, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", help="store directory or kvstore URL")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sample-rows", type=int, default=1024,
                        help="done rows per split read for mean_unique_ids (0 = all)")
    args = parser.parse_args(argv)
    try:
        info = summary(args.path, args.sample_rows or None)
    except StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print_text(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
