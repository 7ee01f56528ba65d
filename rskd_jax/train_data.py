"""The input pipeline: stores -> checked row sources -> grain batches, for train and evaluate.

One row-source type, `Rows`: a token-store split, optionally joined with the same rows of a
teacher store, read with one batched read per batch. `make_batch_iterator` shuffles row
indices per epoch with grain, cuts global batches, gives each process its slice and reads
it; its iterator's `get_state()` / `set_state()` resume exactly.

    it = make_batch_iterator(Rows(open_token_store(path), "train"), global_batch_size=8, seed=0)
    batch = next(it)        # {"tokens": int32 [8, L], "index": int64 [8]}

Cached teacher targets depend on the exact context, so the student must see exactly the
sequences the teacher saw. The teacher store's manifest records the token store it was
computed from (content fingerprint, seq_len) and the tokenizer; `check_stores` refuses any
mismatch with a message naming both values, and stores made by the cache carry a per-row
token hash that `Rows.read` checks on every batch (`check_token_hash`). With document
masking (`context.document_masking`) each batch also carries the rows' segment ids and RoPE
positions (rskd_jax.documents), and a teacher store cached with the other setting is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from rskd_jax.corpus import DataError  # one error type for bad data arguments
from rskd_jax.documents import DOCUMENT_KEYS, document_fields, store_setting
from rskd_jax.methods import BATCH_KEYS, STORE_LOSSES
from rskd_jax.store.common import StoreError

log = logging.getLogger("rskd_jax.train")


class DataMismatch(StoreError):
    """The token store, teacher store and student do not belong together."""


def _get(manifest: dict, *keys: str) -> Any:
    for k in keys:
        manifest = manifest.get(k) if isinstance(manifest, dict) else None
    return manifest


def tokenizer_vocab(tokens) -> int:
    vocab = _get(tokens.manifest, "tokenizer", "vocab_size")
    if not isinstance(vocab, int):
        raise StoreError(f"token store {tokens.url} has no tokenizer.vocab_size in its manifest")
    return vocab


def check_stores(tokens, teacher, *, student_vocab: int, method: str | None, document_masking: bool = False) -> None:
    """Refuses a token store / teacher store / student / loss / document-masking combination
    that cannot work."""
    vocab = tokenizer_vocab(tokens)
    if student_vocab < vocab:
        raise DataMismatch(
            f"student vocab_size {student_vocab} is smaller than the tokenizer's "
            f"{vocab} (token store {tokens.url}); set student.vocab_size >= {vocab}"
        )
    if teacher is None:
        return
    theirs = store_setting(teacher.manifest)
    if theirs != document_masking:
        raise DataMismatch(
            f"teacher store {teacher.url} was cached with context.document_masking={str(theirs).lower()}, "
            f"this run has context.document_masking={str(document_masking).lower()}: its targets were "
            "computed on other attention contexts than the student would see. Set "
            f"context.document_masking={str(theirs).lower()}, or re-run `python -m rskd_jax.cache` with "
            f"context.document_masking={str(document_masking).lower()}."
        )
    pairs = [
        ("token-store fingerprint", _get(teacher.manifest, "tokens", "fingerprint"), tokens.fingerprint),
        ("seq_len", teacher.seq_len, tokens.seq_len),
        (
            "tokenizer fingerprint",
            _get(teacher.manifest, "tokenizer", "fingerprint"),
            _get(tokens.manifest, "tokenizer", "fingerprint"),
        ),
        ("tokenizer vocab_size", teacher.vocab_size, vocab),
    ]
    for what, theirs, ours in pairs:
        if theirs != ours:
            raise DataMismatch(
                f"teacher store {teacher.url} was computed for {what} {theirs!r}, but the token "
                f"store {tokens.url} has {ours!r}: the targets would not belong to these "
                "sequences. Re-run `python -m rskd_jax.cache` on this token store, or point "
                "train.tokens at the store the cache was made from."
            )
    if method is not None and method not in ("ce", "full_online"):
        allowed = STORE_LOSSES.get(teacher.method, ())
        if method not in allowed:
            raise DataMismatch(
                f"loss.method={method!r} cannot train from a {teacher.method!r} "
                f"teacher store ({teacher.url}); it supports {list(allowed)}"
            )


class Rows:
    """The row source: selected fields of a token-store split, optionally joined with the
    same rows of a teacher-store split, limited to the first `num_rows` rows.

    `read(indices)` -> {"tokens": int32 [b, L], "index": int64 [b], *fields}, and with
    `documents` the rows' "segment_ids" and "positions" (int32 [b, L], rskd_jax.documents).
    """

    def __init__(
        self,
        tokens,
        split: str,
        teacher=None,
        fields: Sequence[str] = (),
        num_rows: int | None = None,
        documents: bool = False,
    ):
        self.tokens, self.teacher, self.split, self.fields = tokens, teacher, split, tuple(fields)
        self.num_rows = tokens.num_rows(split) if num_rows is None else num_rows
        self.documents = documents

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        out = {"tokens": self.tokens.read(self.split, idx), "index": idx}
        if self.documents:
            out.update(document_fields(self.tokens, self.split, idx))
        if self.teacher is not None and self.fields:
            rows = self.teacher.read_rows(self.split, idx)
            if "token_hash" in rows:  # the teacher saw exactly these tokens (stores made by the cache)
                check_token_hash(out["tokens"], rows["token_hash"], idx, self.split, self.teacher.url)
            out.update({k: rows[k] for k in self.fields})
        return out


def check_token_hash(tokens_BxL: np.ndarray, hash_B: np.ndarray, rows_B: np.ndarray, split: str, where: str) -> None:
    """Refuses a batch whose tokens are not the ones the teacher's targets were computed on."""
    from rskd_jax.store.teacher import token_hash

    bad = np.nonzero(token_hash(tokens_BxL) != hash_B)[0]
    if bad.size:
        raise DataMismatch(
            f"{split} row {int(rows_B[bad[0]])}: its tokens differ from the ones the teacher store "
            f"{where} was computed on ({bad.size} of {len(rows_B)} rows in this batch); the token "
            "store was changed after caching. Re-run the data and cache programs"
        )


