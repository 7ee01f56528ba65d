"""Reader forms (trimmed slots, flat ragged entries) and the grain source over real tiny stores
written through the store APIs: lossless against the dense rows, the loss unchanged, every
token mismatch refused."""

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_stores import ROWS, VOCAB, K, L, make_teacher, make_tokens, write_forms_stores

from rskd_jax import losses
from rskd_jax.store import forms, open_teacher_store
from rskd_jax.store.grain_source import TeacherSource, TokenMismatch


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return write_forms_stores(tmp_path_factory.mktemp("forms"))


@pytest.fixture(scope="module")
def rows(stores):
    return open_teacher_store(stores[1]).read_rows("train", np.array([5, 0, 17, 3]))


def test_store_has_uneven_entry_counts(rows):
    """The fixture is a fair test of trimming: positions hold 1..K entries, the batch max < K."""
    n = rows["num_ids"]
    assert n.min() <= 2 and n.max() < K and n.std() > 0.5


@pytest.mark.parametrize("bucket", [1, 4, 64])
def test_trimmed_is_the_dense_rows_cut_to_the_largest_entry_count(rows, bucket):
    t = forms.trimmed(rows, bucket=bucket)
    k2 = t["ids"].shape[-1]
    assert k2 == min(K, -(-int(rows["num_ids"].max()) // bucket) * bucket)
    for name in ("ids", "weights", "counts"):
        np.testing.assert_array_equal(t[name], rows[name][..., :k2])
        assert not rows[name][..., k2:].any()  # nothing was cut but empty slots
    np.testing.assert_array_equal(t["num_ids"], rows["num_ids"])
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(*rows["ids"].shape[:2], VOCAB)), jnp.float32)
    np.testing.assert_array_equal(
        losses.sparse_kd_loss(logits, t["ids"], t["weights"]),
        losses.sparse_kd_loss(logits, rows["ids"], rows["weights"]),
    )


def test_ragged_entries_expand_back_to_the_dense_rows(rows):
    r = forms.ragged(rows, bucket=256)
    b = rows["ids"].shape[0]
    e = int(rows["num_ids"].sum())
    assert r["entry_pos"].shape[0] % 256 == 0 and r["entry_pos"].shape[0] >= e
    assert not r["entry_weights"][e:].any() and not r["entry_counts"][e:].any()
    assert np.all(np.diff(r["entry_pos"][:e]) >= 0)  # (row, position) order
    # back to dense: entry j of a position goes to slot j (canonical order kept)
    dense = {n: np.zeros((b * L, K), rows[n].dtype) for n in ("ids", "weights", "counts")}
    pos = r["entry_pos"][:e]
    slot = np.arange(e) - np.searchsorted(pos, pos)  # index within its position
    for name, src in (("ids", "entry_ids"), ("weights", "entry_weights"), ("counts", "entry_counts")):
        dense[name][pos, slot] = r[src][:e]
        np.testing.assert_array_equal(dense[name].reshape(b, L, K), rows[name])


def test_ragged_loss_equals_dense_loss(rows):
    b = rows["ids"].shape[0]
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(b, L, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, VOCAB)), jnp.float32)
    r = forms.ragged(rows, bucket=100)
    got = losses.sparse_kd_loss_from_hidden_ragged(
        h, w, r["entry_pos"], r["entry_ids"], r["entry_weights"], chunk_size=8
    )
    ref = losses.sparse_kd_loss(h @ w, rows["ids"], rows["weights"])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_read_rows_as_and_bytes(stores, rows):
    store = open_teacher_store(stores[1])
    idx = np.array([5, 0, 17, 3])
    for form in forms.FORMS:
        got = store.read_rows_as("train", idx, form)
        want = forms.to_form(rows, form)
        assert sorted(got) == sorted(want)
        for k in got:
            np.testing.assert_array_equal(got[k], want[k])
    tokens = idx.size * L
    dense = forms.nbytes_per_token(rows, ("ids", "weights"), tokens)
    assert dense == K * 8
    ragged = forms.ragged(rows, bucket=1)
    assert (
        forms.nbytes_per_token(ragged, ("entry_pos", "entry_ids", "entry_weights"), tokens)
        == 12 * rows["num_ids"].sum() / tokens
        < dense
    )
    with pytest.raises(ValueError, match="form must be one of"):
        store.read_rows_as("train", idx, "sparse")


def test_grain_source_joins_tokens_and_targets(stores):
    tokens_url, teacher_url = stores
    src = TeacherSource(tokens_url, teacher_url, "train")
    assert isinstance(src, grain.sources.RandomAccessDataSource) and len(src) == ROWS
    assert src.fields == ("ids", "weights", "num_ids", "counts")
    store = open_teacher_store(teacher_url)
    want = store.read_rows("train", np.array([7]))
    rec = src[7]
    assert rec["tokens"].shape == (L,) and int(rec["index"]) == 7
    np.testing.assert_array_equal(rec["ids"], want["ids"][0])
    ds = grain.MapDataset.source(src).shuffle(seed=0).batch(4).map(lambda x: forms.to_form(x, "ragged"))
    seen = []
    for batch in ds.to_iter_dataset():
        seen += batch["index"].tolist()
        assert batch["tokens"].shape == (4, L) and batch["entry_pos"].ndim == 1
        dense = store.read_rows("train", batch["index"])
        assert int((batch["entry_weights"] > 0).sum()) == int(dense["num_ids"].sum())
    assert sorted(seen) == list(range(ROWS))
    assert "TeacherSource(" in repr(src)


def test_grain_source_refuses_other_tokens(stores, tmp_path):
    tokens_url, teacher_url = stores
    _, other = make_tokens(str(tmp_path / "other"), 1)
    with pytest.raises(TokenMismatch, match="fingerprint"):  # the manifest names another store
        TeacherSource(str(tmp_path / "other"), teacher_url, "train")
    # a store whose manifest names `other` but whose rows were computed on the first tokens:
    # only the per-row hash can tell
    first = np.asarray(
        __import__("rskd_jax.store", fromlist=["x"]).open_token_store(tokens_url).read("train", np.arange(ROWS)),
        np.int32,
    )
    make_teacher(str(tmp_path / "forged"), other, first)
    src = TeacherSource(str(tmp_path / "other"), str(tmp_path / "forged"), "train")
    with pytest.raises(TokenMismatch, match="train row 2: its tokens differ"):
        src._getitems([2, 3])
    # equal tokens pass: the rows where both token stores agree (none here) and the right store
    ok = TeacherSource(tokens_url, teacher_url, "train")
    assert ok.read_batch(np.array([2, 3]))["tokens"].shape == (2, L)
