"""Tokenized shards -> packed rows, in a fixed order, with a resumable state.

`Packer` keeps one buffer per split: documents (each already + EOS) are appended, and every
full block of rows (`block_rows` x `seq_len` tokens, one zarr shard file) is handed to the
store writer at once; at the end the last partial block is written and the final partial
row dropped. Memory: at most one block per split plus one shard's documents.

`Mixer` decides which documents go in, in which order: the sources' shards in order, and
between sources a deterministic document-level interleave by weight (the next document comes
from the active source with the fewest tokens taken per unit of weight; ties go to the
earlier source), each source stopping at its token budget, everything at `max_tokens`.
A document's split comes from its content hash (computed by the tokenizer worker): "train"
or "val"; with named sources its val documents also go to "val_<name>".

Both pack their whole state into (JSON, {name: array}) for the checkpoint, so a killed run
continues from its last checkpoint and writes the same bytes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class Packer:
    """Per-split buffers of tokens and document starts; full blocks go to `write`."""

    def __init__(self, write, splits: tuple[str, ...], seq_len: int, block_rows: int):
        self.write, self.splits, self.seq_len, self.block_rows = write, splits, seq_len, block_rows
        self.rows_written = {s: 0 for s in splits}
        self._tokens: dict[str, list[np.ndarray]] = {s: [] for s in splits}
        self._starts: dict[str, list[np.ndarray]] = {s: [] for s in splits}
        self._size = {s: 0 for s in splits}
        self.flushed = 0  # blocks written since construction

    def add(self, split: str, tokens: np.ndarray, starts: np.ndarray) -> None:
        self._tokens[split].append(tokens)
        self._starts[split].append(starts)
        self._size[split] += tokens.size
        if self._size[split] >= self.block_rows * self.seq_len:
            self._flush(split, final=False)

    def _joined(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.concatenate(self._tokens[split]) if self._tokens[split] else np.zeros(0, np.int32)
        starts = np.concatenate(self._starts[split]) if self._starts[split] else np.zeros(0, np.uint8)
        return tokens, starts

    def _flush(self, split: str, *, final: bool) -> None:
        tokens, starts = self._joined(split)
        block = self.block_rows * self.seq_len
        n_blocks = tokens.size // block
        for b in range(n_blocks):
            lo = b * block
            self.write(
                split,
                self.rows_written[split],
                tokens[lo : lo + block].reshape(-1, self.seq_len),
                starts[lo : lo + block].reshape(-1, self.seq_len),
            )
            self.rows_written[split] += self.block_rows
            self.flushed += 1
        rest, rest_starts = tokens[n_blocks * block :], starts[n_blocks * block :]
        if final:
            rows = rest.size // self.seq_len  # the final partial row is dropped
            if rows:
                cut = rows * self.seq_len
                self.write(
                    split,
                    self.rows_written[split],
                    rest[:cut].reshape(rows, self.seq_len),
                    rest_starts[:cut].reshape(rows, self.seq_len),
                )
                self.rows_written[split] += rows
            rest, rest_starts = rest[:0], rest_starts[:0]
        self._tokens[split], self._starts[split] = [rest], [rest_starts]
        self._size[split] = rest.size

    def finish(self) -> dict[str, int]:
        """Writes what is left (whole rows); returns rows per split."""
        for s in self.splits:
            self._flush(s, final=True)
        return dict(self.rows_written)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {}
        for s in self.splits:
            arrays[f"tokens/{s}"], arrays[f"starts/{s}"] = self._joined(s)
        return {"rows_written": dict(self.rows_written)}, arrays

    def restore(self, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.rows_written = {s: int(state["rows_written"][s]) for s in self.splits}
        for s in self.splits:
            self._tokens[s], self._starts[s] = [arrays[f"tokens/{s}"]], [arrays[f"starts/{s}"]]
            self._size[s] = arrays[f"tokens/{s}"].size


@dataclasses.dataclass(frozen=True)
class Source:
    name: str | None  # None: plain `data.inputs` (no val_<name> split)
    first: int  # its shards are global shard indices [first, first + count)
    count: int
    weight: float = 1.0
    max_tokens: int | None = None


@dataclasses.dataclass
class ShardDocs:
    """One tokenized shard: documents in file order, each + EOS (and BOS if asked)."""

    tokens: np.ndarray  # int32 [T], all documents concatenated
    lengths: np.ndarray  # int64 [D]
    val: np.ndarray  # bool [D], the content-hash split
    stats: dict[str, Any]  # skipped {reason: n}, examples [...], input index

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)])


class Mixer:
    """Chooses documents from the sources' shards in a fixed order and feeds the packer."""

    def __init__(self, sources: list[Source], packer: Packer, *, max_tokens: int | None):
        self.sources, self.packer, self.max_tokens = sources, packer, max_tokens
        n = len(sources)
        self.shard = [0] * n  # next shard (within the source) to take documents from
        self.doc = [0] * n  # next document within that shard
        self.taken = [0] * n  # tokens taken per source
        self.documents = [{"train": 0, "val": 0} for _ in range(n)]
        self.skipped: dict[str, int] = {}
        self.examples: list[str] = []
        self.input_documents: dict[str, int] = {}  # input index -> documents read (before the cap)
        self.total = 0

    # ---- which shard is needed next
    def active(self) -> list[int]:
        out = []
        for i, s in enumerate(self.sources):
            if self.shard[i] >= s.count or (s.max_tokens is not None and self.taken[i] >= s.max_tokens):
                continue
            out.append(i)
        return [] if self.max_tokens is not None and self.total >= self.max_tokens else out

    def next_source(self) -> int | None:
        active = self.active()
        return min(active, key=lambda i: (self.taken[i] / self.sources[i].weight, i)) if active else None

    def needed(self, i: int) -> int:
        """The global shard index source `i` takes its next document from."""
        return self.sources[i].first + self.shard[i]

    def consumed_below(self) -> list[int]:
        """Per source: global shard indices below this are fully taken."""
        return [s.first + self.shard[i] for i, s in enumerate(self.sources)]

    # ---- taking documents
    def take(self, i: int, docs: ShardDocs) -> None:
        """Takes the run of documents of source `i`'s current shard (`docs`) that the
        interleave gives it before another source is due; moves to the next shard at its end."""
        s = self.sources[i]
        if self.doc[i] == 0:  # first visit of this shard: its read statistics
            self._count_stats(docs.stats, int(docs.lengths.size))
        lo, n = self.doc[i], docs.lengths.size
        offsets = docs.offsets
        cum = offsets[lo + 1 :] - offsets[lo]  # tokens taken after each further document
        k = n - lo
        others = [j for j in self.active() if j != i]
        if others and k:
            j = min(others, key=lambda j: (self.taken[j] / self.sources[j].weight, j))
            rival = self.taken[j] / self.sources[j].weight
            ratio = (self.taken[i] + cum) / s.weight
            still = (ratio < rival) | ((ratio == rival) & (i < j))  # i stays first after the doc
            k = min(k, 1 + int(np.argmin(still)) if not still.all() else k)
        lengths = docs.lengths[lo : lo + k].copy()
        budgets = [
            b
            for b in (
                None if s.max_tokens is None else s.max_tokens - self.taken[i],
                None if self.max_tokens is None else self.max_tokens - self.total,
            )
            if b is not None
        ]
        if budgets:  # cut at the first budget reached, the last document truncated
            cum = np.cumsum(lengths)
            over = np.nonzero(cum >= min(budgets))[0]
            if over.size:
                k = int(over[0]) + 1
                lengths = lengths[:k]
                lengths[-1] -= int(cum[k - 1] - min(budgets))
        val = docs.val[lo : lo + k]
        # only the last document can be truncated, so the taken tokens are one prefix
        tokens = docs.tokens[offsets[lo] : offsets[lo] + int(lengths.sum())]
        self._pack(i, tokens, lengths, val)
        self.taken[i] += int(lengths.sum())
        self.total += int(lengths.sum())
        self.doc[i] = lo + k
        if self.doc[i] >= n:
            self.shard[i] += 1
            self.doc[i] = 0

    def skip_empty(self, i: int, docs: ShardDocs) -> None:
        """A shard without documents: count its statistics and move on."""
        self._count_stats(docs.stats, 0)
        self.shard[i] += 1
        self.doc[i] = 0

    def _count_stats(self, stats: dict[str, Any], documents: int) -> None:
        for reason, count in stats["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.examples += stats["examples"][: max(0, 5 - len(self.examples))]
        key = str(stats["input"])
        self.input_documents[key] = self.input_documents.get(key, 0) + documents

    def _pack(self, i: int, tokens: np.ndarray, lengths: np.ndarray, val: np.ndarray) -> None:
        if not lengths.size:
            return
        starts = np.zeros(tokens.size, np.uint8)
        starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = 1
        is_val = np.repeat(val, lengths)  # PERF: one byte per token, not an index array
        self.documents[i]["val"] += int(val.sum())
        self.documents[i]["train"] += int((~val).sum())
        name = self.sources[i].name
        for split, mask in (("train", ~is_val), ("val", is_val)):
            if mask.any():
                self.packer.add(split, tokens[mask], starts[mask])
                if split == "val" and name is not None:
                    self.packer.add(f"val_{name}", tokens[mask], starts[mask])

    # ---- checkpoint
    def state(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "doc": self.doc,
            "taken": self.taken,
            "documents": self.documents,
            "skipped": self.skipped,
            "examples": self.examples,
            "input_documents": self.input_documents,
            "total": self.total,
        }

    def restore(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
