"""The entry codec (store/entries.py) on its own: hand-computed encodings, round trips and
the StoreError raised on invalid input and on corrupt stored values. Pure numpy, no I/O."""

import numpy as np
import pytest

from rskd_jax.store import entries
from rskd_jax.store.common import StoreError

U8 = np.dtype(np.uint8)


def enc(ids, counts=None, weights=None, *, vocab_size=10, id_to_rank=None, start_row=0):
    as_arr = lambda x: None if x is None else np.asarray(x)
    return entries.encode(
        np.asarray(ids),
        as_arr(counts),
        as_arr(weights),
        vocab_size=vocab_size,
        id_to_rank=id_to_rank,
        split="train",
        start_row=start_row,
    )


def dec(e, *, k, vocab_size=10, rank_to_id=None, counts=True):
    return entries.decode(
        e["num_ids"],
        e["ids"],
        e["counts"] if counts else None,
        e.get("weights"),
        k=k,
        vocab_size=vocab_size,
        rank_to_id=rank_to_id,
        where="mem://x/train",
    )


def test_counts_encode_by_hand():
    # row 0: position 0 draws {7: 1, 2: 2}, position 1 {5: 3}; row 1: {0: 1, 9: 1, 4: 1}, {3: 3}
    ids = [[[7, 2, 0], [5, 0, 0]], [[0, 9, 4], [3, 1, 1]]]
    counts = [[[1, 2, 0], [3, 0, 0]], [[1, 1, 1], [3, 0, 0]]]
    e = enc(ids, counts)
    assert e["num_ids"].tolist() == [[2, 1], [3, 1]]
    # gaps: sorted ids 2, 7 -> 2, 7-2-1 = 4; 5 -> 5 | 0, 4, 9 -> 0, 3, 4; 3 -> 3
    assert e["ids"].tolist() == [[2, 4, 5, 0, 0, 0], [0, 3, 4, 3, 0, 0]]
    # counts c - 1 in sorted order, the first of each position stored as 0
    assert e["counts"].tolist() == [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert {name: x.dtype.name for name, x in e.items()} == {"num_ids": "uint8", "ids": "uint8", "counts": "uint8"}
    d = dec(e, k=3)
    assert d["ids"].tolist() == [[[2, 7, 0], [5, 0, 0]], [[0, 4, 9], [3, 0, 0]]]
    assert d["counts"].tolist() == [[[2, 1, 0], [3, 0, 0]], [[1, 1, 1], [3, 0, 0]]]
    assert d["num_ids"].tolist() == [[2, 1], [3, 1]]
    np.testing.assert_array_equal(d["weights"], d["counts"].astype(np.float32) / np.float32(3))
    assert d["weights"].dtype == np.float32


def test_counts_above_one_are_stored_minus_one():
    e = enc([[[1, 4, 6, 0]]], [[[1, 2, 1, 0]]], vocab_size=8)  # N = 4
    assert e["counts"].tolist() == [[0, 1, 0, 0]]
    assert dec(e, k=4, vocab_size=8)["counts"].tolist() == [[[1, 2, 1, 0]]]


def test_weights_encode_by_hand_and_round_trip():
    ids = [[[3, 8, 1], [6, 2, 0]]]
    weights = [[[0.5, 0.25, 0.0], [0.125, 0.0, 0.75]]]
    e = enc(ids, weights=weights)
    assert e["num_ids"].tolist() == [[2, 2]]
    # sorted: 3, 8 -> 3, 4 | 0 (w .75), 6 (w .125) -> 0, 5
    assert e["ids"].tolist() == [[3, 4, 0, 5, 0, 0]]
    assert e["weights"].tolist() == [[0.5, 0.25, 0.75, 0.125, 0.0, 0.0]]
    assert "counts" not in e
    d = dec(e, k=3, counts=False)
    assert d["ids"].tolist() == [[[3, 8, 0], [0, 6, 0]]]
    assert d["weights"].tolist() == [[[0.5, 0.25, 0.0], [0.75, 0.125, 0.0]]]
    assert "counts" not in d


def test_rank_table_order_and_round_trip():
    table = entries.rank_table(np.array([1, 5, 0, 5, 2]), 5)
    assert table.tolist() == [1, 3, 4, 0, 2]  # ties (1, 3) by id
    to_rank = entries.invert_rank_table(table)
    assert to_rank.tolist() == [3, 0, 4, 1, 2]
    e = enc([[[0, 3, 2]]], [[[1, 1, 1]]], vocab_size=5, id_to_rank=to_rank)
    # ranks of 0, 3, 2 = 3, 1, 4 -> sorted 1, 3, 4 -> gaps 1, 1, 0
    assert e["ids"].tolist() == [[1, 1, 0]]
    d = dec(e, k=3, vocab_size=5, rank_to_id=table)
    assert d["ids"].tolist() == [[[3, 0, 2]]]  # canonical order: ascending rank
    with pytest.raises(StoreError, match="id_frequencies must be 5 finite non-negative"):
        entries.rank_table(np.array([1, -1, 0, 0, 0]), 5)


def test_random_round_trip_matches_sorted_input():
    rng = np.random.default_rng(0)
    b, length, k, v = 3, 5, 8, 300
    table = entries.rank_table(rng.integers(0, 50, v), v)
    ids = np.zeros((b, length, k), np.int64)
    counts = np.zeros((b, length, k), np.int64)
    for i in range(b):
        for j in range(length):
            draws = rng.integers(0, v, k)
            uniq, c = np.unique(draws, return_counts=True)
            perm = rng.permutation(len(uniq))
            ids[i, j, : len(uniq)], counts[i, j, : len(uniq)] = uniq[perm], c[perm]
    e = enc(ids, counts, vocab_size=v, id_to_rank=entries.invert_rank_table(table))
    assert e["ids"].dtype == np.uint16 and e["counts"].dtype == np.uint8
    d = dec(e, k=k, vocab_size=v, rank_to_id=table)
    for i in range(b):
        for j in range(length):
            n = int(d["num_ids"][i, j])
            assert dict(zip(d["ids"][i, j, :n], d["counts"][i, j, :n])) == dict(
                (a, c) for a, c in zip(ids[i, j], counts[i, j]) if c
            )
            ranks = entries.invert_rank_table(table)[d["ids"][i, j, :n]]
            assert np.all(np.diff(ranks) > 0)
            assert not d["ids"][i, j, n:].any() and not d["counts"][i, j, n:].any()


def test_empty_block():
    e = {"num_ids": np.zeros((0, 4), U8), "ids": np.zeros((0, 12), U8), "counts": np.zeros((0, 12), U8)}
    d = dec(e, k=3)
    assert {n: x.shape for n, x in d.items()} == {
        "ids": (0, 4, 3),
        "weights": (0, 4, 3),
        "num_ids": (0, 4),
        "counts": (0, 4, 3),
    }


@pytest.mark.parametrize(
    "ids, counts, weights, message",
    [
        ([[[1, 2]], [[3, 4]]], [[[1, 1]], [[3, -1]]], None, "split 'train' row 9 position 0 slot 1: negative count -1"),
        (
            [[[1, 2]], [[3, 4]]],
            [[[1, 1]], [[1, 0]]],
            None,
            "split 'train' row 9 position 0: counts sum to 1, expected N = 2",
        ),
        ([[[1, 2]]], [[[1, 1]]], [[[0.5, np.nan]]], "row 8 position 0 slot 1: weight nan is not finite"),
        ([[[1, 2]]], [[[2, 0]]], [[[0.5, 0.5]]], "row 8 position 0 slot 1: weight 0.5 > 0 on a slot with count 0"),
        ([[[1, 10]]], [[[1, 1]]], None, "row 8 position 0 slot 1: id 10 outside \\[0, 10\\)"),
        ([[[1, 10]]], None, [[[1.0, 0.0]]], None),  # an absent slot's id is ignored
        ([[[4, 4]]], [[[1, 1]]], None, "row 8 position 0 slot 0: id 4 appears twice"),
    ],
)
def test_invalid_input_names_split_row_position(ids, counts, weights, message):
    as_arr = lambda x: None if x is None else np.asarray(x)
    call = lambda: entries.encode(
        np.asarray(ids), as_arr(counts), as_arr(weights), vocab_size=10, id_to_rank=None, split="train", start_row=8
    )
    if message is None:
        call()
    else:
        with pytest.raises(StoreError, match=message):
            call()


def test_corrupt_stored_values_raise():
    good = enc([[[7, 2, 0], [5, 0, 0]]], [[[1, 2, 0], [3, 0, 0]]])
    bad = dict(good, num_ids=np.array([[4, 1]], U8))
    with pytest.raises(StoreError, match=r"mem://x/train: num_ids outside \[1, 3\]: the store is corrupt"):
        dec(bad, k=3)
    bad = dict(good, num_ids=np.array([[2, 0]], U8))  # sample: every position has an entry
    with pytest.raises(StoreError, match="num_ids outside"):
        dec(bad, k=3)
    bad = dict(good, ids=np.array([[2, 4, 5, 0, 0, 0]], U8))
    bad["ids"][0, 1] = 7  # second rank 2 + 1 + 7 = 10 >= V
    with pytest.raises(StoreError, match=r"decoded id outside \[0, 10\): the store is corrupt"):
        dec(bad, k=3)
    bad = dict(good, counts=np.array([[0, 2, 0, 0, 0, 0]], U8))  # others sum to 3 = N: first < 1
    with pytest.raises(StoreError, match="counts exceed N = 3: the store is corrupt"):
        dec(bad, k=3)


def test_locate_and_first_bad():
    assert entries.first_bad(np.array([[False, False], [False, True]])) == (1, 1)
    assert entries.first_bad(np.zeros((2, 2), bool)) is None
    assert entries.locate("val", 4, (0,)) == "split 'val' row 4"
    assert entries.locate("val", 4, (2, 7)) == "split 'val' row 6 position 7"


def test_uint_for():
    assert [entries.uint_for(m).name for m in (0, 255, 256, 65535, 65536, 2**32 - 1)] == [
        "uint8",
        "uint8",
        "uint16",
        "uint16",
        "uint32",
        "uint32",
    ]
    with pytest.raises(StoreError, match="does not fit in uint32"):
        entries.uint_for(2**32)


def test_token_hash_is_the_teacher_stores():
    from rskd_jax.store.teacher import token_hash

    assert token_hash is entries.token_hash
    h = entries.token_hash(np.array([[1, 2, 3], [1, 2, 4], [1, 2, 3]], np.int32))
    assert h[0] == h[2] and h[0] != h[1]
