"""The teacher cache program end to end: exact stores across batch sizes, meshes, processes and
crashes; every method against direct sampling; every refusal; --dry-run; inspect --verify.

A real token store of a few stdlib files (seq_len 64) and the tiny random teacher of
configs/tiny/cache.yaml (V = 49,152, the tokenizer's), saved once as an HF directory so that
subprocesses load it without compiling a random init. Most runs cache the first ROWS rows of
each split (a partial last block in each). Subprocess runs see one CPU device each; all runs
share a persistent compilation cache (a tmp dir), so a program compiles once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rskd_jax import cache, cache_step, sampling
from rskd_jax.cache import CacheError
from rskd_jax.config import CacheRun, ConfigError, DataRun, load_config
from rskd_jax.sharding import ShardingError
from rskd_jax.store.common import StoreError, read_json, write_json
from rskd_jax.store.teacher import open_teacher_store, token_hash
from rskd_jax.store.tokens import open_token_store, write_token_store

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs/tiny/cache.yaml")
L = 64
ROWS = 13  # rows cached per split: blocks of 8 + 5
INPUTS = "[@stdlib/bisect.py,@stdlib/colorsys.py,@stdlib/keyword.py,@stdlib/fnmatch.py,@stdlib/stat.py,@stdlib/this.py]"
STORES = ("rskd_n50", "top_k_12")  # the outputs of configs/tiny/cache.yaml
SUBPROCESS_TIMEOUT = 240


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(work):
    """A persistent compilation cache for this module (tmp dir): runs whose step compiles to the
    same program (another output dir, a refusal, a second --verify) load it instead of
    recompiling. Restored afterwards, so other test modules are unaffected."""
    from jax.experimental.compilation_cache import compilation_cache

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (str(work / "jax_cache"), 0, 0)):
        jax.config.update(n, v)
    compilation_cache.reset_cache()
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def tokens(work):
    """~92 train / 24 val rows of 64 tokens, made by the data program."""
    from rskd_jax import data

    out = str(work / "tokens")
    cfg = load_config(
        DataRun, None, [f"data.inputs={INPUTS}", f"data.seq_len={L}", f"data.output={out}", "data.val_fraction=0.2"]
    )
    rows = data.run(cfg, progress=False)["rows"]
    assert rows["train"] >= 64 and rows["val"] >= ROWS, rows
    return out


@pytest.fixture(scope="module")
def teacher(work, tokens):
    """configs/tiny/cache.yaml's random teacher, as an HF directory."""
    from rskd_jax.model_spec import build_model
    from rskd_jax.models import save_pretrained

    spec = load_config(CacheRun, CONFIG).teacher
    out = work / "teacher"
    save_pretrained(build_model(spec, int(open_token_store(tokens).manifest["tokenizer"]["vocab_size"])), out)
    return str(out)


def overrides(tokens: str, output: str, *extra: str, teacher: str | None = None) -> list[str]:
    """Every run here computes on micro-batches of 2 rows per device (cache.device_batch=2)."""
    return [
        f"cache.tokens={tokens}",
        f"cache.output={output}",
        f"cache.max_rows={ROWS}",
        "cache.device_batch=2",
        *([f"teacher.source={teacher}"] if teacher else []),
        *extra,
    ]


def cfg_for(tokens: str, output, *extra: str, teacher: str | None = None) -> CacheRun:
    return load_config(CacheRun, CONFIG, overrides(tokens, str(output), *extra, teacher=teacher))


def one_device() -> list:
    return jax.devices()[:1]


def store_files(root) -> dict[str, bytes]:
    """Every file under a cache output (all stores), but the saved config."""
    root = str(root)
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            if rel != "config.yaml":
                with open(os.path.join(d, n), "rb") as fh:
                    out[rel] = fh.read()
    return out


def assert_same_files(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:10]
    differ = sorted(k for k in a if a[k] != b[k])
    assert not differ, f"{len(differ)} files differ, e.g. {differ[:6]}"