def split_rows(tokens, teacher, split: str, fields: Sequence[str], documents: bool = False) -> Rows:
    """The rows of `split` both stores hold (all teacher rows must be done); `documents`: each
    batch carries segment ids and positions (document masking)."""
    n = tokens.num_rows(split)
    if documents:
        tokens.read_doc_starts(split, np.zeros(0, np.int64))  # a store without doc_starts: the fix
    if teacher is None or not fields:
        return Rows(tokens, split, None, (), n, documents)
    if split not in teacher.splits:
        raise DataMismatch(
            f"teacher store {teacher.url} has no {split!r} split "
            f"(it has {list(teacher.splits)}); cache that split first"
        )
    nt = teacher.num_rows(split)
    done = teacher.done_mask(split)
    if not done.all():
        raise DataMismatch(
            f"teacher store {teacher.url}: only {int(done.sum())} of {nt} {split} "
            "rows are done; finish `python -m rskd_jax.cache` (it resumes) first"
        )
    if nt > n:
        raise DataMismatch(
            f"teacher store {teacher.url} has {nt} {split} rows, the token store "
            f"{tokens.url} only {n}: they do not belong together"
        )
    if nt < n:
        log.warning(
            "teacher store %s covers %d of the %d %s rows (cache.max_rows); using those", teacher.url, nt, n, split
        )
    return Rows(tokens, split, teacher, fields, nt, documents)


def teacher_fields(store) -> tuple[str, ...]:
    """What a teacher store contributes to evaluation: log-probs (exact KL, agreement), or
    ids, weights and entropy (estimated KL); nothing without the entropy diagnostics."""
    if store is None:
        return ()
    if store.method == "full":
        return ("logprobs",)
    if store.layout.get("diagnostics"):
        return ("ids", "weights", "entropy")
    log.warning("teacher store %s has no entropy diagnostics: no KL estimate", store.url)
    return ()


class RunRows(NamedTuple):
    """The row sources of a train run and the teacher fields each batch carries."""

    train: Rows
    val: Rows | None
    fields: tuple[str, ...]
    eval_fields: tuple[str, ...]


def run_rows(tokens, store, *, method: str, student_vocab: int, document_masking: bool = False) -> RunRows:
    """Checks the stores against each other, the student, the loss and the document masking;
    the train rows (with the loss's teacher fields) and the val rows (with what evaluation
    can use), both with segment ids and positions under document masking."""
    fields = BATCH_KEYS[method]
    if fields and store is None:
        raise DataMismatch(f"loss.method={method!r} trains from a teacher store: set train.teacher_store")
    check_stores(tokens, store, student_vocab=student_vocab, method=method, document_masking=document_masking)
    train = split_rows(tokens, store, "train", fields, document_masking)
    if "val" not in tokens.splits or tokens.num_rows("val") == 0:
        log.warning("token store %s has no val rows: no evaluation", tokens.url)
        return RunRows(train, None, fields, ())
    eval_fields = teacher_fields(store)
    if eval_fields and "val" not in store.splits:
        log.warning("teacher store %s has no val split: evaluation without KL", store.url)
        eval_fields = ()
    return RunRows(train, split_rows(tokens, store, "val", eval_fields, document_masking), fields, eval_fields)


def epoch_rows(tokens, first, others: Sequence, *, fields: Sequence[str], document_masking: bool = False) -> list[Rows]:
    """The train rows of each further epoch store (train.epoch_stores): the same tokens, teacher,
    method and parameters as `first`, the draw stream or seed aside (a store identical to
    `first` in those too holds the same draws: a warning)."""
    out = []
    for other in others:
        check_stores(
            tokens, other, student_vocab=tokenizer_vocab(tokens), method=None, document_masking=document_masking
        )
        mine, theirs = (
            {
                "method": m.get("method"),
                "sampler": m.get("sampler"),
                "teacher": _get(m, "teacher", "fingerprint"),
                "params": {k: v for k, v in (m.get("params") or {}).items() if k != "stream"},
            }
            for m in (first.manifest, other.manifest)
        )
        off = sorted(k for k in mine if mine[k] != theirs[k])
        if off:
            raise DataMismatch(
                f"epoch store {other.url} differs from train.teacher_store {first.url} in {', '.join(off)}: "
                "every epoch store must hold the same teacher's targets of the same kind (another draw stream "
                "or seed only)"
            )
        same = (other.manifest.get("seed"), (other.manifest.get("params") or {}).get("stream", 0)) == (
            first.manifest.get("seed"),
            (first.manifest.get("params") or {}).get("stream", 0),
        )
        if same:
            log.warning(
                "epoch store %s has the seed and stream of %s: the same draws, not fresh ones", other.url, first.url
            )
        out.append(split_rows(tokens, other, "train", fields, document_masking))
    return out


