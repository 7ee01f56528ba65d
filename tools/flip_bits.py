"""Single-bit corruption check: does a flipped bit in a chunk file ever read back silently?

    python tools/flip_bits.py STORE [STORE ...] [--flips 40] [--seed 0] [--json]

For each store (a token store or a teacher store on the local file system) and each of
`--flips` trials: copy the store, flip one random bit in the data region of one random chunk
file (the encoded chunks, not the shard index at the end, which has its own crc32c), then read
every row of every split through the public readers and compare with the untouched store.
Each trial ends as `error` (a StoreError: the corruption was caught, with its message),
`silent` (the read succeeded and returned other values: the failure this tool looks for) or
`same` (the read returned the original values, e.g. a bit in a never-read padding byte).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
import tempfile

import numpy as np

from rskd_jax.store.common import StoreError, read_json
from rskd_jax.store.teacher import open_teacher_store
from rskd_jax.store.tokens import open_token_store


def read_all(path: str) -> dict[str, np.ndarray]:
    """Every value of the store as the public reader returns it: {split/field: array}."""
    kind = (read_json(path) or {}).get("kind")
    if kind == "tokens":
        store = open_token_store(path)
        out = {s: store.read(s, np.arange(store.num_rows(s))) for s in store.splits}
        if store.has_doc_starts:
            out.update(
                {f"{s}/doc_starts": store.read_doc_starts(s, np.arange(store.num_rows(s))) for s in store.splits}
            )
        return out
    store = open_teacher_store(path)
    out = {}
    for split in store.splits:
        done = store.done_mask(split)
        out[f"{split}/done"] = done
        for name, value in store.read_rows(split, np.flatnonzero(done)).items():
            out[f"{split}/{name}"] = value
    return out


def index_bytes(chunk_file: str) -> int:
    """Bytes of the shard index at the end of a sharded chunk file (0 for a plain chunk)."""
    meta_path = os.path.join(chunk_file.split(f"{os.sep}c{os.sep}")[0], "zarr.json")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    codec = meta["codecs"][0]
    if codec["name"] != "sharding_indexed":
        return 0
    outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
    inner = codec["configuration"]["chunk_shape"]
    n = int(np.prod([-(-o // i) for o, i in zip(outer, inner)]))
    crc = 4 if any(c["name"] == "crc32c" for c in codec["configuration"]["index_codecs"]) else 0
    return 16 * n + crc


def trial(path: str, reference: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
    files = sorted(f for f in glob.glob(os.path.join(path, "**", "c", "**"), recursive=True) if os.path.isfile(f))
    with tempfile.TemporaryDirectory(prefix="rskd-flip-") as tmp:
        copy = os.path.join(tmp, "store")
        shutil.copytree(path, copy)
        while True:
            rel = os.path.relpath(files[rng.integers(len(files))], path)
            target = os.path.join(copy, rel)
            size = os.path.getsize(target) - index_bytes(target)
            if size > 0:
                break
        data = bytearray(open(target, "rb").read())
        pos, bit = int(rng.integers(size)), int(rng.integers(8))
        data[pos] ^= 1 << bit
        with open(target, "wb") as f:
            f.write(bytes(data))
        where = {"file": rel, "byte": pos, "bit": bit}
        try:
            values = read_all(copy)
        except StoreError as err:
            return {**where, "outcome": "error", "message": str(err).replace(copy, path)}
        same = values.keys() == reference.keys() and all(
            np.array_equal(values[k], reference[k], equal_nan=values[k].dtype.kind == "f") for k in values
        )
        return {**where, "outcome": "same" if same else "silent"}


def check_store(path: str, flips: int, seed: int) -> dict:
    reference = read_all(path)
    rng = np.random.default_rng(seed)
    trials = [trial(path, reference, rng) for _ in range(flips)]
    counts = {o: sum(t["outcome"] == o for t in trials) for o in ("error", "silent", "same")}
    example = next((t["message"] for t in trials if t["outcome"] == "error"), None)
    return {
        "store": path,
        "kind": (read_json(path) or {}).get("kind"),
        "flips": flips,
        **counts,
        "example_message": example,
        "silent_trials": [t for t in trials if t["outcome"] == "silent"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--flips", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    logging.getLogger("rskd_jax.store").setLevel(logging.ERROR)  # one "unchecked" warning per copy
    results = [check_store(p, args.flips, args.seed) for p in args.stores]
    if args.json:
        print(json.dumps({"stores": results, "silent": sum(r["silent"] for r in results)}))
    else:
        for r in results:
            print(
                f"{r['store']} ({r['kind']}): {r['flips']} flips -> {r['error']} errors, "
                f"{r['silent']} silent, {r['same']} unchanged"
            )
            if r["example_message"]:
                print(f"  e.g. {r['example_message']}")
    return 1 if any(r["silent"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