def subprocess_env(work) -> dict[str, str]:
    """One CPU device per process (no fake-device flag), a shared persistent compile cache."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(work / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def cache_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rskd_jax.cache", "--config", CONFIG, *args]


def kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ref(work, tokens, teacher):
    """The reference store: one device, batch 8, both splits."""
    out = work / "ref"
    summary = cache.run(
        cfg_for(tokens, out, "cache.batch_size=8", "mesh.data=1", teacher=teacher), progress=False, devices=one_device()
    )
    assert summary["rows_written"] == {"train": ROWS, "val": ROWS}
    return out


# ----------------------------------------------------------------------------- token hash


def test_token_hash_sees_every_token_and_its_place():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 49152, (6, 512)).astype(np.int32)
    h = token_hash(t)
    assert h.dtype == np.uint64 and h.shape == (6,) and len(set(h.tolist())) == 6
    np.testing.assert_array_equal(token_hash(t.astype(np.int64)), h)  # the values count, not the dtype
    np.testing.assert_array_equal(token_hash(t[::-1])[::-1], h)  # per row, independent of the batch
    variants = [t[0].copy() for _ in range(5)]
    variants[0][100] += 1  # one token changed
    variants[1][[3, 4]] = variants[1][[4, 3]]  # two neighbours swapped
    variants[2] = np.roll(variants[2], 1)  # shifted by one
    variants[3][-1] = -1  # padding-like value
    assert len({token_hash(v[None])[0] for v in variants[:4]} | {h[0]}) == 5
    assert token_hash(t[:1, :-1])[0] != h[0]  # length matters
    with pytest.raises(ValueError, match=r"integer tokens \[B, L\]"):
        token_hash(t[0])


def test_store_keeps_token_hash_per_row(tmp_path):
    from rskd_jax.store.teacher import create_teacher_store

    rng = np.random.default_rng(1)
    b, k, vocab = 4, 3, 50
    tokens_BxL = rng.integers(0, vocab, (b, 8))
    ids = np.stack([rng.permutation(vocab)[:k] for _ in range(b * 8)]).reshape(b, 8, k)
    rows = {"ids": ids, "counts": np.full((b, 8, k), 1), "tokens": tokens_BxL}
    kw = dict(
        manifest={"m": 1},
        num_rows={"train": b},
        seq_len=8,
        method="sample",
        k=k,
        vocab_size=vocab,
        chunk_rows=2,
        diagnostics=False,
    )
    st = create_teacher_store(str(tmp_path / "h"), token_hash=True, **kw)
    for start in (0, 2):
        st.write_rows("train", start, {n: x[start : start + 2] for n, x in rows.items()}).result()
    got = open_teacher_store(str(tmp_path / "h")).read_rows("train", np.array([3, 0]))
    np.testing.assert_array_equal(got["token_hash"], token_hash(tokens_BxL[[3, 0]]))
    with pytest.raises(StoreError, match=r"takes keys \['counts', 'ids', 'tokens'\]"):
        st.write_rows("train", 0, {"ids": ids[:2], "counts": rows["counts"][:2]})
    with pytest.raises(StoreError, match=r"tokens must be integer \[2, 8\]"):
        st.write_rows("train", 0, {**{n: x[:2] for n, x in rows.items()}, "tokens": tokens_BxL[:2, :4]})
    plain = create_teacher_store(str(tmp_path / "plain"), **kw)  # without: no such array or key
    assert "token_hash" not in plain.layout
    plain.write_rows("train", 0, {"ids": ids[:2], "counts": rows["counts"][:2]}).result()
    assert "token_hash" not in plain.read_rows("train", np.array([0]))


# ----------------------------------------------------------------------------- exactness


def test_reference_store_is_complete_and_hashes_its_tokens(ref, tokens):
    tok = open_token_store(tokens)
    for name in STORES:
        st = open_teacher_store(str(ref / name))
        assert st.manifest["seed"] == 0 and st.manifest["tokens"]["fingerprint"] == tok.fingerprint
        for split in ("train", "val"):
            assert st.done_mask(split).all() and st.num_rows(split) == ROWS
            rows = np.arange(ROWS)
            got = st.read_rows(split, rows)
            np.testing.assert_array_equal(got["token_hash"], token_hash(tok.read(split, rows)))
    assert (ref / "config.yaml").exists()


def test_store_identical_for_8_devices_and_batch_16(ref, work, tokens, teacher):
    out = work / "d8_b16"
    cache.run(cfg_for(tokens, out, "cache.batch_size=16", "mesh.data=8", teacher=teacher), progress=False)
    assert_same_files(store_files(ref), store_files(out))
    assert read_json(str(out / "rskd_n50"))["device_batch"] == 2


# the tiny config's two stores and the variance-reduced methods
INVARIANCE_OUTPUTS = (
    "cache.outputs=[{name: rskd_n50, method: sample, num_draws: 50}, {name: top_k_12, method: top_k, num_draws: 12},"
    " {name: sys16, method: systematic, num_draws: 16}, {name: ht4_n12, method: head_tail, head: 4, num_draws: 12}]"
)


@pytest.mark.slow  # a data run and 5 cache runs; test-fast keeps batch 16 on 8 devices == the reference
def test_store_identical_for_batch_2_8_16_and_1_or_8_devices(work, teacher):
    """At one device_batch (2), batch 2, 8 and 16 on one device and batch 16 over 8 devices
    (2 rows each) write the same bytes. The settings can break it: at L = 128 the teacher's
    rounding depends on the micro-batch shape (device_batch 8 moves most top-K weights in the
    last bits; before the fixed micro-batch, batch 2 vs 8 did the same)."""
    from rskd_jax import data

    toks = str(work / "tokens128")
    data.run(
        load_config(
            DataRun, None, [f"data.inputs={INPUTS}", "data.seq_len=128", f"data.output={toks}", "data.val_fraction=0.2"]
        ),
        progress=False,
    )
    runs = {}
    for batch, dev, db in ((2, 1, 2), (8, 1, 2), (16, 1, 2), (16, 8, 2), (8, 1, 8)):
        out = work / f"inv_b{batch}_d{dev}_db{db}"
        cache.run(
            cfg_for(
                toks,
                out,
                f"cache.batch_size={batch}",
                "cache.chunk_rows=2",
                "cache.max_rows=16",
                "cache.splits=[train]",
                f"mesh.data={dev}",
                f"cache.device_batch={db}",
                INVARIANCE_OUTPUTS,
                teacher=teacher,
            ),
            progress=False,
            devices=None if dev > 1 else one_device(),
        )
        runs[(batch, dev, db)] = out
    first = store_files(runs[(2, 1, 2)])
    for key in ((8, 1, 2), (16, 1, 2), (16, 8, 2)):
        assert_same_files(first, store_files(runs[key]))
    a = open_teacher_store(str(runs[(8, 1, 2)] / "top_k_12")).read_rows("train", np.arange(16))
    b = open_teacher_store(str(runs[(8, 1, 8)] / "top_k_12")).read_rows("train", np.arange(16))
    assert (a["weights"] != b["weights"]).any(), "device_batch 2 vs 8 round alike: the test cannot fail"


@pytest.mark.slow  # 3 cache runs; test-fast keeps tests/test_documents.py's model-level masking
def test_document_masking_store_is_batch_invariant_and_masks_the_teacher(ref, work, tokens, teacher):
    """context.document_masking=true: batch 2 on one device and batch 16 over 8 devices write
    the same bytes; the manifest records the setting (the unmasked store has no key); the
    stored gold log-probs are the teacher's with segment ids and restarted positions, not the
    unmasked teacher's (rows where a document starts inside the row)."""
    from rskd_jax.documents import segments_and_positions
    from rskd_jax.model_spec import build_model

    runs = {}
    for batch, dev in ((2, 1), (16, 8)):
        out = runs[batch] = work / f"docs_b{batch}_d{dev}"
        cfg = cfg_for(
            tokens,
            out,
            f"cache.batch_size={batch}",
            "cache.chunk_rows=2",
            "cache.splits=[train]",
            "cache.max_rows=16",  # row 14 holds a document start
            f"mesh.data={dev}",
            "context.document_masking=true",
            teacher=teacher,
        )
        cache.run(cfg, progress=False, devices=None if dev > 1 else one_device())
    assert_same_files(store_files(runs[2]), store_files(runs[16]))
    assert read_json(str(runs[2] / "rskd_n50"))["document_masking"] is True
    assert "document_masking" not in read_json(str(ref / "rskd_n50"))

    tok = open_token_store(tokens)
    starts = tok.read_doc_starts("train", np.arange(16))
    rows = np.nonzero(starts[:, 1:].any(axis=1))[0]
    assert rows.size, "no document starts inside the cached rows: the test cannot fail"
    tokens_BxL = tok.read("train", rows)
    seg, pos = segments_and_positions(starts[rows])
    model = build_model(cfg.teacher, int(tok.manifest["tokenizer"]["vocab_size"]))

    def gold(*docs):
        x = np.asarray(jax.jit(model.__call__)(jnp.asarray(tokens_BxL), *docs), np.float64)
        logp = x - x.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        return np.take_along_axis(logp[:, :-1], tokens_BxL[:, 1:, None], -1)[..., 0]

    got = open_teacher_store(str(runs[2] / "rskd_n50")).read_rows("train", rows)["gold_logprob"][:, :-1]
    np.testing.assert_allclose(got, gold(jnp.asarray(seg), jnp.asarray(pos)), rtol=1e-3, atol=1e-3)
    assert np.abs(got - gold()).max() > 1e-2  # the unmasked teacher differs there
    code, info = run_inspect(str(runs[2] / "rskd_n50"), "--verify", "16", "--json")  # recomputed masked
    assert code == 0 and info["verify"]["rows_checked"] == 16 and info["verify"]["rows_mismatched"] == 0


