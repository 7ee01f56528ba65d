"""Document masking (context.document_masking): segment ids and positions from doc_starts,
the decoder on every attention path, the input pipeline, the teacher-store check, the resume
key. The cache side (manifest, batch invariance, masked teacher) is in tests/test_cache.py."""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from test_train import ROOT, TOKENIZER, make_teacher, make_tokens, overrides

from rskd_jax.config import EvaluateRun, TrainRun, load_config
from rskd_jax.documents import segments_and_positions
from rskd_jax.models import LlamaConfig, init_model
from rskd_jax.store.common import StoreError
from rskd_jax.store.tokens import open_token_store, write_token_store
from rskd_jax.train_data import Rows, make_batch_iterator

forward = nnx.jit(lambda model, tokens, seg, pos: model(tokens, seg, pos))

BASE = LlamaConfig(
    vocab_size=61,
    hidden_size=64,
    intermediate_size=96,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=1e6,
)
CONFIGS = {
    "full": BASE,
    "all_sliding": BASE.replace(sliding_window=9),  # static window
    "mixed": BASE.replace(  # traced window per layer, local RoPE base, q/k norm (Gemma 3-like)
        sliding_window=9,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        rope_local_theta=1e4,
        qk_norm=True,
    ),
    "softcap": BASE.replace(attn_softcap=20.0, final_softcap=30.0),  # xla falls back to chunked
}


def test_segments_and_positions_by_hand():
    starts = np.array([[1, 0, 0, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], np.uint8)
    seg, pos = segments_and_positions(starts)
    # row 1 begins mid-document: that tail is segment 0, positions from the row start
    assert seg.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 2, 2], [0, 0, 0, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 1], [0, 1, 2, 3, 4]]
    assert seg.dtype == pos.dtype == np.int32


# test-fast keeps two of the eight: a traced per-layer window on the xla path, soft-capping chunked
@pytest.mark.parametrize(
    "name,attention",
    [
        (n, a) if (n, a) in {("mixed", "xla"), ("softcap", "chunked")} else pytest.param(n, a, marks=pytest.mark.slow)
        for n in CONFIGS
        for a in ("chunked", "xla")
    ],
)
def test_packed_document_equals_the_document_alone(name, attention):
    """Two documents in a row (the second from position 29, longer than every window): the
    second's logits equal the second run alone, and the first's equal the first alone."""
    model = init_model(CONFIGS[name].replace(attention=attention), seed=0)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 61, (2, 70)).astype(np.int32)
    starts = np.zeros((2, 70), bool)
    starts[:, 0], starts[0, 29], starts[1, 41] = True, True, True
    seg, pos = segments_and_positions(starts)
    packed = np.asarray(forward(model, tokens, seg, pos))
    for row, cut in ((0, 29), (1, 41)):
        second = np.asarray(forward(model, tokens[row : row + 1, cut:], None, None))[0]
        first = np.asarray(forward(model, tokens[row : row + 1, :cut], None, None))[0]
        scale = np.abs(second).max()
        np.testing.assert_allclose(packed[row, cut:], second, rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(packed[row, :cut], first, rtol=0, atol=1e-5 * scale)
    unmasked = np.asarray(forward(model, tokens, None, None))
    assert np.abs(unmasked[0, 29:] - packed[0, 29:]).max() > 1e-3  # the documents do interact


@pytest.mark.parametrize("attention", ["chunked", "xla"])
def test_masking_off_and_one_document_per_row_are_todays_logits_exactly(attention):
    """Without segment ids the decoder is today's (no extra mask, positions 0..L-1); with one
    segment per row and positions 0..L-1 it gives bit-identical logits."""
    model = init_model(CONFIGS["mixed"].replace(attention=attention), seed=0)
    tokens = np.random.default_rng(2).integers(0, 61, (2, 40)).astype(np.int32)
    plain = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    seg, pos = segments_and_positions(np.eye(1, 40, dtype=bool).repeat(2, 0))
    assert np.array_equal(np.asarray(forward(model, tokens, seg, pos)), plain)
    assert np.array_equal(np.asarray(forward(model, tokens, None, None)), plain)


def test_positions_reach_rope():
    """The positions argument is what RoPE rotates by: tables at explicit positions are the
    0..L-1 tables gathered there, and positions restarted at 12 within ONE segment (relative
    distances across 12 change) change the logits, while the same positions with the segments
    split give the second document alone. (Within a segment RoPE scores depend only on position
    differences, so under masking the restart changes rounding, not the math.)"""
    from rskd_jax.models.rope import rope_tables

    pos = np.array([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]], np.int32)
    cos, sin = rope_tables(5, 16, 1e4, positions=pos)
    cos0, sin0 = rope_tables(5, 16, 1e4)
    assert cos.shape == (2, 5, 8)
    np.testing.assert_array_equal(cos, np.asarray(cos0)[pos])
    np.testing.assert_array_equal(sin, np.asarray(sin0)[pos])

    model = init_model(BASE, seed=0)
    tokens = np.random.default_rng(3).integers(0, 61, (1, 30)).astype(np.int32)
    starts = np.zeros((1, 30), bool)
    starts[0, [0, 12]] = True
    seg, pos = segments_and_positions(starts)
    one_segment = np.zeros_like(seg)
    plain = np.asarray(forward(model, tokens, one_segment, None))
    assert np.abs(np.asarray(forward(model, tokens, one_segment, pos)) - plain)[0, 12:].max() > 1e-3
    alone = np.asarray(forward(model, tokens[:, 12:], None, None))
    np.testing.assert_allclose(
        np.asarray(forward(model, tokens, seg, pos))[0, 12:], alone[0], atol=1e-5 * np.abs(alone).max()
    )


