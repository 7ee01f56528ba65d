"""Data-prep throughput: the CPython stdlib -> SmolLM2 token store, then batched reads.

    python tools/bench_data.py --json [--inputs @stdlib] [--seq-len 512] [--batch 64]

Runs the real data program (`rskd_jax.data.run`) on the default inputs into a temporary
store and prints one JSON object: files, tokens, rows, seconds and tokens/s of the whole
program (expand, read, tokenize, pack, write), store bytes per token, and the rate of
shuffled batches read through `make_batch_iterator` (rows/s, tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from rskd_jax.config import DataRun, load_config
from rskd_jax.data import run
from rskd_jax.train_data import Rows, make_batch_iterator
from rskd_jax.store.common import bytes_on_disk
from rskd_jax.store.tokens import open_token_store
from rskd_jax.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--inputs", default="@stdlib")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="global batch for the read benchmark")
    parser.add_argument("--read-steps", type=int, default=200)
    args = parser.parse_args()

    load_tokenizer("smollm2")  # build/cache outside the timed run
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tokens")
        cfg = load_config(DataRun, None, [f"data.inputs={args.inputs}", f"data.output={out}",
                                          f"data.seq_len={args.seq_len}"])
        summary = run(cfg, progress=not args.json)
        store = open_token_store(out)
        it = make_batch_iterator(Rows(store, "train"), global_batch_size=args.batch, seed=0)
        next(it)  # thread pool start-up
        start = time.perf_counter()
        for _ in range(args.read_steps):
            next(it)
        read_s = time.perf_counter() - start
        rows = args.read_steps * args.batch
        result = {
            "inputs": args.inputs, "seq_len": args.seq_len, "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "files": sum(summary["documents"].values()) + sum(
                v for k, v in summary["skipped"].items() if k != "examples"),
            "documents": summary["documents"], "skipped": summary["skipped"],
            "tokens": summary["tokens"], "rows": summary["rows"],
            "prep_seconds": summary["seconds"], "prep_tokens_per_s": summary["tokens_per_s"],
            "store_bytes": (size := bytes_on_disk(out)),
            "store_bytes_per_token": round(size / (sum(summary["rows"].values()) * args.seq_len), 3),
            "read_batch": args.batch, "read_rows_per_s": round(rows / read_s),
            "read_tokens_per_s": round(rows * args.seq_len / read_s),
        }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
