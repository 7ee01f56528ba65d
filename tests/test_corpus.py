"""Corpus formats, bad records, worker counts, add_bos, document starts and mixtures.

Fixtures are built here from real text on the machine (standard-library sources) with
gzip / zstandard / pyarrow; nothing is downloaded or committed.
"""

from __future__ import annotations

import gzip
import json
import os
import sysconfig
import zlib

import numpy as np
import pytest

from rskd_jax.config import DataRun, load_config
from rskd_jax.data import DataError, run
from rskd_jax.store.tokens import doc_starts_of, open_token_store
from rskd_jax.tokenizer import load_tokenizer

L = 32
STDLIB = sysconfig.get_paths()["stdlib"]
FILES = [
    "bisect.py",
    "colorsys.py",
    "keyword.py",
    "json/__init__.py",
    "json/scanner.py",
    "json/tool.py",
    "email/mime/text.py",
    "email/mime/base.py",
    "email/mime/image.py",
    "email/mime/audio.py",
    "fnmatch.py",
    "shlex.py",
    "copy.py",
    "abc.py",
    "numbers.py",
]


def read_text(path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def stdlib_texts() -> list[str]:
    texts = [read_text(os.path.join(STDLIB, f)) for f in FILES]
    return texts + [f"short document {i}: {t[:200]}" for i, t in enumerate(texts[:9])]  # 24 docs


def arrays(url) -> dict[str, bytes]:
    """The bytes of every array file (tokens and doc_starts of every split), not the manifest."""
    out = {}
    for d, _, fs in os.walk(url):
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), url)
            if "/" in rel and not rel.startswith("_work"):
                with open(os.path.join(d, f), "rb") as fh:
                    out[rel] = fh.read()
    return out


def data_run(inputs, out, *extra, **kw):
    over = [
        f"data.inputs={json.dumps(inputs)}" if isinstance(inputs, list) else f"data.inputs={inputs}",
        f"data.output={out}",
        f"data.seq_len={L}",
        "data.val_fraction=0.3",
        "data.workers=0",
        *extra,
    ]
    return run(load_config(DataRun, None, over), progress=False, **kw)


