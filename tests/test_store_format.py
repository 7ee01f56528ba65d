"""docs/store_format.md is precise enough to write a reader: tests/store_format_decoder.py,
written from it alone (numpy, zstandard, blosc; no tensorstore, no rskd_jax.store), decodes
stores made by the real writers field for field like their own readers, checks every crc32c,
and catches a wrong decoding rule or a flipped bit."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import store_format_decoder as dec  # tests/ is on sys.path (pytest's rootdir-relative import)

from rskd_jax.store.teacher import create_teacher_store, open_teacher_store
from rskd_jax.store.tokens import open_token_store, write_token_store

S, L, V, CR = 10, 12, 300, 4  # S not a multiple of chunk_rows: the last shard is partial
DONE_BLOCKS = (0, 8)  # rows 4..7 stay not done: their files are absent


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    rng = np.random.default_rng(0)
    splits = {"train": rng.integers(0, V, (S, L)).astype(np.int32), "val": rng.integers(0, V, (3, L)).astype(np.int32)}
    splits["train"][1, 5] = splits["train"][6, 0] = 2  # some documents end inside a row (EOS 2)
    url = str(tmp_path_factory.mktemp("tokens"))
    write_token_store(url, splits, {"tokenizer": {"vocab_size": V, "eos_id": 2}, "eos_id": 2})
    return url, splits


def _targets(rng, method: str, k: int, zipf: np.ndarray):
    """Sparse targets [S, L, k] as a teacher would give them: ids in any slot order."""
    ids, counts, weights = np.zeros((S, L, k), np.int64), np.zeros((S, L, k), np.int64), np.zeros((S, L, k))
    for s in range(S):
        for pos in range(L):
            if method == "sample":
                u, c = np.unique(rng.choice(V, k, p=zipf), return_counts=True)
            else:  # top_k, ghost: k distinct ids with probabilities
                u, c = rng.choice(V, k, replace=False, p=zipf), np.zeros(k)
            order = rng.permutation(len(u))
            ids[s, pos, : len(u)], counts[s, pos, : len(u)] = u[order], c[order]
            weights[s, pos, : len(u)] = rng.dirichlet(np.ones(len(u)))
    return ids, counts, weights


# (method, k, temperature, id_frequencies, diagnostics, token_hash): the rank table and the
# identity, counts only / counts + weights / weights only, a tail mass, all log-probs.
TEACHERS = {
    "sample": ("sample", 16, 1.0, True, True, True),
    "sample_tempered": ("sample", 16, 0.7, False, False, False),
    "top_k": ("top_k", 5, 1.0, True, True, False),
    "ghost": ("ghost", 3, 1.0, False, False, True),
    "full": ("full", V, 1.0, False, True, False),
}


@pytest.fixture(scope="module", params=sorted(TEACHERS))
def teacher(request, tokens, tmp_path_factory):
    method, k, temp, freq, diag, hashed = TEACHERS[request.param]
    rng = np.random.default_rng(1)
    zipf = 1.0 / np.arange(1, V + 1)
    zipf = zipf[rng.permutation(V)] / zipf.sum()  # frequent ids are not the small ones
    url = str(tmp_path_factory.mktemp(request.param))
    store = create_teacher_store(
        url,
        manifest={"seed": 0},
        num_rows={"train": S},
        seq_len=L,
        method=method,
        k=k,
        vocab_size=V,
        chunk_rows=CR,
        diagnostics=diag,
        temperature=temp,
        token_hash=hashed,
        id_frequencies=np.round(zipf * 1e6) if freq else None,
    )
    ids, counts, weights = _targets(rng, method, k, zipf) if method != "full" else (None, None, None)
    for start in DONE_BLOCKS:
        rows = slice(start, min(S, start + CR))
        b = len(range(S)[rows])
        block = {"logprobs": rng.normal(size=(b, L, V))} if method == "full" else {"ids": ids[rows]}
        if method == "sample":
            block["counts"] = counts[rows]
        if method == "ghost":
            block["tail_mass"] = rng.uniform(size=(b, L))
        if method not in ("sample", "full") or temp != 1.0:
            block["weights"] = weights[rows] * (counts[rows] > 0 if method == "sample" else 1)
        if diag:
            block["gold_logprob"] = rng.normal(size=(b, L))
            block["entropy"] = rng.exponential(size=(b, L))
        if hashed:
            block["tokens"] = tokens[1]["train"][rows]
        store.write_rows("train", start, block).result()
    store.close()
    return url


def test_decoder_is_independent():
    tree = ast.parse(pathlib.Path(dec.__file__).read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "hashlib", "json", "math", "os", "numpy", "zstandard", "blosc"}, imported


def _sharded(teacher: str) -> str:
    """A sharded per-row array of the store: ids, or (method full) gold_logprob."""
    return "ids" if os.path.isdir(os.path.join(teacher, "train", "ids")) else "gold_logprob"


def test_crc32c_by_hand(teacher):
    assert dec.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    # one inner chunk of one shard: [offset, offset + nbytes) ends with crc32c of the rest
    path = os.path.join(teacher, "train", _sharded(teacher), "c", "0", "0")
    data = pathlib.Path(path).read_bytes()
    index = data[-(16 * CR + 4) :]
    offset, nbytes = (int.from_bytes(index[i : i + 8], "little") for i in (16, 24))  # row 1
    chunk = data[offset : offset + nbytes]
    crc = 0xFFFFFFFF  # bit by bit, no table: reflected polynomial 0x82F63B78
    for byte in chunk[:-4]:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    assert crc ^ 0xFFFFFFFF == int.from_bytes(chunk[-4:], "little")
    assert dec.crc32c(index[:-4]) == int.from_bytes(index[-4:], "little")  # the index's own


def test_teacher_store_decodes_like_read_rows(teacher, tokens):
    got = dec.decode_teacher(teacher, "train")
    store = open_teacher_store(teacher)
    done = np.flatnonzero(got["done"])
    assert done.tolist() == np.flatnonzero(store.done_mask("train")).tolist() == [0, 1, 2, 3, 8, 9]
    want = store.read_rows("train", done)
    assert set(want) == set(got) - {"done"}
    for name, value in want.items():
        np.testing.assert_array_equal(got[name][done], value, err_msg=name)
        assert got[name].dtype == value.dtype, name
    if "token_hash" in got:  # the hash of the token store's rows, recomputed from the spec
        rows = dec.decode_tokens(tokens[0])["train"]["tokens"]
        assert [dec.token_hash(rows[r]) for r in done] == got["token_hash"][done].tolist()


def test_token_store_decodes_like_read(tokens):
    url, splits = tokens
    got = dec.decode_tokens(url)
    store = open_token_store(url)
    assert sorted(got) == sorted(splits)
    for name, arrays in got.items():
        np.testing.assert_array_equal(arrays["tokens"], store.read(name, np.arange(store.num_rows(name))))
        np.testing.assert_array_equal(arrays["tokens"], splits[name])
        if hasattr(store, "read_doc_starts"):  # layout with doc_starts (branch data)
            np.testing.assert_array_equal(
                arrays["doc_starts"].astype(bool), store.read_doc_starts(name, np.arange(len(splits[name])))
            )


def test_a_wrong_rule_or_a_flipped_bit_is_caught(teacher, tmp_path, monkeypatch):
    want = open_teacher_store(teacher).read_rows("train", np.arange(4))
    if "ids" in want:  # gaps read as plain differences (no "- 1"): other ids, a failed comparison
        monkeypatch.setattr(dec, "ranks_of", np.cumsum)
        assert not np.array_equal(dec.decode_teacher(teacher, "train")["ids"][:4], want["ids"])
        monkeypatch.undo()
    # one flipped bit inside an inner chunk of a copy: the decoder's crc32c check raises
    copy = str(tmp_path / "copy")
    shutil.copytree(teacher, copy)
    path = os.path.join(copy, "train", _sharded(teacher), "c", "0", "0")
    data = bytearray(pathlib.Path(path).read_bytes())
    data[5] ^= 0x10
    pathlib.Path(path).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crc32c mismatch"):
        dec.decode_teacher(copy, "train")
    # a done row's shard file gone: an error, not fill values (zarr's rule)
    os.remove(path)
    with pytest.raises(ValueError, match="chunk of a done row is missing"):
        dec.decode_teacher(copy, "train")


def test_the_specs_test_vectors():
    assert dec.token_hash(np.array([1, 2, 3])) == 0xC4F03F621EA0E3C7
    assert dec.token_hash(np.array([-1, 49151, 0, 7])) == 0xC2FE08FE9177B14A
    assert dec.fingerprint([2, 0, 1]) == "a50c12ec8e20411b"
    assert dec.ranks_of(np.array([0, 4, 3])).tolist() == [0, 5, 9]  # the worked example


def test_manifest_fields_the_spec_names(teacher):
    man = json.loads(pathlib.Path(teacher, "manifest.json").read_text())
    assert man["kind"] == "teacher" and man["layout_version"] == 2 and "creating" not in man
    assert {
        "method",
        "k",
        "vocab_size",
        "seq_len",
        "chunk_rows",
        "num_rows",
        "diagnostics",
        "temperature",
        "rank_table",
        "compression",
        "encoding",
    } <= set(man["layout"])
