"""cache_writer.StoreWriter on fake stores: blocks, padding rows, diagnostics, the NaN check,
errors of background writes."""

import concurrent.futures as cf

import numpy as np
import pytest

from rskd_jax.cache_writer import CacheError, StoreWriter


class FakeStore:
    def __init__(self, fail: bool = False):
        self.calls: list = []
        self.fail = fail

    def write_rows(self, split, start, rows):
        self.calls.append((split, start, {k: np.array(v) for k, v in rows.items()}))
        f: cf.Future = cf.Future()
        if self.fail:
            f.set_exception(OSError(f"disk full at row {start}"))
        else:
            f.set_result(None)
        return f


def _step_out(r: int, finite=None):
    return {
        "finite": np.ones(r, bool) if finite is None else finite,
        "a": {"ids": np.arange(r * 2).reshape(r, 2)},
        "diagnostics": {"entropy": np.arange(r, dtype=np.float32) + 0.5},
    }


def test_writes_whole_blocks_and_skips_padding():
    store = FakeStore()
    rows_R = np.array([8, 9, 10, 11, 20, 21, -1, -1])  # block 8-11, a short last block 20-21, padding
    tokens_RxL = np.arange(8)[:, None] * np.ones((1, 3), int)
    StoreWriter({"a": store}, chunk_rows=4, diagnostics=True).write("train", rows_R, tokens_RxL, _step_out(8))
    assert [(s, start) for s, start, _ in store.calls] == [("train", 8), ("train", 20)]
    _, _, second = store.calls[1]
    assert second["ids"].tolist() == [[8, 9], [10, 11]]
    assert second["tokens"][:, 0].tolist() == [4, 5]
    assert second["entropy"].tolist() == [4.5, 5.5]
    StoreWriter({"a": (plain := FakeStore())}, chunk_rows=4, diagnostics=False).write(
        "val", rows_R, tokens_RxL, _step_out(8)
    )
    assert "entropy" not in plain.calls[0][2]


def test_non_finite_rows_write_nothing_but_padding_may_be_nan():
    store = FakeStore()
    writer = StoreWriter({"a": store}, chunk_rows=2, diagnostics=False)
    rows_R = np.array([0, 1, 2, -1])
    writer.write("train", rows_R, np.zeros((4, 3), int), _step_out(4, np.array([True, True, True, False])))
    assert len(store.calls) == 2
    with pytest.raises(CacheError, match="NaN/inf on train row 2;"):
        writer.write("train", rows_R, np.zeros((4, 3), int), _step_out(4, np.array([True, True, False, True])))
    assert len(store.calls) == 2


def test_background_write_errors_surface():
    with pytest.raises(OSError, match="disk full at row 0"):
        with StoreWriter({"a": FakeStore(fail=True)}, chunk_rows=2, diagnostics=False) as writer:
            writer.submit("train", np.array([0, 1]), np.zeros((2, 3), int), _step_out(2))
            writer.drain()
