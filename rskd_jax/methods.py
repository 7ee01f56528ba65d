"""The method tables, defined once (no dependencies: the config sections, the teacher store, the
input pipeline and the train step all import them from here).

>>> sorted(STORE_LOSSES) == sorted(STORE_METHODS), sorted(BATCH_KEYS) == sorted(LOSS_METHODS)
(True, True)
"""

# What a teacher store holds (`cache.outputs[].method`, `store.teacher.create_teacher_store`).
STORE_METHODS = ("sample", "systematic", "head_tail", "sample_wor", "top_k", "ghost", "full")
# store methods whose entries carry exact integer counts summing to N = K per position
COUNT_METHODS = ("sample", "systematic")
# The KD term of a train run (`loss.method`).
LOSS_METHODS = ("ce", "sparse", "ghost", "full_online", "full_cached")
# teacher-store method -> the loss methods that can train from it
STORE_LOSSES = {
    "sample": ("sparse",),
    "systematic": ("sparse",),
    "head_tail": ("sparse",),
    "sample_wor": ("sparse",),
    "top_k": ("sparse",),
    "ghost": ("ghost", "sparse"),
    "full": ("full_cached",),
}
# loss method -> the batch fields it reads from the teacher store
BATCH_KEYS = {
    "ce": (),
    "sparse": ("ids", "weights"),
    "ghost": ("ids", "weights", "tail_mass"),
    "full_cached": ("logprobs",),
    "full_online": (),
}
