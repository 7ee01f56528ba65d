"""Token store, the data program end to end, and grain batches over row sources (train_data)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from rskd_jax.config import DataRun, load_config
from rskd_jax.data import DataError, expand_inputs, main, pack, run, split_of
from rskd_jax.store.common import StoreError, read_json, write_json
from rskd_jax.store.tokens import content_hash, open_token_store, write_token_store
from rskd_jax.train_data import Rows, make_batch_iterator

L = 16


def files_under(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, fs in os.walk(root)
        for f in fs
    }


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    splits = {
        "train": rng.integers(0, 1000, (300, L), dtype=np.int32),
        "val": rng.integers(0, 1000, (7, L), dtype=np.int32),
    }
    write_token_store(str(tmp_path / "s"), splits, {"tokenizer": {"fingerprint": "t"}})
    return str(tmp_path / "s"), splits


# ----------------------------------------------------------------------------- token store


def test_store_round_trip(store):
    url, splits = store
    s = open_token_store(url)
    assert (s.seq_len, s.num_rows("train"), s.num_rows("val"), s.splits) == (L, 300, 7, ("train", "val"))
    assert s.fingerprint == content_hash(splits) == s.manifest["content_hash"]
    m = s.manifest
    assert (m["kind"], m["complete"], m["tokenizer"]) == ("tokens", True, {"fingerprint": "t"})
    assert m["splits"]["train"] == {
        "num_sequences": 300,
        "num_tokens": 300 * L,
        "array": "train/tokens",
        "doc_starts": "train/doc_starts",
    }
    # no eos_id in this manifest: each split is one document
    assert np.array_equal(s.segment_ids("train", np.array([0, 5])), np.zeros((2, L), np.int32))
    assert s.read_doc_starts("train", np.array([0, 5]))[:, 0].tolist() == [True, False]
    idx = np.array([299, 0, 17, 17, 150])
    out = s.read("train", idx)
    assert out.dtype == np.int32 and np.array_equal(out, splits["train"][idx])
    assert np.array_equal(s.read("val", np.arange(7)), splits["val"])
    assert s.read("train", np.array([], int)).shape == (0, L)
    with pytest.raises(IndexError, match=r"\[300\] out of range"):
        s.read("train", np.array([1, 300]))
    with pytest.raises(KeyError, match="no split 'test'"):
        s.read("test", idx)


def test_store_refusals(tmp_path, store):
    url, splits = store
    with pytest.raises(StoreError, match="no token store at"):
        open_token_store(str(tmp_path / "missing"))
    before = files_under(url)
    with pytest.raises(StoreError, match="differs in: content_hash, splits.*left untouched.*overwrite=true"):
        write_token_store(url, {"train": splits["train"][:10]}, {"tokenizer": {"fingerprint": "t"}})
    with pytest.raises(StoreError, match=r"differs in: tokenizer\)"):
        write_token_store(url, splits, {"tokenizer": {"fingerprint": "other"}})
    assert files_under(url) == before  # refused: not a byte touched
    mtime = os.path.getmtime(os.path.join(url, "manifest.json"))
    write_token_store(url, splits, {"tokenizer": {"fingerprint": "t"}})  # same data: left as is
    assert os.path.getmtime(os.path.join(url, "manifest.json")) == mtime

    shutil.copytree(url, tmp_path / "bad")
    bad = str(tmp_path / "bad")
    m = read_json(bad)
    write_json(bad, dict(m, splits=dict(m["splits"], val=dict(m["splits"]["val"], num_sequences=8))))
    with pytest.raises(StoreError, match=r"val/tokens is \(7, 16\) int32, the manifest says \(8, 16\).*corrupt"):
        open_token_store(bad)
    write_json(bad, dict(m, kind="teacher"))
    with pytest.raises(StoreError, match="is a 'teacher' store, not a token store"):
        open_token_store(bad)
    write_json(bad, {k: v for k, v in m.items() if k != "complete"})
    with pytest.raises(StoreError, match="incomplete.*interrupted.*Re-run `python -m rskd_jax.data`"):
        open_token_store(bad)
    write_token_store(bad, splits, {"tokenizer": {"fingerprint": "t"}})  # an interrupted write is redone
    assert open_token_store(bad).fingerprint == content_hash(splits)
    os.remove(os.path.join(bad, "train", "tokens", "c", "0", "0"))
    with pytest.raises(StoreError, match=r"missing chunk files \['train/tokens/c/0/0'\]"):
        open_token_store(bad)
    os.remove(os.path.join(bad, "manifest.json"))
    with pytest.raises(StoreError, match="has no manifest.json"):
        open_token_store(bad)
    with pytest.raises(StoreError, match="not empty and has no manifest.json"):
        write_token_store(bad, splits, {})
    write_token_store(url, {"train": splits["train"][:64]}, {}, overwrite=True)
    s = open_token_store(url)
    assert s.splits == ("train",) and s.num_rows("train") == 64
    assert not os.path.exists(os.path.join(url, "val"))  # replaced, not merged


# ----------------------------------------------------------------------------- data program


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    import inspect
    import textwrap

    sources = {
        "a.py": inspect.getsource(textwrap),
        "pkg/b.py": inspect.getsource(json.decoder),
        "pkg/sub/c.md": "# Title\n\nSome *markdown* text, numbers 1 2 3.\n" * 20,
        "notes.txt": "plain text\n" * 50,
        ".git/config": "[core]\n",
        "skip.bin": "binary",
    }
    for name, text in sources.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8
    (root / "empty.py").write_bytes(b"")
    return root


def test_expand_inputs(corpus):
    docs, sources = expand_inputs([str(corpus)], (".py", ".md", ".txt"))
    assert [d.rel for d in docs] == ["a.py", "empty.py", "latin1.py", "notes.txt", "pkg/b.py", "pkg/sub/c.md"]
    docs, sources = expand_inputs(
        [f"{corpus}/**/*.py", str(corpus / "notes.txt"), f"{corpus}/a.py"], exclude=["*/latin1.py"]
    )
    assert [d.rel for d in docs] == ["a.py", "empty.py", "notes.txt", "pkg/b.py"]
    assert [s["files"] for s in sources] == [3, 1, 0]  # a.py only counted once
    docs, _ = expand_inputs(["@stdlib"])
    rels = {d.rel for d in docs}
    assert "json/decoder.py" in rels and "os.py" in rels
    assert not any(r.startswith(("test/", "idlelib/idle_test/", "site-packages/")) or "/tests/" in r for r in rels)
    assert [d.rel for d in expand_inputs(["@stdlib/json/*.py"])[0]][:2] == ["json/__init__.py", "json/decoder.py"]
    with pytest.raises(DataError, match="'nope/' is not a file, a directory or a matching glob"):
        expand_inputs(["nope/"])
    with pytest.raises(DataError, match="the glob '.*/nope/\\*.py' matches nothing"):
        expand_inputs([str(corpus), f"{corpus}/nope/*.py"])


def test_split_by_content_hash_is_stable():
    texts = [f"document {i}\n" for i in range(4000)]
    splits = [split_of(t, 0.1) for t in texts]
    assert splits == [split_of(t, 0.1) for t in texts]  # independent of order and of other docs
    share = splits.count("val") / len(texts)
    assert abs(share - 0.1) < 4 * (0.1 * 0.9 / len(texts)) ** 0.5
    assert all(split_of(t, 0.0) == "train" for t in texts[:100])
    # Raising val_fraction only moves documents train -> val, never back.
    assert all(b == "val" for a, b in zip(splits, [split_of(t, 0.2) for t in texts]) if a == "val")
    assert np.array_equal(pack(np.arange(10, dtype=np.int32), 4), np.arange(8).reshape(2, 4))


def test_data_program_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "tokens"
    main(
        [
            "data.inputs=" + str(corpus),
            f"data.output={out}",
            f"data.seq_len={L}",
            "data.val_fraction=0.3",
            "data.workers=0",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == {
        "non_utf8": 1,
        "unreadable": 0,
        "empty": 1,
        "bad_json": 0,
        "missing_key": 0,
        "not_string": 0,
        "examples": ["empty.py (empty)", "latin1.py (non_utf8)"],
    }
    assert sum(summary["documents"].values()) == 4 and summary["unchanged"] is False
    s = open_token_store(str(out))
    assert {k: s.num_rows(k) for k in s.splits} == summary["rows"] and summary["rows"]["train"] > 0
    m = s.manifest
    assert m["tokenizer"]["vocab_size"] == 49152 and m["eos_id"] == 2 and m["seq_len"] == L
    assert m["sources"] == [{"input": str(corpus), "path": str(corpus), "files": 6}]
    cfg = load_config(DataRun, str(out / "config.yaml"))
    assert cfg.data.seq_len == L and cfg.data.output == str(out)
    # Rows are the documents (sorted, each + EOS) concatenated: row 0 starts the first train doc.
    from rskd_jax.tokenizer import load_tokenizer

    first = next(
        p
        for p in ("a.py", "notes.txt", "pkg/b.py", "pkg/sub/c.md")
        if split_of((corpus / p).read_text(), 0.3) == "train"
    )
    row0 = load_tokenizer().decode(s.read("train", np.array([0]))[0])
    assert len(row0) > 10 and (corpus / first).read_text().startswith(row0)
    eos_count = sum(int((s.read(k, np.arange(s.num_rows(k))) == 2).sum()) for k in s.splits)
    assert eos_count <= 4

    # Deterministic: a second run elsewhere writes byte-identical arrays and manifest.
    cfg2 = load_config(
        DataRun,
        None,
        [
            "data.inputs=" + str(corpus),
            f"data.output={tmp_path / 'again'}",
            f"data.seq_len={L}",
            "data.val_fraction=0.3",
            "data.workers=0",
        ],
    )
    summary2 = run(cfg2, progress=False)
    a, b = files_under(out), files_under(tmp_path / "again")
    a.pop("config.yaml"), b.pop("config.yaml")
    assert a == b and summary2["content_hash"] == summary["content_hash"]
    assert run(cfg2, progress=False)["unchanged"] is True
    # A different config at the same output is refused until overwrite=true.
    with pytest.raises(StoreError, match="left untouched"):
        run(
            load_config(DataRun, None, [f"data.inputs={corpus}/a.py", f"data.output={out}", "data.workers=0"]),
            progress=False,
        )
    capped = run(
        load_config(
            DataRun,
            None,
            [
                f"data.inputs={corpus}",
                f"data.output={out}",
                "data.seq_len=16",
                "data.max_tokens=100",
                "data.overwrite=true",
                "data.workers=0",
            ],
        ),
        progress=False,
    )
    assert capped["tokens"] == 100 and sum(capped["rows"].values()) <= 100 // 16


def test_data_program_empty_inputs(tmp_path):
    (tmp_path / "only.bin").write_bytes(b"x")
    (tmp_path / "empty.py").write_bytes(b"")
    with pytest.raises(DataError, match="give no files"):
        run(load_config(DataRun, None, [f"data.inputs={tmp_path}", "data.extensions=.rst"]), progress=False)
    with pytest.raises(
        DataError,
        match=r"data.inputs '.*' \(1 files\) gave no document: every record was "
        r"skipped \(all inputs: \{'empty': 1\}, e.g. \['empty.py \(empty\)'\]\)",
    ):
        run(
            load_config(DataRun, None, [f"data.inputs={tmp_path}", f"data.output={tmp_path}/o", "data.workers=0"]),
            progress=False,
        )


# ----------------------------------------------------------------------------- batches


def indices(it, n):
    return [next(it)["index"] for _ in range(n)]


def test_batches_shuffle_by_seed_and_epochs(store):
    url, splits = store
    src = Rows(open_token_store(url), "train")
    it = make_batch_iterator(src, global_batch_size=32, seed=7)
    batches = [next(it) for _ in range(20)]  # 9 batches per epoch (300 // 32), so 2+ epochs
    for b in batches:
        assert b["tokens"].shape == (32, L) and b["index"].dtype == np.int64
        assert np.array_equal(b["tokens"], splits["train"][b["index"]])
    epoch0 = np.concatenate([b["index"] for b in batches[:9]])
    epoch1 = np.concatenate([b["index"] for b in batches[9:18]])
    assert len(set(epoch0)) == len(set(epoch1)) == 288  # no repeats within an epoch
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    again = indices(make_batch_iterator(src, global_batch_size=32, seed=7), 20)
    assert all(np.array_equal(a, b["index"]) for a, b in zip(again, batches))
    other = indices(make_batch_iterator(src, global_batch_size=32, seed=8), 3)
    assert not all(np.array_equal(a, b["index"]) for a, b in zip(other, batches))
    ordered = indices(make_batch_iterator(src, global_batch_size=32, seed=0, shuffle=False), 2)
    assert np.array_equal(np.concatenate(ordered), np.arange(64))
    assert len(list(make_batch_iterator(src, global_batch_size=32, seed=0, num_epochs=2))) == 18


def test_batches_per_process_slices_partition_global_batch(store):
    src = Rows(open_token_store(store[0]), "train")
    glob = indices(make_batch_iterator(src, global_batch_size=24, seed=3), 15)
    for count in (2, 4):
        parts = [
            indices(make_batch_iterator(src, global_batch_size=24, seed=3, process_index=p, process_count=count), 15)
            for p in range(count)
        ]
        for step in range(15):
            assert np.array_equal(np.concatenate([parts[p][step] for p in range(count)]), glob[step])
    with pytest.raises(
        DataError,
        match="global_batch_size 10 is not a positive multiple of the process count "
        r"\(4\); set batch_size to a multiple of 4",
    ):
        make_batch_iterator(src, global_batch_size=10, seed=0, process_count=4)
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_batch_iterator(src, global_batch_size=512, seed=0)


def test_batches_state_restore_is_exact(store):
    src = Rows(open_token_store(store[0]), "train")
    make = lambda: make_batch_iterator(src, global_batch_size=32, seed=5, process_index=1, process_count=2)
    reference = indices(make(), 25)
    for k in (0, 4, 9, 13):  # 9 = an epoch boundary
        it = make()
        indices(it, k)
        state = json.loads(json.dumps(it.get_state()))  # survives JSON
        resumed = make()
        resumed.set_state(state)
        assert all(np.array_equal(a, b) for a, b in zip(indices(resumed, 25 - k), reference[k:]))


def test_last_partial_batch_is_padded(store):
    url, splits = store
    src = Rows(open_token_store(url), "val")  # 7 rows
    parts = [
        list(
            make_batch_iterator(
                src,
                global_batch_size=4,
                seed=0,
                shuffle=False,
                num_epochs=1,
                drop_remainder=False,
                process_index=p,
                process_count=2,
            )
        )
        for p in range(2)
    ]
    assert [[b["index"].tolist() for b in part] for part in parts] == [[[0, 1], [4, 5]], [[2, 3], [6, -1]]]
    last = parts[1][1]
    assert np.array_equal(last["tokens"][0], splits["val"][6]) and not last["tokens"][1].any()


def test_layout_1_stores_open_without_doc_starts(store, tmp_path):
    """A store written before document starts were recorded still reads; asking for its
    starts says how to get them."""
    url, splits = store
    shutil.copytree(url, tmp_path / "old")
    old = str(tmp_path / "old")
    m = read_json(old)
    write_json(
        old,
        dict(
            m,
            layout_version=1,
            splits={k: {kk: vv for kk, vv in v.items() if kk != "doc_starts"} for k, v in m["splits"].items()},
        ),
    )
    for name in ("train", "val"):
        shutil.rmtree(os.path.join(old, name, "doc_starts"))
    s = open_token_store(old)
    assert not s.has_doc_starts and np.array_equal(s.read("val", np.arange(7)), splits["val"])
    with pytest.raises(StoreError, match="no document starts.*data.overwrite=true"):
        s.segment_ids("train", np.array([0]))


def test_doc_starts_follow_eos(tmp_path):
    tokens = np.array([[5, 2, 7, 8], [2, 2, 9, 2], [4, 4, 4, 4]], np.int32)  # eos = 2
    write_token_store(str(tmp_path / "s"), {"train": tokens}, {"eos_id": 2})
    s = open_token_store(str(tmp_path / "s"))
    assert s.read_doc_starts("train", np.arange(3)).astype(int).tolist() == [[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]]
    assert s.segment_ids("train", np.array([1, 0, 2])).tolist() == [[0, 1, 2, 2], [0, 0, 1, 1], [0, 0, 0, 0]]


def test_default_workers_by_input_size(tmp_path):
    from rskd_jax.config import DataConfig
    from rskd_jax.data import SMALL_INPUT_BYTES, default_workers, expand

    (tmp_path / "a.txt").write_text("small\n")
    assert default_workers(expand(DataConfig(inputs=(str(tmp_path),)))) == 0  # in process
    with open(tmp_path / "b.txt", "wb") as f:
        f.truncate(SMALL_INPUT_BYTES)  # sparse: no disk used
    assert default_workers(expand(DataConfig(inputs=(str(tmp_path),)))) == len(os.sched_getaffinity(0))
