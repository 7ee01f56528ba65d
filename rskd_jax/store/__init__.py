"""Token and teacher stores (TensorStore zarr3): the only place that knows their layouts.

Readers need numpy and tensorstore only (no jax, flax, optax, orbax or grain):
`open_token_store(url).read(split, idx)`, `open_teacher_store(url).read_rows(split, idx)`
(dense slots) or `.read_rows_as(split, idx, "trimmed" | "ragged")` (store/forms.py). The grain
data source joining both lives in store/grain_source.py (the one module importing grain).
"""

from rskd_jax.store.teacher import open_teacher_store, token_hash  # noqa: F401
from rskd_jax.store.tokens import open_token_store  # noqa: F401
