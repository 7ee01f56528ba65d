"""Corruption is never silent: single-bit flips in chunk files, `inspect_store.py --scan`,
unchecked (layout 1) stores, and a trainer that stops on a corrupt chunk with the message."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tiny_stores import unique_counts

from rskd_jax.store import common
from rskd_jax.store.common import StoreError
from rskd_jax.store.teacher import create_teacher_store, open_teacher_store
from rskd_jax.store.tokens import open_token_store, write_token_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, L, K = 300, 32, 8


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A token store and a `sample` teacher store (N = K draws, diagnostics, token hashes)."""
    root = tmp_path_factory.mktemp("integrity")
    rng = np.random.default_rng(0)
    splits = {"train": rng.integers(0, V, (24, L)).astype(np.int32), "val": rng.integers(0, V, (8, L)).astype(np.int32)}
    write_token_store(str(root / "tokens"), splits, {"tokenizer": {"fingerprint": "t", "vocab_size": V}})
    store = create_teacher_store(
        str(root / "teacher"),
        manifest={},
        num_rows={"train": 24, "val": 8},
        seq_len=L,
        method="sample",
        k=K,
        vocab_size=V,
        chunk_rows=8,
        token_hash=True,
        id_frequencies=np.bincount(splits["train"].ravel(), minlength=V),
    )
    for split, toks in splits.items():
        n = len(toks)
        draws = np.sort(rng.integers(0, V, (n, L, K)), axis=-1)
        ids, counts = unique_counts(draws, np.int64)
        store.write_rows(
            split,
            0,
            {
                "ids": ids,
                "counts": counts,
                "tokens": toks,
                "gold_logprob": -rng.random((n, L)),
                "entropy": rng.random((n, L)),
            },
        ).result()
    store.close()
    return root


def _tool(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_no_single_bit_flip_reads_back_silently(stores):
    res = _tool(
        "tools/flip_bits.py", str(stores / "tokens"), str(stores / "teacher"), "--flips", "20", "--seed", "3", "--json"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert out["silent"] == 0
    for r in out["stores"]:
        assert r["error"] + r["same"] == 20 and r["error"] >= 15, r
        assert "is corrupt or truncated" in r["example_message"] and "rows [" in r["example_message"]


def test_without_checksums_flips_do_read_back_silently(stores, tmp_path):
    """The same check on a store whose chunks carry no crc32c (layout 1) finds silent reads: the
    check can fail, and the checksums are what makes it pass."""
    plain = tmp_path / "tokens_v1"
    shutil.copytree(stores / "tokens", plain)
    arr = common.open_array(str(plain), "train/tokens")
    values = arr.read().result()
    meta_path = plain / "train" / "tokens" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    inner = meta["codecs"][0]["configuration"]
    inner["codecs"] = [c for c in inner["codecs"] if c["name"] != "crc32c"]
    common.create_array(
        str(plain),
        "train/tokens",
        shape=values.shape,
        dtype="int32",
        chunk_shape=tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]),
        codecs=meta["codecs"],
        fill_value=-1,
    ).write(values).result()
    manifest = common.read_json(str(plain))
    manifest.pop("splits")["val"]
    common.write_json(
        str(plain),
        dict(
            manifest,
            layout_version=1,
            splits={"train": {"num_sequences": 24, "num_tokens": 24 * L, "array": "train/tokens"}},
        ),
    )
    res = _tool("tools/flip_bits.py", str(plain), "--flips", "20", "--seed", "3", "--json")
    assert json.loads(res.stdout)["silent"] > 0


def test_layout_1_stores_open_with_a_warning(stores, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(stores / "teacher", old)
    common.write_json(str(old), dict(common.read_json(str(old)), layout_version=1))
    with caplog.at_level(logging.WARNING, logger="rskd_jax.store"):
        open_teacher_store(str(old)).read_rows("train", np.arange(3))
    assert "carry no checksums" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rskd_jax.store"):
        open_teacher_store(str(stores / "teacher"))
        open_token_store(str(stores / "tokens"))
    assert "checksums" not in caplog.text


def _flip(path, byte=40, bit=2):
    data = bytearray(open(path, "rb").read())
    data[byte] ^= 1 << bit
    open(path, "wb").write(bytes(data))


def test_scan_lists_corrupt_rows_and_exits_1(stores, tmp_path):
    bad = tmp_path / "teacher"
    shutil.copytree(stores / "teacher", bad)
    assert _tool("tools/inspect_store.py", str(bad), "--scan", "--json").returncode == 0
    _flip(bad / "train" / "ids" / "c" / "1" / "0")  # rows 8-15; byte 40 is in the first row's chunk
    _flip(bad / "val" / "done" / "c" / "0", byte=2)
    res = _tool("tools/inspect_store.py", str(bad), "--scan", "--json")
    assert res.returncode == 1, res.stderr
    scan = json.loads(res.stdout)["scan"]
    assert scan["checked"] and scan["corrupt"]["train"] == {"ids": [8]}
    assert scan["corrupt"]["val"] == {"done": list(range(8))}
    with pytest.raises(StoreError, match=r"train/ids rows \[8\]"):
        open_teacher_store(str(bad)).read_rows("train", np.array([3, 8, 20]))
    open_teacher_store(str(bad)).read_rows("train", np.array([3, 9, 20]))  # the rest still reads
    toks = tmp_path / "tokens"
    shutil.copytree(stores / "tokens", toks)
    _flip(toks / "train" / "tokens" / "c" / "0" / "0", byte=5)
    res = _tool("tools/inspect_store.py", str(toks), "--scan")
    assert res.returncode == 1 and "CORRUPT train/tokens rows [0, 1" in res.stdout