def test_resume_refuses_another_device_batch_and_takes_the_stores_by_default(ref, tokens, teacher):
    before = store_files(ref)
    with pytest.raises(CacheError, match=r"written with cache.device_batch=2, this run has 4.*cache.device_batch=2"):
        cache.run(
            cfg_for(tokens, ref, "cache.device_batch=4", "mesh.data=1", teacher=teacher),
            progress=False,
            devices=one_device(),
        )
    summary = cache.run(
        cfg_for(tokens, ref, "cache.device_batch=0", "mesh.data=1", teacher=teacher),
        progress=False,
        devices=one_device(),
    )
    assert summary["rows_written"] == {"train": 0, "val": 0}
    assert store_files(ref) == before


def test_logits_budget_from_device_memory_or_override():
    assert cache_step.logits_budget(None) == cache_step.CHUNK_BYTES  # CPU: no memory figure
    assert cache_step.logits_budget(16 << 30) == (16 << 30) // cache_step.MEMORY_FRACTION
    assert cache_step.logits_budget(141 << 30) == cache_step.MAX_CHUNK_BYTES
    assert cache_step.logits_budget(256 << 20) == cache_step.CHUNK_BYTES
    assert cache_step.logits_budget(141 << 30, override_mb=2.0) == 2 << 20
    assert cache_step.device_bytes_limit(jax.devices()[0]) is None
    with pytest.raises(ValueError, match="logits_chunk_mb"):
        cache_step.logits_budget(None, -1.0)
    # V = 152k, 8 rows, L = 2048: 16 MB is 1,024 LM-head iterations, a 16 GB chip's budget 64
    assert 2048 // cache_step.position_chunk(2048, 8, 151_936) == 1024
    assert 2048 // cache_step.position_chunk(2048, 8, 151_936, cache_step.logits_budget(16 << 30)) == 64


@pytest.mark.slow  # 2 cache runs; test-fast keeps position_chunk's sizing tests
def test_position_chunk_is_recorded_and_does_not_change_the_rows(ref, work, tokens, teacher):
    """The chunk comes from the budget (16 MB on CPU: 32 of 64 positions at V = 49,152 and
    device_batch 2); the manifest records any other chunk (the 16 MB default's is left out, as
    in stores made before the chunk was recorded), and a resume with another is refused: another chunk
    (4 positions) rounds the LM head differently in the last bits (so the store records it),
    floats agree to rounding and a near-tie draw may move."""
    assert "position_chunk" not in read_json(str(ref / "rskd_n50"))  # 32: the 16 MB default's
    assert cache_step.position_chunk(64, 2, 49_152) == 32
    before = store_files(ref)
    with pytest.raises(StoreError, match="differs in: position_chunk"):
        cache.run(
            cfg_for(tokens, ref, "cache.logits_chunk_mb=1.5", "mesh.data=1", teacher=teacher),
            progress=False,
            devices=one_device(),
        )
    assert store_files(ref) == before
    out = work / "chunk4"
    cache.run(
        cfg_for(tokens, out, "cache.batch_size=8", "cache.logits_chunk_mb=1.5", "mesh.data=1", teacher=teacher),
        progress=False,
        devices=one_device(),
    )
    rows, exact = np.arange(ROWS), True
    for name in STORES:
        assert read_json(str(out / name))["position_chunk"] == 4
        a = open_teacher_store(str(ref / name)).read_rows("train", rows)
        b = open_teacher_store(str(out / name)).read_rows("train", rows)
        same_BxL = (a["ids"] == b["ids"]).all(-1)
        assert same_BxL.mean() >= 0.995, f"{name}: {(~same_BxL).sum()} positions differ"
        np.testing.assert_allclose(a["weights"][same_BxL], b["weights"][same_BxL], rtol=1e-5, atol=1e-7)
        exact &= bool((a["weights"] == b["weights"]).all())
    assert not exact, "chunks 32 and 4 round alike: recording the chunk would be unneeded"


