"""Document masking: the segment ids and RoPE positions of packed rows, from their doc starts.

A token store row packs documents back to back (each + EOS); `doc_starts[r, i]` is 1 where a
document starts (store/tokens.py). With `context.document_masking: true` every model (the
teacher in the cache, the student and any online teacher in train / evaluate / compare) reads
a row as separate documents: position i attends to position m only if both are in the same
segment, and RoPE positions restart at 0 at each document start.

A row that begins mid-document (the document started in an earlier row; its doc_starts[r, 0]
is 0) gets segment 0 for that tail too, with positions counted from the row start: the model
never sees the earlier rows, so the tail is a document of its own as far as it can tell, and
RoPE scores depend only on position differences within a segment.

    >>> seg, pos = segments_and_positions(np.array([[0, 0, 1, 0, 0, 1]], np.uint8))
    >>> seg.tolist(), pos.tolist()
    ([[0, 0, 1, 1, 1, 2]], [[0, 1, 0, 1, 2, 0]])
"""

from __future__ import annotations

import numpy as np

# the batch keys the input pipeline adds when document masking is on
DOCUMENT_KEYS = ("segment_ids", "positions")


def segments_and_positions(starts_BxL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions), int32 [B, L] each, of rows with document starts `starts_BxL`
    (nonzero where a document starts). segment_ids count the starts before and at each position
    (0 for the first document, whether it starts at 0 or began in an earlier row); positions
    are the offset from the segment's first position in the row."""
    starts = np.asarray(starts_BxL).astype(bool)
    b, l = starts.shape
    first = starts.copy()
    first[:, 0] = True  # every row's first position opens a segment
    segment_ids = np.cumsum(first, axis=1, dtype=np.int32) - 1
    idx_L = np.arange(l, dtype=np.int32)
    opened_at = np.maximum.accumulate(np.where(first, idx_L, 0), axis=1)
    return segment_ids, (idx_L - opened_at).astype(np.int32)


def document_fields(store, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
    """{"segment_ids", "positions"} of rows `indices` of a token store's split."""
    seg, pos = segments_and_positions(store.read_doc_starts(split, indices))
    return {"segment_ids": seg, "positions": pos}


def store_setting(manifest: dict) -> bool:
    """A teacher store's document_masking (stores written before the setting existed: false)."""
    return bool(manifest.get("document_masking", False))
