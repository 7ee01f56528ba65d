"""Test helpers: tiny token and teacher stores written through the store APIs (as users would).

`tokenizer(vocab)` is the fake tokenizer record the stores' manifests carry; `unique_counts`
turns N draws per position into what a `sample` store takes (unique ids + counts). The forms
stores (`write_forms_stores`: a token store and a `sample` teacher store with token hashes,
1..K unique ids per position) serve test_store_forms.py and test_examples.py.
"""

import numpy as np

from rskd_jax.store.teacher import create_teacher_store
from rskd_jax.store.tokens import write_token_store

VOCAB, L, K, ROWS = 60, 32, 16, 24  # the forms stores


def tokenizer(vocab: int) -> dict:
    return {"spec": "test", "fingerprint": "test-tokenizer", "vocab_size": vocab, "eos_id": 0, "bos_id": None}


def unique_counts(draws_BxLxN: np.ndarray, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """(ids, counts) [B, L, N]: each position's distinct drawn ids (ascending) at the front of its
    N slots with their counts; empty slots hold id 0, count 0."""
    b, length, n = draws_BxLxN.shape
    ids, counts = np.zeros((b, length, n), dtype), np.zeros((b, length, n), dtype)
    for i, j in np.ndindex(b, length):
        u, c = np.unique(draws_BxLxN[i, j], return_counts=True)
        ids[i, j, : len(u)], counts[i, j, : len(u)] = u, c
    return ids, counts


def make_tokens(url, seed):
    """A token store of ROWS random train rows; returns (splits, its manifest)."""
    rng = np.random.default_rng(seed)
    splits = {"train": rng.integers(0, VOCAB, (ROWS, L)).astype(np.int32)}
    return splits, write_token_store(url, splits, {"tokenizer": tokenizer(VOCAB)})


def make_teacher(url, manifest_tokens, hashed_tokens, seed=0):
    """A `sample` store (N = K draws) from peaked random teachers: 1..K unique ids per position."""
    rng = np.random.default_rng(seed)
    manifest = {
        "tokens": {"fingerprint": manifest_tokens["content_hash"], "seq_len": L},
        "tokenizer": tokenizer(VOCAB),
        "teacher": {"fingerprint": "test", "vocab_size": VOCAB},
    }
    store = create_teacher_store(
        url,
        manifest=manifest,
        num_rows={"train": ROWS},
        seq_len=L,
        method="sample",
        k=K,
        vocab_size=VOCAB,
        chunk_rows=8,
        diagnostics=False,
        token_hash=True,
    )
    draws = np.zeros((ROWS, L, K), np.int64)
    for i, j in np.ndindex(ROWS, L):
        p = np.exp(rng.normal(size=VOCAB) * rng.uniform(1.5, 5.0))
        draws[i, j] = rng.choice(VOCAB, K, p=p / p.sum())
    ids, counts = unique_counts(draws)
    store.write_rows("train", 0, {"ids": ids, "counts": counts, "tokens": hashed_tokens}).result()
    store.close()


def write_forms_stores(root) -> tuple[str, str]:
    """The forms stores under `root` (a pathlib.Path): (token store URL, teacher store URL)."""
    splits, manifest = make_tokens(str(root / "tokens"), 0)
    make_teacher(str(root / "teacher"), manifest, splits["train"])
    return str(root / "tokens"), str(root / "teacher")
