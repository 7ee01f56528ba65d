"""Host -> device bytes per token of a teacher store's batches: dense vs trimmed vs ragged.

    python tools/bench_forms.py TEACHER_STORE [--split train] [--batch 8] [--json]

Reads every whole batch of `--batch` consecutive rows with TeacherStore.read_rows, converts it
to each form of rskd_jax.store.forms and counts the bytes of the arrays a sparse-KD step reads
(dense / trimmed: ids + weights [b, L, K]; ragged: entry_pos + entry_ids + entry_weights [E]),
per token. Also reports the read + conversion time per batch. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

FIELDS = {
    "dense": ("ids", "weights"),
    "trimmed": ("ids", "weights"),
    "ragged": ("entry_pos", "entry_ids", "entry_weights"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--split", default="train")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from rskd_jax.store import forms, open_teacher_store

    store = open_teacher_store(args.store)
    n = store.num_rows(args.split) // args.batch * args.batch
    per_form = {f: [] for f in FIELDS}
    secs = {f: [] for f in FIELDS}
    slots, entries = [], []
    for lo in range(0, n, args.batch):
        idx = np.arange(lo, lo + args.batch)
        tokens = idx.size * store.seq_len
        for form, fields in FIELDS.items():
            t = time.perf_counter()
            rows = store.read_rows_as(args.split, idx, form)
            secs[form].append(time.perf_counter() - t)
            per_form[form].append(forms.nbytes_per_token(rows, fields, tokens))
            if form == "trimmed":
                slots.append(rows["ids"].shape[-1])
                entries.append(float(rows["num_ids"].mean()))
    out = {
        "store": args.store,
        "method": store.method,
        "k": store.k,
        "seq_len": store.seq_len,
        "batch_rows": args.batch,
        "batches": n // args.batch,
        "mean_entries_per_position": statistics.mean(entries),
        "trimmed_slots": {"min": min(slots), "max": max(slots)},
        "h2d_bytes_per_token": {f: statistics.mean(v) for f, v in per_form.items()},
        "read_ms_per_batch": {f: 1e3 * statistics.median(v) for f, v in secs.items()},
    }
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    sys.exit(main())