def write_formats(root, texts) -> dict[str, str]:
    """The same documents as text files, .txt.gz files, JSONL.gz, JSONL.zst, Parquet (3 row
    groups), and a `datasets.save_to_disk`-style Arrow directory (2 stream shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    paths = {}
    for kind, suffix, opener in (("text", ".txt", open), ("txt_gz", ".txt.gz", gzip.open)):
        d = root / kind
        d.mkdir()
        for i, t in enumerate(texts):
            with opener(d / f"doc_{i:03d}{suffix}", "wb") as f:
                f.write(t.encode("utf-8"))
        paths[kind] = str(d)
    lines = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)).encode()
    with gzip.open(root / "docs.jsonl.gz", "wb") as f:
        f.write(lines)
    paths["jsonl_gz"] = str(root / "docs.jsonl.gz")
    (root / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    paths["jsonl_zst"] = str(root / "docs.jsonl.zst")
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, root / "docs.parquet", row_group_size=10)
    paths["parquet"] = str(root / "docs.parquet")
    ds = root / "arrow_ds"
    ds.mkdir()
    halves = [table.slice(0, 13), table.slice(13)]
    for k, part in enumerate(halves):
        with pa.ipc.new_stream(ds / f"data-{k:05d}-of-00002.arrow", part.schema) as w:
            for batch in part.to_batches(max_chunksize=5):
                w.write_batch(batch)
    (ds / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string", "_type": "Value"}}}))
    (ds / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": f"data-{k:05d}-of-00002.arrow"} for k in range(2)], "_split": None})
    )
    paths["arrow"] = str(ds)
    return paths


def test_every_format_gives_the_same_store(tmp_path):
    texts = stdlib_texts()
    paths = write_formats(tmp_path, texts)
    ref = data_run(paths["text"], tmp_path / "s_text")
    assert ref["documents"] == {"train": 14, "val": 10}, ref["documents"]  # by content hash
    want = arrays(tmp_path / "s_text")
    assert want and all(k.startswith(("train/", "val/")) for k in want)
    for kind in ("txt_gz", "jsonl_gz", "jsonl_zst", "parquet", "arrow"):
        got = data_run(paths[kind], tmp_path / f"s_{kind}", "data.shard_records=7")
        assert got["content_hash"] == ref["content_hash"] and got["documents"] == ref["documents"], kind
        assert arrays(tmp_path / f"s_{kind}") == want, kind
    m = open_token_store(str(tmp_path / "s_parquet")).manifest
    assert (
        m["input_files"]["count"] == 1
        and m["doc_starts_hash"] == open_token_store(str(tmp_path / "s_text")).manifest["doc_starts_hash"]
    )

    # The rows are the documents in order, each + EOS, and doc_starts marks each start.
    store = open_token_store(str(tmp_path / "s_arrow"))
    tok = load_tokenizer()
    train = [t for t in texts if store.manifest and __import__("rskd_jax.data").data.split_of(t, 0.3) == "train"]
    stream = np.concatenate([np.asarray(tok.encode(t) + [tok.eos_id], np.int32) for t in train])
    n = store.num_rows("train")
    rows = store.read("train", np.arange(n))
    assert np.array_equal(rows.reshape(-1), stream[: n * L])
    starts = store.read_doc_starts("train", np.arange(n))
    assert np.array_equal(starts, doc_starts_of(rows, tok.eos_id).astype(bool))
    assert starts.sum() == np.sum(np.cumsum([len(tok.encode(t)) + 1 for t in train])[:-1] < n * L) + 1
    seg = store.segment_ids("train", np.arange(n))
    assert seg[0, 0] == 0 and (np.diff(seg, axis=1) >= 0).all() and (seg == np.cumsum(starts, 1) - starts[:, :1]).all()


def test_bad_records_are_counted_not_fatal(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = stdlib_texts()[:3]
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b'{"text": 12}',
        b'{"body": "no text key"}',
        b"not json",
        b'["a list"]',
        json.dumps({"text": "caf\xe9"}).encode("utf-8").replace(b"\\u00e9", b"\xe9\xff"),
        b'{"text": "\\ud800 lone surrogate"}',
        b'{"text": "   "}',
        b'{"text": null}',
        b"",
        json.dumps({"text": good[1]}).encode(),
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(pa.table({"text": [good[2], None, "", 7 and "x" * 0]}), tmp_path / "in" / "b.parquet")
    pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "in" / "c.parquet")
    body = "".join(json.dumps({"text": line}) + "\n" for line in stdlib_texts()[5].splitlines() if line.strip())
    cut = gzip.compress(body.encode())[:-300]
    (tmp_path / "in" / "d.jsonl.gz").write_bytes(cut)
    (tmp_path / "in" / "e1.txt.gz").write_bytes(gzip.compress(good[0].encode())[:-30])  # corrupt, alone
    (tmp_path / "in" / "e2.txt.gz").write_bytes(gzip.compress(good[1].encode()))  # same shard, still read
    readable = zlib.decompressobj(31).decompress(cut).count(b"\n")  # whole lines before the damage
    s = data_run(str(tmp_path / "in"), tmp_path / "out", "data.shard_records=4")
    assert readable > 20 and sum(s["documents"].values()) == 3 + readable + 1  # a truncated gzip: its first lines
    skipped = {k: v for k, v in s["skipped"].items() if k != "examples"}
    assert skipped == {
        "not_string": 1,
        "missing_key": 1 + 1 + 1 + 1,
        "bad_json": 2,
        "non_utf8": 2,
        "empty": 2 + 2,
        "unreadable": 1 + 1,
    }, skipped
    assert s["skipped"]["examples"] == [
        "a.jsonl:line 2 (not_string)",
        "a.jsonl:line 3 (missing_key)",
        "a.jsonl:line 4 (bad_json)",
        "a.jsonl:line 5 (bad_json)",
        "a.jsonl:line 6 (non_utf8)",
    ]
    assert open_token_store(str(tmp_path / "out")).manifest["skipped"] == s["skipped"]
    # an input that is read to its end and gives no document is an error naming it
    with pytest.raises(DataError, match=r"data.inputs '.*c.parquet' \(1 files\) gave no document.*missing_key"):
        data_run([str(tmp_path / "in" / "a.jsonl"), str(tmp_path / "in" / "c.parquet")], tmp_path / "out2")


@pytest.mark.slow  # spawns a pool of 2 tokenizer processes
def test_worker_counts_give_identical_bytes(tmp_path):
    texts = stdlib_texts()
    paths = write_formats(tmp_path, texts)
    inputs = [paths["jsonl_zst"], paths["text"]]
    runs = {w: data_run(inputs, tmp_path / f"w{w}", "data.shard_records=3", f"data.workers={w}") for w in (0, 2)}
    assert runs[2]["shards_tokenized"] == 8 + 8  # 24 JSONL lines and 24 text files, 3 per shard
    assert len({r["content_hash"] for r in runs.values()}) == 1
    assert arrays(tmp_path / "w0") == arrays(tmp_path / "w2")
    assert read_text(tmp_path / "w0" / "manifest.json") == read_text(tmp_path / "w2" / "manifest.json")
    again = data_run(inputs, tmp_path / "w2", "data.shard_records=3", "data.workers=2")
    assert again["unchanged"] is True and again["shards_tokenized"] == 0


def test_add_bos(tmp_path):
    from tokenizers.processors import TemplateProcessing

    texts = stdlib_texts()[:4]
    paths = write_formats(tmp_path, texts)
    tok = load_tokenizer()
    plain = data_run(paths["parquet"], tmp_path / "auto")  # SmolLM2 adds no BOS: auto = false
    forced = data_run(paths["parquet"], tmp_path / "bos", "data.add_bos=true")
    assert open_token_store(str(tmp_path / "auto")).manifest["add_bos"] is False
    assert forced["tokens"] == plain["tokens"] + 4
    s = open_token_store(str(tmp_path / "bos"))
    rows = s.read("train", np.arange(s.num_rows("train")))
    starts = s.read_doc_starts("train", np.arange(s.num_rows("train")))
    assert (rows[starts] == tok.bos_id).all() and starts.sum() == (rows == tok.bos_id).sum() > 1
    # a tokenizer whose own post-processor prepends BOS (as Llama-3's does): auto = true
    bos = tok.backend.id_to_token(tok.bos_id)
    tok.backend.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_id)])
    (tmp_path / "tj").mkdir()
    tok.backend.save(str(tmp_path / "tj" / "tokenizer.json"))
    (tmp_path / "tj" / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": "<|im_end|>"}))
    auto = data_run(paths["parquet"], tmp_path / "tj_auto", f"data.tokenizer={tmp_path / 'tj'}")
    assert open_token_store(str(tmp_path / "tj_auto")).manifest["add_bos"] is True
    assert auto["tokens"] == forced["tokens"]


def test_mixture_of_sources(tmp_path):
    texts = stdlib_texts()
    paths = write_formats(tmp_path, texts)
    sources = [
        {"name": "code", "inputs": [paths["text"]], "weight": 3},
        {"name": "json", "inputs": [paths["jsonl_gz"]], "max_tokens": 6000},
    ]
    over = [
        f"data.sources={json.dumps(sources)}",
        f"data.output={tmp_path / 'mix'}",
        f"data.seq_len={L}",
        "data.val_fraction=0.3",
        "data.workers=0",
        "data.shard_records=5",
    ]
    s = run(load_config(DataRun, None, over), progress=False)
    store = open_token_store(str(tmp_path / "mix"))
    assert set(store.splits) == {"train", "val", "val_code", "val_json"}
    st = s["source_stats"]
    assert st["json"]["tokens"] == 6000 and st["code"]["tokens"] > 6000, st
    assert store.num_rows("val") == (store.manifest["splits"]["val"]["num_tokens"]) // L
    # val_<name> holds exactly that source's val documents; val pools both in interleave order
    n_code, n_json = store.num_rows("val_code"), store.num_rows("val_json")
    assert n_code > 0 and n_json > 0 and store.num_rows("val") >= n_code + n_json - 1
    # deterministic, and the interleave is at document level: early train rows hold both sources
    again = run(load_config(DataRun, None, [o.replace("/mix", "/mix2") for o in over]), progress=False)
    assert again["content_hash"] == s["content_hash"]
    assert arrays(tmp_path / "mix") == arrays(tmp_path / "mix2")
    from rskd_jax.data import split_of

    tok = load_tokenizer()
    first_json = tok.encode(next(t for t in texts if split_of(t, 0.3) == "train"))[:8]
    first_rows = store.read("train", np.arange(min(60, store.num_rows("train")))).reshape(-1)
    hits = [i for i in range(first_rows.size - 8) if first_rows[i : i + 8].tolist() == first_json]
    assert len(hits) == 2  # the same first document, once from each source, both early


# ----------------------------------------------------------------------------- kill / resume, 2 processes


def big_jsonl(path, n_files=300) -> int:
    """Standard-library sources as one JSONL.zst (one document per file); returns documents."""
    import zstandard

    from rskd_jax.corpus import expand_inputs

    files, _ = expand_inputs(["@stdlib"])
    lines = [json.dumps({"text": read_text(f.path)}) for f in files[:n_files]]
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return len(lines)


def data_cmd(*args):
    import sys

    return [sys.executable, "-m", "rskd_jax.data", *args]


def subprocess_env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]))
    return env


@pytest.mark.slow
def test_sigkill_then_resume_redoes_only_unfinished_shards(tmp_path):
    import signal
    import subprocess
    import time

    big_jsonl(tmp_path / "c.jsonl.zst", 200)
    common = [
        f"data.inputs={tmp_path / 'c.jsonl.zst'}",
        "data.seq_len=128",
        "data.shard_records=5",
        "data.checkpoint_seconds=0.2",
    ]
    ref = run(
        load_config(DataRun, None, common + [f"data.output={tmp_path / 'ref'}", "data.workers=0"]), progress=False
    )
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        data_cmd(*common, f"data.output={out}", "data.workers=2"),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # kill once a checkpoint exists
            if (out / "_work" / "state.json").exists() and len(os.listdir(out / "_work" / "shards")) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(Exception, match="incomplete"):
        open_token_store(str(out))
    resumed = run(load_config(DataRun, None, common + [f"data.output={out}", "data.workers=0"]), progress=False)
    assert resumed["resumed"] is True and resumed["content_hash"] == ref["content_hash"]
    assert 0 < resumed["shards_tokenized"] < ref["shards_tokenized"] == resumed["shards"] == 40
    assert arrays(out) == arrays(tmp_path / "ref") and not (out / "_work").exists()
    assert read_text(out / "manifest.json") == read_text(tmp_path / "ref" / "manifest.json")


@pytest.mark.slow
def test_two_processes_write_the_same_store(tmp_path):
    import socket
    import subprocess

    big_jsonl(tmp_path / "c.jsonl.zst", 60)
    common = [f"data.inputs={tmp_path / 'c.jsonl.zst'}", "data.seq_len=64", "data.shard_records=4"]
    ref = run(
        load_config(DataRun, None, common + [f"data.output={tmp_path / 'ref'}", "data.workers=0"]), progress=False
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen(
            data_cmd(
                *common,
                f"data.output={tmp_path / 'two'}",
                "data.workers=1",
                "distributed.enabled=true",
                f"distributed.coordinator_address=127.0.0.1:{port}",
                "distributed.num_processes=2",
                f"distributed.process_id={i}",
            ),
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err.decode()[-3000:]
    summaries = [json.loads(o.decode().strip().splitlines()[-1]) for o, _ in results]
    assert [s["shards_tokenized"] for s in summaries] == [8, 7]  # 15 shards, split by index mod 2
    assert all(s["content_hash"] == ref["content_hash"] for s in summaries)
    assert arrays(tmp_path / "two") == arrays(tmp_path / "ref")
    assert read_text(tmp_path / "two" / "manifest.json") == read_text(tmp_path / "ref" / "manifest.json")


# ----------------------------------------------------------------------------- the mixer, directly


def synthetic_shards(seed, n_shards, docs_per_shard, source_tag):
    """ShardDocs whose tokens name their source and document (tag * 10**6 + doc number)."""
    from rskd_jax.packing import ShardDocs

    rng = np.random.default_rng(seed)
    out, d = [], 0
    for _ in range(n_shards):
        lengths = rng.integers(1, 60, docs_per_shard)
        tokens = np.concatenate([np.full(n, source_tag * 10**6 + d + k, np.int32) for k, n in enumerate(lengths)])
        d += docs_per_shard
        out.append(
            ShardDocs(
                tokens,
                lengths.astype(np.int64),
                rng.random(docs_per_shard) < 0.2,
                {"skipped": {}, "examples": [], "input": source_tag},
            )
        )
    return out


def mix(shards_by_source, weights, budgets, *, stop_after=None, resume_from=None):
    """Runs a Mixer over in-memory shards; returns (written rows per split, mixer, packer)."""
    from rskd_jax.packing import Mixer, Packer, Source

    written = {}
    splits = ("train", "val", "val_a", "val_b")

    def write(split, row, tokens, starts):
        written[(split, row)] = tokens.copy()

    sources, first = [], 0
    for name, sh, w, b in zip("ab", shards_by_source, weights, budgets):
        sources.append(Source(name, first, len(sh), w, b))
        first += len(sh)
    flat = [s for sh in shards_by_source for s in sh]
    packer = Packer(write, splits, 8, 4)
    mixer = Mixer(sources, packer, max_tokens=None)
    if resume_from is not None:
        mixer.restore(json.loads(json.dumps(resume_from[0])))
        packer.restore(resume_from[1], resume_from[2])
    steps, ratios = 0, []
    while (i := mixer.next_source()) is not None:
        mixer.take(i, flat[mixer.needed(i)])
        ratios.append([mixer.taken[k] / sources[k].weight for k in range(2)])
        steps += 1
        if stop_after is not None and steps == stop_after:
            pstate, arrays = packer.state()
            return written, (mixer.state(), pstate, arrays)
    packer.finish()
    return written, (mixer, ratios)


def test_mixer_interleaves_by_weight_within_one_document_and_resumes_exactly():
    a, b = synthetic_shards(0, 6, 25, 1), synthetic_shards(1, 5, 40, 2)
    written, (mixer, ratios) = mix([a, b], [3.0, 1.0], [None, 1500])
    assert mixer.taken[1] == 1500 and mixer.taken[0] == sum(int(s.lengths.sum()) for s in a)
    # while both are active, the per-weight token counts never differ by more than one document
    both = [r for r in ratios if r[1] < 1500]
    assert max(abs(x - y) for x, y in both) <= 59 and len(both) > 50
    train = np.concatenate([written[("train", r)] for r in sorted(r for s, r in written if s == "train")]).ravel()
    first_b = np.nonzero(train // 10**6 == 2)[0]
    assert first_b[0] < 200  # source b's documents start early, not after all of a
    # a run stopped part-way (mid-shard), checkpointed through JSON and resumed writes the same rows
    part, state = mix([a, b], [3.0, 1.0], [None, 1500], stop_after=37)
    rest, _ = mix([a, b], [3.0, 1.0], [None, 1500], resume_from=state)
    assert {**part, **rest}.keys() == written.keys()
    assert all(np.array_equal({**part, **rest}[k], written[k]) for k in written)
    assert state[0]["doc"] != [0, 0]  # it really stopped inside a shard
