"""Summarise a token store or a teacher store; optionally re-check a teacher store's rows.

    python tools/inspect_store.py PATH [--json] [--sample-rows 1024]
    python tools/inspect_store.py PATH --verify N [--json] [--seed 0] [--tokens URL] [--teacher SOURCE]
                                  [--position-tolerance 0.0]
    python tools/inspect_store.py PATH --scan [--json]

Prints one JSON object with --json (kind, num_sequences, seq_len, positions_done,
bytes_on_disk, bytes_per_token, mean_unique_ids, manifest, and per-split / per-array detail),
else a readable summary. mean_unique_ids is estimated from up to --sample-rows done rows per
split (0 = all rows).

--verify N (teacher stores written by `python -m rskd_jax.cache`) recomputes N random done
rows with the teacher the manifest describes, the seed and the method parameters, on one
device, and compares them with the stored rows: ids and counts exactly, float weights / tail
mass to 1e-5 relative, float16 arrays to their rounding, and each row's token_hash. Where
the inputs are comes from the manifest's "provenance" (the teacher spec and the token store
URL as first cached; informational, so a resume never compares these paths) unless given:
--teacher SOURCE replaces the spec's source, --tokens URL the token store; a token store no
longer at its URL is looked up in the config.yaml saved next to the store. Their content
fingerprints must equal the manifest's. Adds "verify" to the output; exits 1 on any mismatch.
A sample_wor or systematic store drawn by another sampler than this code's
(`rskd_jax.sampling.WOR_SAMPLER` / `SYSTEMATIC_SAMPLER`, the manifest's "sampler") is
refused with an error.
Stores cached with mesh.fsdp or mesh.tensor > 1 reduce in another float order, which moves
a few near-tie draws (~0.1% of positions) to a neighbouring id: check them with
--position-tolerance 0.005 (the fraction of a row's positions allowed to differ).

--scan reads every chunk of every array (of a teacher store: every `done` chunk and every done
row's chunks) and checks its crc32c; adds "scan": {"corrupt": {split: {array: [rows]}},
"corrupt_rows": n, "checked": bool} and exits 1 if any row is corrupt. Stores of layout 1 carry
no chunk checksums ("checked": false): only undecodable chunks are found there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from rskd_jax.config import ConfigError
from rskd_jax.store import common
from rskd_jax.store.common import StoreError


def token_summary(url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Token store: splits from the manifest, shapes from the arrays themselves."""
    splits = {}
    for name, info in sorted(manifest.get("splits", {}).items()):
        arr = common.open_array(url, info.get("array", f"{name}/tokens"))
        splits[name] = {
            "num_sequences": int(arr.shape[0]),
            "seq_len": int(arr.shape[1]),
            "manifest_num_sequences": info.get("num_sequences"),
        }
    positions = sum(s["num_sequences"] * s["seq_len"] for s in splits.values())
    total = common.bytes_on_disk(url)
    return {
        "kind": "tokens",
        "num_sequences": sum(s["num_sequences"] for s in splits.values()),
        "seq_len": manifest.get("seq_len"),
        "complete": manifest.get("complete"),
        "positions_done": positions if manifest.get("complete") else 0,
        "bytes_on_disk": total,
        "bytes_per_token": total / positions if positions else None,
        "mean_unique_ids": None,
        "splits": splits,
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


VERIFY_BATCH = 8  # rows per recompute step (padded), so one compile serves every batch
FLOAT_RTOL = 1e-5


def _token_store_url(store_url: str, given: str | None, recorded: str | None) -> str:
    if given:
        return given
    if recorded and common.read_json(recorded) is not None:
        return recorded
    import yaml

    parent = store_url.rstrip("/").rsplit("/", 1)[0] + "/"
    text = common.kvstore(parent).read("config.yaml").result()
    if text.state == "missing":
        raise StoreError(f"no config.yaml next to {store_url} (in {parent}) to find the token store; pass --tokens URL")
    tokens = (yaml.safe_load(text.value.decode("utf-8")) or {}).get("cache", {}).get("tokens")
    if not tokens:
        raise StoreError(f"{parent}config.yaml has no cache.tokens; pass --tokens URL")
    return tokens


def _canon(x: np.ndarray, ids: np.ndarray, present: np.ndarray) -> np.ndarray:
    """x's entries of each position sorted by id, empty slots last (as 0)."""
    order = np.argsort(np.where(present, ids.astype(np.int64), np.int64(1) << 40), -1, kind="stable")
    return np.where(np.take_along_axis(present, order, -1), np.take_along_axis(x, order, -1), 0)


def _compare_rows(got: dict[str, np.ndarray], want: dict[str, np.ndarray]):
    """Stored vs recomputed rows -> (bool [b, L] positions that differ, max abs diff per array)."""
    b, length = (got["ids"] if "ids" in got else got["logprobs"]).shape[:2]
    bad_BxL = np.zeros((b, length), bool)
    diffs: dict[str, float] = {}

    def floats(name, g, w, rtol):
        g, w = g.astype(np.float64), w.astype(np.float64)
        d = np.where(np.isnan(g) & np.isnan(w), 0.0, np.abs(g - w))
        diffs[name] = float(np.nanmax(d, initial=0.0)) if not np.isnan(d).all() else float("nan")
        return ~(d <= rtol * np.abs(w)).reshape(b, length, -1).all(-1)  # NaN differences are bad

    if "ids" in got:
        key = "counts" if "counts" in got else "weights"
        present_g, present_w = got[key] > 0, want[key] > 0
        bad_BxL |= (_canon(got["ids"], got["ids"], present_g) != _canon(want["ids"], want["ids"], present_w)).any(-1)
        if "counts" in want:
            bad_BxL |= (
                _canon(got["counts"], got["ids"], present_g) != _canon(want["counts"], want["ids"], present_w)
            ).any(-1)
        if "weights" in want:
            bad_BxL |= floats(
                "weights",
                _canon(got["weights"], got["ids"], present_g),
                _canon(want["weights"], want["ids"], present_w),
                FLOAT_RTOL,
            )
    if "tail_mass" in want:
        bad_BxL |= floats("tail_mass", got["tail_mass"], want["tail_mass"], FLOAT_RTOL)
    for name in ("logprobs", "gold_logprob", "entropy"):  # stored as float16: recomputed, rounded alike
        if name in want:
            bad_BxL |= floats(name, got[name], want[name], 0.0)
    return bad_BxL, diffs


def verify(
    url: str,
    n: int,
    *,
    tokens: str | None = None,
    teacher: str | None = None,
    seed: int = 0,
    position_tolerance: float = 0.0,
) -> dict[str, Any]:
    """Recomputes n random done rows of a teacher store and compares them (see the module doc)."""
    import jax

    from rskd_jax import cache_step, sampling
    from rskd_jax.config import ModelSpec, OutputConfig, config_from_dict
    from rskd_jax.model_spec import build_model
    from rskd_jax.store.teacher import open_teacher_store, token_hash
    from rskd_jax.store.tokens import open_token_store

    t0 = time.perf_counter()
    store = open_teacher_store(url)
    m = store.manifest
    provenance = m.get("provenance", {})
    try:
        spec = config_from_dict(
            ModelSpec,
            {**provenance.get("teacher_spec", m["teacher"].get("spec")), **({"source": teacher} if teacher else {})},
        )
        out = config_from_dict(OutputConfig, {"name": "verify", "method": m["method"], **m["params"]})
        want_tokens, run_seed, vocab = m["tokens"]["fingerprint"], int(m["seed"]), int(m["tokenizer"]["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise StoreError(
            f"{store.url} was not written by `python -m rskd_jax.cache` (manifest field {err}); "
            "--verify needs its teacher spec, method parameters and seed"
        ) from err
    before = {  # what stores made before the sampler was recorded were drawn with
        "sample_wor": ("without-replacement", "v1 (V Gumbels + top-k; not recorded)"),
        "systematic": ("systematic", "v1 (cumsum over V; not recorded)"),
    }
    ours = sampling.STORE_SAMPLERS.get(m["method"])
    if ours is not None and m.get("sampler") != ours:
        what, old = before[m["method"]]
        raise StoreError(
            f"{store.url} was drawn by the {what} sampler {m.get('sampler', old)!r}, this code draws "
            f"with {ours!r}: the same law, other draws, so its rows cannot be recomputed"
        )
    tok = open_token_store(_token_store_url(store.url, tokens, provenance.get("tokens_url")))
    if tok.fingerprint != want_tokens:
        raise StoreError(
            f"token store {tok.url} has fingerprint {tok.fingerprint}, the teacher store was made "
            f"from {want_tokens}; pass the right one with --tokens"
        )
    model = build_model(spec, vocab)
    if model.fingerprint != m["teacher"]["fingerprint"]:
        raise StoreError(
            f"the teacher {spec.source!r} now has fingerprint {model.fingerprint[:16]}..., the store "
            f"was made with {m['teacher']['fingerprint'][:16]}...: not the same weights"
        )

    done = [(split, r) for split in store.splits for r in np.flatnonzero(store.done_mask(split)).tolist()]
    pick = np.random.default_rng(seed).permutation(len(done))[:n]
    chosen = sorted(done[i] for i in pick)

    from flax import nnx

    from rskd_jax.documents import document_fields, store_setting

    graphdef, state = nnx.split(model)
    # the store's own micro-batch shape and LM-head chunk, so the recomputation rounds as the cache did
    length, batch = store.seq_len, int(m.get("device_batch") or VERIFY_BATCH)
    positions = m.get("position_chunk")
    step = jax.jit(
        cache_step.make_step(
            graphdef,
            [out],
            seed=run_seed,
            vocab_size=vocab,
            with_diagnostics=store.layout["diagnostics"],
            device_batch=batch,
            positions=None if positions is None else int(positions),
        )
    )
    report: dict[str, Any] = {
        "rows_checked": 0,
        "rows_matched": 0,
        "rows_mismatched": 0,
        "positions_checked": 0,
        "positions_mismatched": 0,
        "max_abs_diff": {},
        "mismatches": [],
    }
    for split in store.splits:
        rows = np.array([r for s, r in chosen if s == split], np.int64)
        for i in range(0, len(rows), batch):
            rows_b = rows[i : i + batch]
            padded = np.concatenate([rows_b, np.full(batch - len(rows_b), rows_b[0])])
            tokens_BxL = tok.read(split, padded)
            # a store cached with document masking: the same segment ids and positions
            docs = document_fields(tok, split, padded) if store_setting(m) else None
            code = np.int32(cache_step.split_code(split))
            res = jax.tree.map(np.asarray, step(state, tokens_BxL, padded.astype(np.int32), code, docs))
            want = {k: v[: len(rows_b)] for k, v in {**res["verify"], **res.get("diagnostics", {})}.items()}
            for name in ("gold_logprob", "entropy", "logprobs"):
                if name in want:
                    want[name] = want[name].astype(np.float16)
            got = store.read_rows(split, rows_b)
            bad_BxL, diffs = _compare_rows(got, want)
            for k, v in diffs.items():
                report["max_abs_diff"][k] = max(report["max_abs_diff"].get(k, 0.0), v)
            hash_ok = (
                got["token_hash"] == token_hash(tokens_BxL[: len(rows_b)])
                if "token_hash" in got
                else np.ones(len(rows_b), bool)
            )
            for j, r in enumerate(rows_b.tolist()):
                nbad = int(bad_BxL[j].sum())
                ok = bool(hash_ok[j]) and nbad <= position_tolerance * length
                report["rows_checked"] += 1
                report["positions_checked"] += length
                report["positions_mismatched"] += nbad
                report["rows_matched" if ok else "rows_mismatched"] += 1
                if not ok:
                    report["mismatches"].append(
                        {"split": split, "row": r, "positions": nbad, "token_hash_ok": bool(hash_ok[j])}
                    )
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _fmt(value: Any) -> str:
    return f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def scan(path: str) -> dict[str, Any]:
    """Every chunk read and checked: {"corrupt": {split: {array: [rows]}}, "corrupt_rows", "checked"}."""
    from rskd_jax.store.teacher import open_teacher_store
    from rskd_jax.store.tokens import open_token_store

    manifest = common.read_json(path) or {}
    if manifest.get("kind") == "tokens":
        store, checked_from = open_token_store(path), 2
        found = store.scan()
    else:
        from rskd_jax.store import teacher

        store, checked_from = open_teacher_store(path), teacher.CHECKED_FROM
        found = store.scan()
    corrupt = {split: {a: rows for a, rows in arrays.items() if rows} for split, arrays in found.items()}
    corrupt = {split: arrays for split, arrays in corrupt.items() if arrays}
    n = sum(len({r for rows in arrays.values() for r in rows}) for arrays in corrupt.values())
    return {"corrupt": corrupt, "corrupt_rows": n, "checked": int(manifest.get("layout_version", 1)) >= checked_from}


def print_text(info: dict[str, Any]) -> None:
    print(f"{info['kind']} store {info['path']}")
    for key in (
        "method",
        "k",
        "vocab_size",
        "num_sequences",
        "seq_len",
        "chunk_rows",
        "positions_done",
        "bytes_on_disk",
        "bytes_per_token",
        "mean_unique_ids",
        "bytes_per_entry",
    ):
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
    parser.add_argument(
        "--sample-rows", type=int, default=1024, help="done rows per split read for mean_unique_ids (0 = all)"
    )
    parser.add_argument(
        "--verify", type=int, default=0, metavar="N", help="recompute N random done rows of a teacher store and compare"
    )
    parser.add_argument("--tokens", default=None, help="--verify: the token store (default: the manifest's)")
    parser.add_argument("--teacher", default=None, help="--verify: the teacher's source (default: the manifest's)")
    parser.add_argument("--seed", type=int, default=0, help="--verify: which rows are drawn")
    parser.add_argument(
        "--position-tolerance",
        type=float,
        default=0.0,
        help="--verify: fraction of a row's positions allowed to differ (fsdp/tensor caches)",
    )
    parser.add_argument("--scan", action="store_true", help="read every chunk, list corrupt rows (exit 1)")
    args = parser.parse_args(argv)
    if args.scan:
        try:
            found = scan(args.path)
            info = (
                summary(args.path, args.sample_rows or None)
                if not found["corrupt_rows"]
                else {"kind": (common.read_json(args.path) or {}).get("kind"), "path": common.store_url(args.path)}
            )
        except (StoreError, ConfigError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        info["scan"] = found
        if args.json:
            print(json.dumps(info, sort_keys=True))
        else:
            print(
                f"{info['kind']} store {info['path']}: {found['corrupt_rows']} corrupt rows"
                + ("" if found["checked"] else " (layout 1: chunks carry no checksums)")
            )
            for split, arrays in found["corrupt"].items():
                for name, rows in arrays.items():
                    print(f"  CORRUPT {split}/{name} rows {rows[:50]}{' ...' if len(rows) > 50 else ''}")
        return 1 if found["corrupt_rows"] else 0
    try:
        info = summary(args.path, args.sample_rows or None)
        if args.verify:
            if info["kind"] != "teacher":
                raise StoreError(f"--verify checks teacher stores; {info['path']} is a {info['kind']} store")
            info["verify"] = verify(
                args.path,
                args.verify,
                tokens=args.tokens,
                teacher=args.teacher,
                seed=args.seed,
                position_tolerance=args.position_tolerance,
            )
    except (StoreError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print_text(info)
    if args.verify:
        v = info["verify"]
        if not args.json:
            print(
                f"  verify: {v['rows_matched']}/{v['rows_checked']} rows match, {v['positions_mismatched']} "
                f"positions differ, max abs diff {v['max_abs_diff']}"
            )
            for mm in v["mismatches"][:20]:
                print(
                    f"    MISMATCH {mm['split']} row {mm['row']}: {mm['positions']} positions, "
                    f"token_hash {'ok' if mm['token_hash_ok'] else 'DIFFERS'}"
                )
        return 1 if v["rows_mismatched"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
