"""A minimal reader of rskd_jax stores, written from docs/store_format.md alone.

Independent of the package on purpose: numpy, json, hashlib, zstandard and blosc only (no
tensorstore, no rskd_jax), and it reads the files byte by byte, so tests/test_store_format.py
can check the spec against what the writers really put on disk. Local directories only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import blosc
import numpy as np
import zstandard

EMPTY = 2**64 - 1  # shard index: offset = nbytes = 2^64 - 1 marks an inner chunk never written


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # CRC-32C (Castagnoli), reflected
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def strip_crc(data: bytes, what: str) -> bytes:
    """The crc32c codec: payload + uint32 little-endian crc32c(payload)."""
    if len(data) < 4 or crc32c(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"crc32c mismatch in {what}")
    return data[:-4]


def _dtype(meta: dict, codecs: list[dict]) -> np.dtype:
    endian = codecs[0].get("configuration", {}).get("endian", "little")  # absent for 1-byte types
    return np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")


def decode_chunk(data: bytes, codecs: list[dict], meta: dict, shape: list[int], what: str) -> np.ndarray:
    """Undo a codec chain [bytes, (blosc | zstd)?, crc32c?] from the last codec to the first."""
    dtype = _dtype(meta, codecs)
    for codec in reversed(codecs[1:]):
        name = codec["name"]
        if name == "crc32c":
            data = strip_crc(data, what)
        elif name == "blosc":
            data = blosc.decompress(data)
        elif name == "zstd":
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=math.prod(shape) * dtype.itemsize)
        else:
            raise ValueError(f"codec {name} is not in the spec")
    assert codecs[0]["name"] == "bytes"
    return np.frombuffer(data, dtype).reshape(shape)  # C order


def read_array(path: str, have: list | None = None) -> np.ndarray:
    """A whole zarr3 array (regular grid, default keys `c/i/j`): missing chunks are fill values
    (`have`, if given, gets a bool array: True where a stored chunk covers the element)."""
    with open(os.path.join(path, "zarr.json")) as f:
        meta = json.load(f)
    shape, chunk = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    assert meta["chunk_key_encoding"]["name"] == "default"
    grid = [math.ceil(s / c) for s, c in zip(shape, chunk)]
    out = np.full([g * c for g, c in zip(grid, chunk)], meta["fill_value"], meta["data_type"])
    stored = np.zeros(out.shape, bool)
    for cell in np.ndindex(*grid):
        key = os.path.join(path, "c", *map(str, cell))
        if not os.path.exists(key):
            continue
        with open(key, "rb") as f:
            data = f.read()
        at = tuple(slice(i * c, (i + 1) * c) for i, c in zip(cell, chunk))
        codecs = meta["codecs"]
        if codecs[0]["name"] != "sharding_indexed":
            out[at], stored[at] = decode_chunk(data, codecs, meta, chunk, key), True
            continue
        cfg = codecs[0]["configuration"]
        assert cfg.get("index_location", "end") == "end"
        inner = cfg["chunk_shape"]
        per_shard = [c // i for c, i in zip(chunk, inner)]
        n = math.prod(per_shard)
        crc = any(c["name"] == "crc32c" for c in cfg["index_codecs"])
        index = data[len(data) - 16 * n - 4 * crc :]
        if crc:
            index = strip_crc(index, key + " (shard index)")
        pairs = np.frombuffer(index, "<u8").reshape(n, 2)  # (offset, nbytes), inner chunks in C order
        for j, (offset, nbytes) in enumerate(pairs.tolist()):
            if offset == EMPTY and nbytes == EMPTY:
                continue
            sub = np.unravel_index(j, per_shard)
            where = tuple(slice(a.start + s * i, a.start + (s + 1) * i) for a, s, i in zip(at, sub, inner))
            out[where] = decode_chunk(data[offset : offset + nbytes], cfg["codecs"], meta, inner, f"{key}[{j}]")
            stored[where] = True
    crop = tuple(slice(0, s) for s in shape)
    if have is not None:
        have.append(stored[crop])
    return out[crop]


def read_manifest(root: str) -> dict:
    with open(os.path.join(root, "manifest.json")) as f:
        return json.load(f)


def fingerprint(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ranks_of(gaps: np.ndarray) -> np.ndarray:
    """Gap coding: the first entry is its rank, each next one rank - previous rank - 1."""
    return np.cumsum(gaps + (np.arange(len(gaps)) > 0))


def decode_teacher(root: str, split: str) -> dict[str, np.ndarray]:
    """Every row of `split`, dense like `read_rows`: ids/weights/counts [S, L, K] (empty slots
    0), num_ids [S, L], done [S] bool, diagnostics and token_hash as stored."""
    man = read_manifest(root)
    assert man["kind"] == "teacher" and not man.get("creating") and man["layout_version"] <= 2
    lay = man["layout"]
    L, K, V = lay["seq_len"], lay["k"], lay["vocab_size"]
    raw, have = {}, []
    for name in sorted(os.listdir(os.path.join(root, split)), key=lambda x: x != "done"):  # done first
        raw[name] = read_array(os.path.join(root, split, name), have)
        if name != "done" and not have[-1][raw["done"] == 1].all():
            raise ValueError(f"{split}/{name}: a chunk of a done row is missing")
    table = np.arange(V)
    if lay["rank_table"] is not None:
        table = read_array(os.path.join(root, "rank_to_id")).astype(np.int64)
        if fingerprint(table.tolist()) != lay["rank_table"]:
            raise ValueError("rank_to_id does not match manifest layout.rank_table")
    S = len(raw["done"])
    out = {"done": raw["done"] == 1}
    for name in ("gold_logprob", "entropy", "tail_mass", "logprobs"):
        if name in raw:
            out[name] = raw[name].astype(np.float32)
    if "token_hash" in raw:
        out["token_hash"] = raw["token_hash"]
    if lay["method"] == "full":  # all V log-probs, no entries
        return out
    n = raw["num_ids"].astype(np.int64)
    ids, counts, weights = np.zeros((S, L, K), np.int32), np.zeros((S, L, K), np.int32), np.zeros((S, L, K), np.float32)
    for r in np.flatnonzero(out["done"]):  # rows not done hold fill values (or nothing)
        start = np.concatenate([[0], np.cumsum(n[r])])  # position l's entries: [start[l], start[l+1])
        for pos in range(L):
            e = slice(start[pos], start[pos + 1])
            m = n[r, pos]
            ids[r, pos, :m] = table[ranks_of(raw["ids"][r, e].astype(np.int64))]
            if "counts" in raw:
                c = raw["counts"][r, e].astype(np.int64) + 1
                c[0] = K - c[1:].sum()
                counts[r, pos, :m] = c
                weights[r, pos, :m] = c / np.float32(K)
            if "weights" in raw:
                weights[r, pos, :m] = raw["weights"][r, e]
    out.update(ids=ids, num_ids=n.astype(np.int32), weights=weights)
    if "counts" in raw:
        out["counts"] = counts
    return out


def decode_tokens(root: str) -> dict[str, dict[str, np.ndarray]]:
    """{split: {"tokens": int32 [S, L], "doc_starts": uint8 [S, L] (if recorded)}}, hashes checked."""
    man = read_manifest(root)
    assert man["kind"] == "tokens" and man["complete"] is True
    out, h, hs = {}, hashlib.sha256(), hashlib.sha256()
    for name in sorted(man["splits"]):
        info = man["splits"][name]
        arr = {"tokens": read_array(os.path.join(root, info["array"]))}
        if info.get("doc_starts"):
            arr["doc_starts"] = read_array(os.path.join(root, info["doc_starts"]))
        assert arr["tokens"].shape == (info["num_sequences"], man["seq_len"])
        h.update(f"{name}:{list(arr['tokens'].shape)};".encode() + arr["tokens"].astype("<i4").tobytes())
        if "doc_starts" in arr:
            hs.update(f"{name}:{list(arr['tokens'].shape)};".encode() + arr["doc_starts"].tobytes())
        out[name] = arr
    if h.hexdigest()[:16] != man["content_hash"]:
        raise ValueError("tokens do not match manifest content_hash")
    if "doc_starts_hash" in man and hs.hexdigest()[:16] != man["doc_starts_hash"]:
        raise ValueError("doc_starts do not match manifest doc_starts_hash")
    return out


M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def token_hash(row: np.ndarray) -> int:
    """mix(L xor sum_i mix(i << 32 | uint32(token_i)) mod 2^64) for one row of tokens."""
    total = sum(_mix64((i << 32) | (int(t) & 0xFFFFFFFF)) for i, t in enumerate(row)) & M64
    return _mix64(total ^ len(row))