def host_batch(batch: dict[str, np.ndarray], fields: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays the step reads: tokens, mask (rows padded with index -1 are masked), the
    document fields when the rows carry them (segment_ids, positions), fields."""
    tokens = np.asarray(batch["tokens"], np.int32)
    valid = np.asarray(batch["index"]) >= 0
    out = {"tokens": tokens, "mask": np.broadcast_to(valid[:, None], tokens.shape).astype(np.int32)}
    out.update({k: np.asarray(batch[k], np.int32) for k in DOCUMENT_KEYS if k in batch})
    for k in fields:
        out[k] = batch[k]
    return out


# ----------------------------------------------------------------------------- batches


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """Rows per process; a fix-it error when the global batch does not split evenly."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(
            f"global_batch_size {global_batch_size} is not a positive multiple of the "
            f"process count ({process_count}); set batch_size to a multiple of {process_count}"
        )
    return global_batch_size // process_count


def _read_local(idx_B: np.ndarray, *, source: Rows, global_batch_size: int, lo: int, hi: int):
    """Pads a short final global batch with index -1, takes rows [lo, hi) and reads them."""
    full = np.full(global_batch_size, -1, np.int64)
    full[: len(idx_B)] = idx_B
    local = full[lo:hi]
    valid = local >= 0  # padding is a suffix
    batch = dict(source.read(local[valid]))
    if not valid.all():
        b = hi - lo
        for key, value in batch.items():
            padded = np.zeros((b,) + value.shape[1:], value.dtype)
            padded[: len(value)] = value
            batch[key] = padded
    batch["index"] = local
    return batch


def make_batch_iterator(
    source: Rows | Sequence[Rows],
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
    num_threads: int = 2,
    prefetch: int = 2,
):
    """Batches of rows for this process, as a checkpointable `grain.DatasetIterator`.

    Each epoch is a fresh permutation of row indices (seeded by `seed` and the epoch);
    global batches are cut within an epoch; process p gets rows [p*b, (p+1)*b) of each global
    batch (b = global_batch_size / process_count) and reads them with one `source.read`.
    `num_epochs=None` repeats forever. Several sources (the same rows with other teacher
    targets, e.g. fresh draws per epoch): epoch e reads source[e mod len(source)].
    With `drop_remainder=False` the last global batch of
    an epoch is padded to full size with rows whose "index" is -1 (zeros elsewhere), so
    every batch has a static shape; mask on `index >= 0`.
    `it.get_state()` / `it.set_state(state)` resume exactly (a dict; store it as JSON).
    """
    import grain

    sources = [source] if isinstance(source, Rows) else list(source)
    if not sources or len({s.num_rows for s in sources}) != 1:
        raise DataError(f"the sources per epoch must hold the same rows, got {[s.num_rows for s in sources]} rows")
    b = local_batch_size(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside [0, {process_count})")
    n = sources[0].num_rows
    if n == 0 or (drop_remainder and n < global_batch_size):
        raise DataError(
            f"the source has {n} rows, fewer than one global batch of {global_batch_size}; "
            "lower the batch size or add data"
        )
    ds = grain.MapDataset.range(n)
    if shuffle:
        if not 0 <= seed < 2**32:
            raise DataError(f"seed must be in [0, 2**32), got {seed}")
        ds = ds.shuffle(seed=seed)
    ds = ds.batch(global_batch_size, drop_remainder=drop_remainder)  # within each epoch
    per_epoch = len(ds)
    ds = ds.repeat(num_epochs)
    lo = process_index * b
    ds = ds.map_with_index(
        lambda i, idx: _read_local(
            np.asarray(idx, np.int64),
            source=sources[(i // per_epoch) % len(sources)],
            global_batch_size=global_batch_size,
            lo=lo,
            hi=lo + b,
        )
    )
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def steps_per_epoch(num_rows: int, global_batch_size: int, drop_remainder: bool = True) -> int:
    return num_rows // global_batch_size if drop_remainder else -(-num_rows // global_batch_size)


def eval_batch_iterator(source: Rows, *, global_batch_size: int):
    """One ordered pass over `source` (no shuffle, last batch kept) for this process: the
    evaluation pass the train and evaluate programs share."""
    import jax

    return make_batch_iterator(
        source,
        global_batch_size=global_batch_size,
        seed=0,
        shuffle=False,
        num_epochs=1,
        drop_remainder=False,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