def test_split_codes_differ_for_the_comparisons_names_and_collisions_are_refused():
    names = ["train", "val", "val_stdlib", "val_docs", "val_std", "val_doc"]
    codes = cache_step.check_split_codes(names)
    assert len(set(codes.values())) == len(names) and codes["train"] == 0 and codes["val"] == 1
    assert all(0 <= c < 2**32 for c in codes.values())
    seen: dict[int, str] = {}  # a birthday search finds two names with one 32-bit code
    for i in range(1 << 20):
        name = f"s{i}"
        code = cache_step.split_code(name)
        if code in seen:
            break
        seen[code] = name
    else:
        pytest.fail("no 32-bit collision in 2^20 names")
    with pytest.raises(ValueError, match="same key code"):
        cache_step.check_split_codes(["train", seen[code], name])


@pytest.mark.slow  # test-fast keeps batch 16 on 8 devices == the reference
def test_fsdp_tensor_mesh_same_up_to_float_rounding(ref, work, tokens, teacher):
    """data=2, fsdp=2, tensor=2 reduces in another order: floats agree to rounding, and the
    draws of a few near-tie positions may move to the neighbouring id (see cache's doc)."""
    out = work / "mesh222"
    cache.run(
        cfg_for(
            tokens,
            out,
            "cache.batch_size=8",
            "cache.max_rows=8",
            "cache.splits=[train]",
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            teacher=teacher,
        ),
        progress=False,
    )
    rows = np.arange(8)
    for name in STORES:
        a = open_teacher_store(str(ref / name)).read_rows("train", rows)
        b = open_teacher_store(str(out / name)).read_rows("train", rows)
        np.testing.assert_array_equal(a["token_hash"], b["token_hash"])
        same_BxL = (a["ids"] == b["ids"]).all(-1)
        np.testing.assert_array_equal(a["num_ids"][same_BxL], b["num_ids"][same_BxL])
        assert same_BxL.mean() >= 0.995, f"{name}: {(~same_BxL).sum()} positions differ"
        if "counts" in a:
            np.testing.assert_array_equal(a["counts"][same_BxL], b["counts"][same_BxL])
        np.testing.assert_allclose(a["weights"][same_BxL], b["weights"][same_BxL], rtol=1e-5, atol=1e-7)
        for k in ("gold_logprob", "entropy"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(ref, work, tokens, teacher):
    """SIGKILL at two points (while the stores are being created, then mid-run after the first
    block), a re-run after each: the finished store is byte-identical to the reference."""
    out = work / "killed"
    env = subprocess_env(work)
    cmd = cache_cmd(*overrides(tokens, str(out), "cache.batch_size=8", teacher=teacher))
    done_files = [
        out / name / split / "done" / "c" / str(b) for name in STORES for split in ("train", "val") for b in (0, 1)
    ]
    first_block = [out / name / "train" / "done" / "c" / "0" for name in STORES]
    kill_points = {
        "creating the stores": lambda: (out / STORES[0] / "manifest.json").exists(),
        "after the first block": lambda: all(f.exists() for f in first_block),
    }
    for point, reached in kill_points.items():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT
            while not reached():  # then kill at once
                assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
                assert time.monotonic() < deadline, f"never reached {point}"
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            kill([proc])
    done = sum(f.exists() for f in done_files)
    assert 0 < done < len(done_files), f"killed too late to test a resume ({done} done flags)"
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=SUBPROCESS_TIMEOUT)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    summary = json.loads(res.stdout.decode().strip().splitlines()[-1])
    assert sum(summary["rows_written"].values()) <= 2 * ROWS - 8  # finished blocks were skipped
    assert_same_files(store_files(ref), store_files(out))


def test_an_interrupted_create_is_made_again(tmp_path):
    """A create killed before its arrays exist leaves a manifest marked `creating`: readers
    refuse it with a clear message, and the same create re-makes it."""
    from rskd_jax.store import teacher as teacher_store

    args = dict(
        manifest={"seed": 0}, num_rows={"train": 8}, seq_len=4, method="top_k", k=2, vocab_size=10, chunk_rows=8
    )
    url = str(tmp_path / "s")
    teacher_store.create_teacher_store(url, **args).close()
    manifest = read_json(url)
    shutil.rmtree(tmp_path / "s" / "train" / "ids")  # as if killed before this array was made
    write_json(url, dict(manifest, creating=True))
    with pytest.raises(StoreError, match="creation was interrupted"):
        open_teacher_store(url)
    store = teacher_store.create_teacher_store(url, **args)
    store.write_rows(
        "train",
        0,
        {
            "ids": np.ones((8, 4, 2), np.int32) * [1, 2],
            "weights": np.full((8, 4, 2), 0.5, np.float32),
            "gold_logprob": np.zeros((8, 4)),
            "entropy": np.zeros((8, 4)),
        },
    ).result()
    assert read_json(url) == manifest and open_teacher_store(url).done_mask("train").all()


