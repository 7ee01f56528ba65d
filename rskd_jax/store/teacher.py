"""The teacher store: sparse teacher targets per (sequence, position), zarr3 via TensorStore.

Methods: `sample` (N draws with replacement: unique ids + exact integer counts, K = N slots),
`systematic` (N stratified draws, stored as `sample`), `head_tail` (exact top-h + N tail draws:
ids + weights, K = h + N), `sample_wor` (k ids + importance weights), `top_k` (k ids + probs), `ghost` (top-k + tail
mass), `full` (all V log-probs in float16, tiny runs only). Letters: S rows (sequences) of a
split, L positions per row, K slots per position, V vocabulary, b rows of a batch.

Layout (one store = one method; arrays per split; chunks of `chunk_rows` rows, so each
`write_rows` block owns its files and two processes never write the same one):

    manifest.json          the caller's manifest + kind "teacher", layout_version, layout
                           (its "provenance" section is informational, never compared)
    rank_to_id             int32 [V]: frequency rank -> id (only if id_frequencies was given)
    {split}/done           uint8 [S], chunks [chunk_rows]; set only after the row's data is durable
    {split}/num_ids        uint8|uint16 [S, L]: entries per position (n <= K)
    {split}/ids            uint16|uint32 [S, L*K]: entries packed per row (see below)
    {split}/counts         uint8|uint16 [S, L*K]  (sample, systematic)
    {split}/weights        float32 [S, L*K]        (sample / systematic at temperature != 1, others)
    {split}/tail_mass      float32 [S, L]          (ghost)
    {split}/gold_logprob   float16 [S, L]          (diagnostics: teacher log t(next token))
    {split}/entropy        float16 [S, L]          (diagnostics: teacher entropy, nats)
    {split}/logprobs       float16 [S, L, V]       (full)
    {split}/token_hash     uint64 [S], chunks [chunk_rows]  (if token_hash: `token_hash` of the
                           row's tokens as the teacher saw them, written with the row's data)

Entry encoding (the pure-numpy codec in store/entries.py; lossless, chosen by measurement:
tools/bench_store_codec.py): the entries of a position are sorted by frequency rank
(rank_to_id; identity if no table) and stored as gaps: the first as its rank, the next ones as
rank - previous rank - 1 (>= 0). Each row's positions are concatenated ("packed") at the front
of its L*K slots, the rest is 0; num_ids says where a position's entries start. Counts are
stored as c - 1, except the first entry of each position, stored as 0 and restored as N -
sum(others). Every array is a zarr3 shard of `chunk_rows` rows with one inner chunk per row (a
random row read decodes just that row), blosc(zstd, byte shuffle), then a crc32c of the chunk's
bytes (layout_version 2; every other chunk, `done`, `token_hash` and `rank_to_id` included,
carries one too): a flipped bit raises a StoreError naming the store, the array and the rows,
never decodes to other targets. Measured on real SmolLM2 draws at N = 50: stdlib source (11.8
unique ids per position) 20.1 B/token for ids + counts + num_ids = 1.70 B/entry; Python docs
(15.3 ids) 25.0 B/token = 1.64 B/entry; the float16 diagnostics add 4.2 B/token (raw int32: 400
B/token).

Token check: a store created with token_hash=True takes each block's `tokens` [b, L] in
write_rows and keeps token_hash(tokens) per row; read_rows returns it, so a reader (the
trainer) can check that a batch's tokens are the ones the teacher saw:
`token_hash(batch_tokens) == rows["token_hash"]` (~5 us per row of 512 tokens).

Reading returns entries in this canonical order (ascending rank; ascending id when there is
no table), empty slots last with id 0, weight 0, count 0. Weights for `sample` / `systematic` at
temperature 1 are counts / N (exact float32). A tempered one also stores the final float32 weights
(w = c/N * t/q) beside the exact counts.

    store = create_teacher_store("runs/teacher", manifest=m, num_rows={"train": 64, "val": 8},
                                 seq_len=512, method="sample", k=50, vocab_size=49152,
                                 chunk_rows=8, diagnostics=True, overwrite=False)
    store.write_rows("train", 0, {"ids": ids_BxLxK, "counts": c_BxLxK, "gold_logprob": g_BxL,
                                  "entropy": h_BxL}).result()   # + "tokens": tokens_BxL if token_hash
    batch = open_teacher_store("runs/teacher").read_rows("train", np.array([3, 0]))

Modules (this one re-exports their public names): store/teacher_layout.py (the arrays, their
chunks and codecs, the constants), store/entries.py (the entry codec), store/teacher_store.py
(`TeacherStore`: write, read, scan, stats), store/teacher_create.py (`create_teacher_store`,
`open_teacher_store`: the manifest checks).
"""

from rskd_jax.store.entries import token_hash as token_hash  # the store's public hash
from rskd_jax.store.teacher_create import create_teacher_store as create_teacher_store
from rskd_jax.store.teacher_create import open_teacher_store as open_teacher_store
from rskd_jax.store.teacher_layout import CHECKED_FROM as CHECKED_FROM
from rskd_jax.store.teacher_layout import CREATING as CREATING
from rskd_jax.store.teacher_layout import DEFAULT_COMPRESSION_LEVEL as DEFAULT_COMPRESSION_LEVEL
from rskd_jax.store.teacher_layout import DIAGNOSTICS as DIAGNOSTICS
from rskd_jax.store.teacher_layout import KIND as KIND
from rskd_jax.store.teacher_layout import LAYOUT_VERSION as LAYOUT_VERSION
from rskd_jax.store.teacher_layout import METHODS as METHODS
from rskd_jax.store.teacher_layout import PROVENANCE as PROVENANCE
from rskd_jax.store.teacher_store import TeacherStore as TeacherStore