def test_pipeline_delivers_segments_and_positions_of_doc_starts(tmp_path):
    """Documents end with EOS (0); the second spans rows 0 and 1, so row 1 starts mid-document
    (its doc_starts[0] is 0): segment 0 and positions from the row start for that tail."""
    eos = TOKENIZER["eos_id"]
    train = np.array([[5, 6, eos, 7], [8, eos, 9, eos], [3, 4, 5, 6]], np.int32)
    url = str(tmp_path / "tok")
    write_token_store(url, {"train": train, "val": train[:1]}, {"tokenizer": TOKENIZER, "eos_id": eos})
    store = open_token_store(url)
    assert store.read_doc_starts("train", np.arange(3)).astype(int).tolist() == [
        [1, 0, 0, 1],
        [0, 0, 1, 0],
        [1, 0, 0, 0],
    ]
    batch = next(make_batch_iterator(Rows(store, "train", documents=True), global_batch_size=3, seed=0, shuffle=False))
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1], [0, 1, 2, 3]]
    assert "segment_ids" not in Rows(store, "train").read(np.arange(3))


def _train_cfg(stores, out, *extra, cls=TrainRun):
    return load_config(
        cls, os.path.join(ROOT, "configs/tiny/train.yaml"), overrides(stores, str(out), "train.steps=2", *extra)
    )


@pytest.fixture(scope="module")
def masked_stores(tmp_path_factory):
    """Random tokens (EOS = 0 about every 60 tokens: several documents per row) and a teacher
    store whose manifest says it was cached with document masking."""
    root = tmp_path_factory.mktemp("docs")
    splits, manifest = make_doc_tokens(str(root / "tokens"))
    make_teacher(str(root / "teacher"), splits, manifest, document_masking=True)
    return str(root / "tokens"), str(root / "teacher")


def make_doc_tokens(url):
    """test_train's random tokens, with doc_starts after each EOS (0)."""
    splits, _ = make_tokens(url + ".plain")
    manifest = write_token_store(url, splits, {"tokenizer": TOKENIZER, "eos_id": TOKENIZER["eos_id"]})
    starts = open_token_store(url).read_doc_starts("train", np.arange(len(splits["train"])))
    assert starts[:, 1:].sum() > 10  # documents start inside rows
    return splits, manifest


WANT = r"cached with context.document_masking=true, this run has context.document_masking=false"


def test_train_refuses_a_store_with_the_other_setting(masked_stores, tmp_path):
    from rskd_jax import train
    from rskd_jax.train_data import DataMismatch

    with pytest.raises(DataMismatch, match=WANT):
        train.run(_train_cfg(masked_stores, tmp_path / "a"))


def test_resume_refuses_another_document_masking(tmp_path):
    from rskd_jax.train import resume_diff

    a = load_config(TrainRun, None, [])
    b = load_config(TrainRun, None, ["context.document_masking=true"])
    assert resume_diff(a, b) == {"context.document_masking": (False, True)}


@pytest.mark.slow
def test_masked_training_reaches_the_student(masked_stores, tmp_path):
    """Two steps with document masking on (sparse KD from the masked store, then evaluation
    with the estimated KL): it runs end to end, and its first loss differs from the same run
    without masking on a store that says so (the student sees other contexts)."""
    from rskd_jax import evaluate, train
    from rskd_jax.train_data import DataMismatch

    on = train.run(_train_cfg(masked_stores, tmp_path / "on", "context.document_masking=true", "train.export_hf=false"))
    assert on["end_step"] == 2 and np.isfinite(on["eval"]["val_loss"])
    root = tmp_path / "plain"
    splits, manifest = make_doc_tokens(str(root / "tokens"))
    make_teacher(str(root / "teacher"), splits, manifest)  # same tokens and targets, no masking
    train.run(_train_cfg((str(root / "tokens"), str(root / "teacher")), tmp_path / "off", "train.export_hf=false"))
    first = lambda out: next(r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r)
    assert abs(first(tmp_path / "on")["loss"] - first(tmp_path / "off")["loss"]) > 1e-4
    # evaluate reads the same setting: refused off, runs on (estimated KL from the store)
    ev = [f"evaluate.checkpoint={tmp_path / 'on'}", f"evaluate.teacher={masked_stores[1]}", "evaluate.max_batches=1"]
    with pytest.raises(DataMismatch, match=WANT):
        evaluate.run(_train_cfg(masked_stores, tmp_path / "on", *ev, cls=EvaluateRun))
    res = evaluate.run(
        _train_cfg(masked_stores, tmp_path / "on", *ev, "context.document_masking=true", cls=EvaluateRun)
    )
    assert np.isfinite(res["kl_to_teacher"])


def test_a_store_without_doc_starts_is_refused_with_the_fix(masked_stores, tmp_path):
    from rskd_jax.train_data import split_rows

    old = str(tmp_path / "old")
    shutil.copytree(masked_stores[0], old)
    shutil.rmtree(os.path.join(old, "train", "doc_starts"))
    with open(os.path.join(old, "manifest.json")) as f:
        m = json.load(f)
    m["splits"]["train"].pop("doc_starts")
    with open(os.path.join(old, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(StoreError, match="no document starts.*data.overwrite=true"):
        split_rows(open_token_store(old), None, "train", (), documents=True)