@pytest.mark.slow
def test_two_processes_write_the_same_store(ref, work, tokens, teacher):
    out = work / "two_procs"
    env = subprocess_env(work)
    port = free_port()
    procs = []
    try:
        for i in range(2):
            procs.append(
                subprocess.Popen(
                    cache_cmd(
                        *overrides(
                            tokens,
                            str(out),
                            "cache.batch_size=16",
                            "distributed.enabled=true",
                            f"distributed.coordinator_address=127.0.0.1:{port}",
                            "distributed.num_processes=2",
                            f"distributed.process_id={i}",
                            teacher=teacher,
                        )
                    ),
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        results = [p.communicate(timeout=SUBPROCESS_TIMEOUT) for p in procs]
    finally:
        kill(procs)
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err.decode()[-3000:]
    summary = json.loads(results[0][0].decode().strip().splitlines()[-1])
    assert summary["rows_written"] == {"train": ROWS, "val": ROWS}
    assert_same_files(store_files(ref), store_files(out))


# ----------------------------------------------------------------------------- methods


METHODS_YAML = """
cache:
  splits: [train]
  batch_size: 8
  chunk_rows: 8
  outputs:
    - {name: s50, method: sample, num_draws: 50}
    - {name: s50_t08, method: sample, num_draws: 50, temperature: 0.8}
    - {name: sys16, method: systematic, num_draws: 16}
    - {name: sys16_t08, method: systematic, num_draws: 16, temperature: 0.8}
    - {name: ht4_n12, method: head_tail, head: 4, num_draws: 12}
    - {name: ht4_n12_t12, method: head_tail, head: 4, num_draws: 12, temperature: 1.2}
    - {name: wor16, method: sample_wor, num_draws: 16}
    - {name: wor16_norm, method: sample_wor, num_draws: 16, normalize: true, temperature: 1.25}
    - {name: top12, method: top_k, num_draws: 12}
    - {name: ghost12, method: ghost, num_draws: 12}
    - {name: full, method: full}
mesh: {data: 1}
"""


def canon(ids, w):
    """Entries of each position sorted by id, empty slots (w == 0) last with id 0 and w 0."""
    present = w > 0
    order = np.argsort(np.where(present, ids.astype(np.int64), np.int64(1) << 40), axis=-1, kind="stable")
    take = lambda x: np.take_along_axis(np.asarray(x), order, -1)
    return np.where(take(present), take(ids), 0), np.where(take(present), take(w), 0)


@pytest.mark.slow  # 10 outputs, each compiled twice; test-fast keeps tests/test_cache_step.py
def test_every_method_in_one_pass_matches_direct_sampling(work, tokens, teacher):
    path = work / "methods.yaml"
    path.write_text(METHODS_YAML)
    out = work / "methods"
    cfg = load_config(
        CacheRun,
        str(path),
        [f"cache.tokens={tokens}", f"cache.output={out}", "cache.max_rows=8", f"teacher.source={teacher}"],
    )
    cache.run(cfg, progress=False, devices=one_device())

    tok = open_token_store(tokens)
    rows = np.array([0, 3, 7])
    tokens_BxL = tok.read("train", rows)
    from rskd_jax.model_spec import build_model

    vocab = int(tok.manifest["tokenizer"]["vocab_size"])
    model = build_model(cfg.teacher, vocab)
    logits_BxLxV = jax.jit(model.__call__)(jnp.asarray(tokens_BxL))
    keys_BxL = cache_step.position_keys(
        cache_step.row_keys(cfg.cache.seed, cache_step.split_code("train"), jnp.asarray(rows)), L
    )

    @jax.jit
    def direct(keys_BxL, logits_BxLxV):  # the samplers called on their own, one key per position
        per_pos = lambda fn: jax.vmap(jax.vmap(fn))(keys_BxL, logits_BxLxV)
        wor = lambda **kw: per_pos(lambda k, lg: sampling.sample_tokens(k, lg, 16, replace=False, **kw))
        return {
            "s50": per_pos(lambda k, lg: sampling.sample_counts(k, lg, 50)),
            "s50_t08": per_pos(lambda k, lg: sampling.sample_counts(k, lg, 50, temperature=0.8)),
            "sys16": per_pos(lambda k, lg: sampling.systematic_counts(k, lg, 16)),
            "sys16_t08": per_pos(lambda k, lg: sampling.systematic_counts(k, lg, 16, temperature=0.8)),
            "ht4_n12": per_pos(lambda k, lg: sampling.head_tail_targets(k, lg, 4, 12)),
            "ht4_n12_t12": per_pos(lambda k, lg: sampling.head_tail_targets(k, lg, 4, 12, temperature=1.2)),
            "wor16": wor(),
            "wor16_norm": wor(normalize=True, temperature=1.25),
            "top12": sampling.top_k_targets(logits_BxLxV, 12),
            "ghost12": sampling.ghost_targets(logits_BxLxV, 12),
        }

    ref = jax.tree.map(np.asarray, direct(keys_BxL, logits_BxLxV))
    got = {o.name: open_teacher_store(str(out / o.name)).read_rows("train", rows) for o in cfg.cache.outputs}

    sc = ref["s50"]
    g = got["s50"]
    np.testing.assert_array_equal(canon(g["ids"], g["counts"])[0], canon(sc.ids, sc.counts)[0])
    np.testing.assert_array_equal(canon(g["ids"], g["counts"])[1], canon(sc.ids, sc.counts)[1])
    np.testing.assert_array_equal(g["weights"], g["counts"].astype(np.float32) / np.float32(50))

    sc = ref["s50_t08"]
    g = got["s50_t08"]
    np.testing.assert_array_equal(canon(g["ids"], g["counts"])[1], canon(sc.ids, sc.counts)[1])
    np.testing.assert_array_equal(canon(g["ids"], g["weights"])[0], canon(sc.ids, sc.weights)[0])
    np.testing.assert_array_equal(canon(g["ids"], g["weights"])[1], canon(sc.ids, sc.weights)[1])

    for name in ("sys16", "sys16_t08"):  # stored like `sample`: ids + exact counts (+ t/q weights)
        sc, g = ref[name], got[name]
        assert g["ids"].shape == (3, L, 16) and (g["counts"].sum(-1) == 16).all()
        np.testing.assert_array_equal(canon(g["ids"], g["counts"])[1], canon(sc.ids, sc.counts)[1])
        np.testing.assert_array_equal(canon(g["ids"], g["weights"])[0], canon(sc.ids, sc.weights)[0])
        np.testing.assert_array_equal(canon(g["ids"], g["weights"])[1], canon(sc.ids, sc.weights)[1])
    np.testing.assert_array_equal(got["sys16"]["weights"], got["sys16"]["counts"].astype(np.float32) / np.float32(16))
    assert "counts" not in got["ht4_n12"] and got["ht4_n12"]["ids"].shape == (3, L, 16)  # K = h + N
    np.testing.assert_allclose(got["ht4_n12"]["weights"].sum(-1), 1.0, rtol=1e-5)
    for name in ("ht4_n12", "ht4_n12_t12", "wor16", "wor16_norm"):
        st, g = ref[name], got[name]
        for a, b in zip(canon(g["ids"], g["weights"]), canon(st.ids, st.weights)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(got["wor16_norm"]["weights"].sum(-1), 1.0, rtol=1e-5)
    # sample_wor stores record their sampler; one written by another (here: the first
    # Gumbel-top-k sampler, which recorded none) is not resumed, so no store mixes two.
    wor_url = str(out / "wor16")
    manifest = read_json(wor_url)
    assert manifest["sampler"] == sampling.WOR_SAMPLER and "sampler" not in read_json(str(out / "s50"))
    write_json(wor_url, {k: v for k, v in manifest.items() if k != "sampler"})
    with pytest.raises(StoreError, match=r"wor16.*differs in: sampler\).*overwrite=true"):
        cache.run(cfg, progress=False, devices=one_device())
    with pytest.raises(StoreError, match=r"sampler 'v1 .*other draws"):  # not reported as corrupt
        inspect_store_module().verify(wor_url, 1)
    write_json(wor_url, manifest)
    # likewise systematic stores (v1, unrecorded, located the points with a cumsum over V)
    sys_url = str(out / "sys16")
    manifest = read_json(sys_url)
    assert manifest["sampler"] == sampling.SYSTEMATIC_SAMPLER
    write_json(sys_url, {k: v for k, v in manifest.items() if k != "sampler"})
    with pytest.raises(StoreError, match=r"sys16.*differs in: sampler\).*overwrite=true"):
        cache.run(cfg, progress=False, devices=one_device())
    with pytest.raises(StoreError, match=r"systematic sampler 'v1 .*other draws"):
        inspect_store_module().verify(sys_url, 1)
    write_json(sys_url, manifest)

    st = ref["top12"]
    for a, b in zip(canon(got["top12"]["ids"], got["top12"]["weights"]), canon(st.ids, st.weights)):
        np.testing.assert_array_equal(a, b)
    gt = ref["ghost12"]
    g = got["ghost12"]
    for a, b in zip(canon(g["ids"], g["weights"]), canon(gt.ids, gt.probs)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(g["tail_mass"], gt.tail_mass)

    # the `sparse` loss trains from the new stores: its rows carry ids and weights, the loss of a
    # random student on them estimates the full cross-entropy without bias: the mean over positions of the
    # (independent, zero-mean) differences within 4 standard errors
    from rskd_jax import train_data
    from rskd_jax.losses import sparse_kd_loss

    student_BxLxV = jax.random.normal(jax.random.key(5), logits_BxLxV.shape)
    full_ce = -(jax.nn.softmax(logits_BxLxV) * jax.nn.log_softmax(student_BxLxV)).sum(-1)  # sum_j t_j log p_j
    for name in ("sys16", "sys16_t08", "ht4_n12", "ht4_n12_t12"):
        store = open_teacher_store(str(out / name))
        rr = train_data.run_rows(tok, store, method="sparse", student_vocab=vocab)
        batch = rr.train.read(rows)
        assert rr.fields == ("ids", "weights") and ((batch["ids"] >= 0) & (batch["ids"] < vocab)).all()
        np.testing.assert_array_equal(batch["weights"], got[name]["weights"])
        sparse = sparse_kd_loss(student_BxLxV, jnp.asarray(batch["ids"]), jnp.asarray(batch["weights"]))
        diff = np.asarray(sparse - full_ce, np.float64).ravel()
        assert np.isfinite(diff).all() and abs(diff.mean()) <= 4 * diff.std(ddof=1) / np.sqrt(diff.size) + 1e-6

    # numpy references in float64: full log-probs, diagnostics (stored as float16)
    x = np.asarray(logits_BxLxV, np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(got["full"]["logprobs"], logp, rtol=1e-3, atol=1e-3)
    gold = np.take_along_axis(logp[:, :-1], tokens_BxL[:, 1:, None], -1)[..., 0]
    entropy = -(np.exp(logp) * logp).sum(-1)
    for g in got.values():
        np.testing.assert_allclose(g["gold_logprob"][:, :-1], gold, rtol=1e-3, atol=1e-3)
        assert (g["gold_logprob"][:, -1] == 0).all()  # no next token in the row
        np.testing.assert_allclose(g["entropy"], entropy, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(g["token_hash"], token_hash(tokens_BxL))
    shutil.rmtree(out / "full")  # 50 MB; pytest keeps the last runs' tmp dirs


def test_dry_run_projects_and_writes_nothing(work, tokens, teacher):
    out = work / "dry"
    res = subprocess.run(
        cache_cmd(*overrides(tokens, str(out), "cache.max_rows=null", teacher=teacher), "--dry-run"),
        env=subprocess_env(work),
        capture_output=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    summary = json.loads(res.stdout.decode().strip().splitlines()[-1])
    tok = open_token_store(tokens)
    assert summary["dry_run"] is True
    assert summary["tokens_total"] == (tok.num_rows("train") + tok.num_rows("val")) * L
    assert summary["projected_seconds"] > 0 and summary["tokens_per_s"] > 0
    for name in STORES:
        assert summary["stores"][name]["projected_bytes"] > 0
    assert not out.exists()


# ----------------------------------------------------------------------------- refusals


def test_refuses_another_manifest_and_leaves_the_store_alone(ref, tokens, teacher):
    before = {**store_files(ref), "config.yaml": (ref / "config.yaml").read_bytes()}
    with pytest.raises(StoreError, match=r"differs in: seed.*overwrite=true"):
        cache.run(
            cfg_for(tokens, ref, "cache.seed=1", "mesh.data=1", teacher=teacher), progress=False, devices=one_device()
        )
    assert {**store_files(ref), "config.yaml": (ref / "config.yaml").read_bytes()} == before


def test_resumes_inputs_reached_by_another_path(ref, work, tokens, teacher):
    """Identity is by content: the same token store and teacher spelled differently (or
    moved) resume; their paths are provenance, kept as first written."""
    before = store_files(ref)
    os.symlink(tokens, work / "tokens_link")
    other_teacher = os.path.join(teacher, "..", os.path.basename(teacher))
    summary = cache.run(
        cfg_for(str(work / "tokens_link"), ref, "cache.batch_size=8", "mesh.data=1", teacher=other_teacher),
        progress=False,
        devices=one_device(),
    )
    assert summary["rows_written"] == {"train": 0, "val": 0}
    assert store_files(ref) == before
    prov = open_teacher_store(str(ref / "rskd_n50")).manifest["provenance"]
    assert prov["teacher_spec"]["source"] == os.path.realpath(teacher)
    assert prov["tokens_url"] == f"file://{tokens}/"


def test_provenance_is_not_compared(tmp_path):
    from rskd_jax.store.teacher import create_teacher_store

    kw = dict(num_rows={"train": 2}, seq_len=4, method="top_k", k=2, vocab_size=10, chunk_rows=2)
    create_teacher_store(str(tmp_path / "s"), manifest={"seed": 0, "provenance": {"path": "a"}}, **kw)
    st = create_teacher_store(str(tmp_path / "s"), manifest={"seed": 0, "provenance": {"path": "b"}}, **kw)
    assert st.manifest["provenance"] == {"path": "a"}
    with pytest.raises(StoreError, match=r"differs in: seed\)"):
        create_teacher_store(str(tmp_path / "s"), manifest={"seed": 1, "provenance": {"path": "a"}}, **kw)


def test_refuses_missing_and_incomplete_token_stores(work, tokens):
    with pytest.raises(StoreError, match="no token store at .*python -m rskd_jax.data"):
        cache.run(cfg_for(str(work / "nope"), work / "x1"), progress=False)
    broken = work / "incomplete_tokens"
    shutil.copytree(tokens, broken)
    write_json(str(broken), dict(read_json(str(broken)), complete=False))
    with pytest.raises(StoreError, match="incomplete.*Re-run `python -m rskd_jax.data`"):
        cache.run(cfg_for(str(broken), work / "x2"), progress=False)
    assert not (work / "x1").exists() and not (work / "x2").exists()


def test_refuses_token_ids_outside_the_vocabulary(work, tokens):
    tok = open_token_store(tokens)
    foreign = str(work / "foreign_tokens")
    write_token_store(
        foreign,
        {"train": tok.read("train", np.arange(16)), "val": tok.read("val", np.arange(8))},
        {"tokenizer": {"spec": "small", "fingerprint": "small", "vocab_size": 1000, "eos_id": 0}},
    )
    with pytest.raises(CacheError, match=r"train row \d+ .* holds token id \d+, outside .*\[0, 1000\)"):
        cache.run(cfg_for(foreign, work / "x3", "mesh.data=1"), progress=False, devices=one_device())
    assert not (work / "x3").exists()


def test_refuses_nan_teacher_naming_the_row(work, tokens):
    from rskd_jax.models import LlamaConfig, init_model, save_pretrained

    tok = open_token_store(tokens)
    train = tok.read("train", np.arange(ROWS))
    # a token absent from block 0 (rows 0-7) but present in block 1: a NaN embedding row
    # (untied, so the LM head stays finite) poisons exactly the rows that hold it
    later = set(np.unique(train[8:]).tolist()) - set(np.unique(train[:8]).tolist())
    bad = min(later)
    first_row = int(np.nonzero((train == bad).any(1))[0][0])
    model = init_model(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=192,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            tie_embeddings=False,
        ),
        seed=0,
    )
    model.embed[...] = model.embed[...].at[bad].set(jnp.nan)
    hf = work / "nan_teacher"
    save_pretrained(model, hf)
    out = work / "x4"
    with pytest.raises(CacheError, match=rf"NaN/inf on train row {first_row};.*teacher.dtype=float32"):
        cache.run(
            cfg_for(tokens, out, f"teacher.source={hf}", "cache.splits=[train]", "mesh.data=1"),
            progress=False,
            devices=one_device(),
        )
    for name in STORES:
        assert open_teacher_store(str(out / name)).done_mask("train").tolist() == [True] * 8 + [False] * 5


def test_write_error_surfaces(work, tokens, teacher):
    out = work / "x5"
    cacher = cache.Cacher(
        cfg_for(tokens, out, "cache.splits=[train]", "mesh.data=1", teacher=teacher), devices=one_device()
    )
    (out / "rskd_n50" / "train" / "ids" / "c").write_text("a file where the chunk directory goes")
    with pytest.raises(StoreError, match=r"writing rows \[0, 8\) of 'train' .* failed"):
        cacher.cache_split("train", progress=False)
    assert not open_teacher_store(str(out / "rskd_n50")).done_mask("train").any()


def test_refuses_batches_that_do_not_split(work, tokens):
    with pytest.raises(CacheError, match="not a multiple of cache.chunk_rows=8.*multiple of 8"):
        cache.run(
            cfg_for(tokens, work / "x6", "cache.batch_size=12", "mesh.data=1"), progress=False, devices=one_device()
        )
    with pytest.raises(ShardingError, match="cache.batch_size=4 is not divisible by the batch axes"):
        cache.run(cfg_for(tokens, work / "x7", "cache.batch_size=4", "mesh.data=8"), progress=False)


def test_refuses_unknown_config_keys(work, tokens, capsys):
    with pytest.raises(ConfigError, match="cache.bogus"):
        cfg_for(tokens, work / "x8", "cache.bogus=1")
    with pytest.raises(SystemExit) as exc:
        cache.main(["--config", CONFIG, "cache.batchsize=8"])
    assert exc.value.code == 2 and "cache.batch_size" in capsys.readouterr().err


# ----------------------------------------------------------------------------- inspect --verify


def inspect_store_module():
    import importlib.util

    # tools/ is not a package: load the script by path (nothing goes on sys.path)
    spec = importlib.util.spec_from_file_location("inspect_store", REPO / "tools" / "inspect_store.py")
    assert spec is not None and spec.loader is not None
    inspect_store = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inspect_store)
    return inspect_store


def run_inspect(*args: str) -> tuple[int, dict]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = inspect_store_module().main(list(args))
    return code, json.loads(buf.getvalue())


def test_inspect_verify_recomputes_rows(ref, work):
    code, info = run_inspect(str(ref / "rskd_n50"), "--verify", "4", "--json")
    assert code == 0, info["verify"]
    assert info["verify"]["rows_checked"] == 4 and info["verify"]["rows_mismatched"] == 0
    # tamper: train block 0 (rows 0-7) gets val block 0's data, every array, a consistent block
    bad = work / "tampered"
    shutil.copytree(ref, bad)
    split_dir = bad / "rskd_n50"
    for arr in os.listdir(split_dir / "train"):
        if arr != "done":  # chunk key c/0 (1-D arrays) or c/0/0: rows 0-7
            src, dst = split_dir / "val" / arr / "c" / "0", split_dir / "train" / arr / "c" / "0"
            if src.is_dir():
                shutil.rmtree(dst)
                shutil.copytree(src, dst)
            else:
                shutil.copyfile(src, dst)
    code, info = run_inspect(str(split_dir), "--verify", str(2 * ROWS), "--json")
    v = info["verify"]
    assert code == 1 and v["rows_checked"] == 2 * ROWS
    assert sorted((m["split"], m["row"]) for m in v["mismatches"]) == [("train", r) for r in range(8)]
    assert not any(m["token_hash_ok"] for m in v["mismatches"])


@pytest.mark.slow
def test_a_draw_stream_gives_other_draws_and_stream_0_is_the_plain_store(ref, work, tokens, teacher):
    out = work / "streams"
    outputs = (
        "cache.outputs=[{name: rskd_n50, method: sample, num_draws: 50},"
        " {name: fresh, method: sample, num_draws: 50, stream: 7}]"
    )
    cfg = cfg_for(tokens, out, "cache.batch_size=8", "mesh.data=1", "cache.splits=[train]", outputs, teacher=teacher)
    cache.run(cfg, progress=False, devices=one_device())
    plain, fresh = open_teacher_store(str(ref / "rskd_n50")), open_teacher_store(str(out / "rskd_n50"))
    other = open_teacher_store(str(out / "fresh"))
    rows = np.arange(ROWS)
    a, b, c = (s.read_rows("train", rows) for s in (plain, fresh, other))
    for k in ("ids", "counts"):  # stream 0: the same draws (and manifest) as a store made without streams
        np.testing.assert_array_equal(a[k], b[k])
    assert "stream" not in fresh.manifest["params"] and other.manifest["params"]["stream"] == 7
    # another stream: other draws of the same distributions (50 draws per position, unique ids differ)
    assert np.mean(np.any(a["ids"] != c["ids"], axis=-1)) > 0.9
    np.testing.assert_array_equal(a["counts"].sum(-1), c["counts"].sum(-1))  # still 50 draws each
    with pytest.raises(ConfigError, match="stream applies to sampled stores"):
        cfg_for(tokens, out, "cache.outputs=[{name: t, method: top_k, num_draws: 4, stream: 1}]")
