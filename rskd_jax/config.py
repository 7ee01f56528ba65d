"""Program sections: the frozen dataclasses each program's config is made of.

Every program (`python -m rskd_jax.data|cache|train|evaluate`) has one root dataclass here
(`DataRun`, `CacheRun`, `TrainRun`, `EvaluateRun`) whose fields are sections named after
programs, so one YAML layout serves all of them:

    data:                       # python -m rskd_jax.data --config configs/tiny/data.yaml
      inputs: ["@stdlib"]
      seq_len: 128

The machinery (YAML loading, dotted `key=value` overrides, strict checks, `--help`) is
rskd_jax/configlib.py; its public names are re-exported here, so

    from rskd_jax.config import DataRun, load_config
    cfg = load_config(DataRun, "configs/tiny/data.yaml", ["data.seq_len=256"])
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from rskd_jax.configlib import ConfigError as ConfigError
from rskd_jax.configlib import config_from_dict as config_from_dict
from rskd_jax.configlib import config_to_dict as config_to_dict
from rskd_jax.configlib import load_config as load_config
from rskd_jax.configlib import opt as opt
from rskd_jax.configlib import parse_cli as parse_cli
from rskd_jax.configlib import save_config as save_config
from rskd_jax.corpus import CORPUS_EXTENSIONS, TEXT_EXTENSIONS
from rskd_jax.methods import LOSS_METHODS, STORE_METHODS

# models.attention.ATTENTION_KINDS (that module imports jax; tests/test_attention.py checks they agree)
ATTENTION_KINDS = ("auto", "xla", "cudnn", "splash", "chunked")

# ----------------------------------------------------------------------------- program configs


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One named source of a mixture (`data.sources`)."""

    name: str = opt("main", "the source's name: its val split is val_<name>")
    inputs: tuple[str, ...] = opt((), "files, dirs and globs, as data.inputs")
    exclude: tuple[str, ...] = opt((), "fnmatch patterns; matching file paths are skipped")
    weight: float | None = opt(None, "share of the interleave (default: max_tokens if given, else 1)")
    max_tokens: int | None = opt(None, "token budget of this source (default: all of it)")

    def __post_init__(self):
        if not self.name or not all(ch.isalnum() or ch in "_-." for ch in self.name):
            raise ConfigError(f"data.sources: name {self.name!r} must be letters, digits, '_', '-' or '.'")
        if not self.inputs:
            raise ConfigError(f"data.sources[{self.name}].inputs is empty")
        if self.weight is not None and not self.weight > 0:
            raise ConfigError(f"data.sources[{self.name}].weight must be > 0, got {self.weight}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"data.sources[{self.name}].max_tokens must be >= 1, got {self.max_tokens}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`python -m rskd_jax.data`: text files, JSONL, Parquet, Arrow -> token store."""

    inputs: tuple[str, ...] = opt(
        ("@stdlib",),
        "files, dirs (walked recursively) and globs; '@stdlib' is the CPython "
        "standard library source of the running interpreter without its test dirs",
    )
    extensions: tuple[str, ...] = opt(
        TEXT_EXTENSIONS + CORPUS_EXTENSIONS,
        "file suffixes kept when walking a directory",
    )
    exclude: tuple[str, ...] = opt((), "fnmatch patterns; matching file paths are skipped")
    sources: tuple[SourceConfig, ...] = opt(
        (), "named sources mixed at document level (replaces data.inputs); val_<name> per source"
    )
    text_key: str = opt("text", "JSONL field / Parquet and Arrow column holding the text")
    seq_len: int = opt(512, "tokens per stored sequence (row)")
    output: str = opt("runs/tokens", "token store: local path or TensorStore kvstore URL")
    tokenizer: str = opt("smollm2", "'smollm2', or a path to a tokenizer.json or a .gguf file")
    add_bos: bool | Literal["auto"] = opt(
        "auto", "BOS before each document: auto (the tokenizer's own setting), true or false"
    )
    val_fraction: float = opt(0.05, "share of documents (by content hash) in the val split")
    max_tokens: int | None = opt(None, "stop after about this many tokens (for small slices)")
    workers: int | None = opt(
        None, "tokenizer processes (default: one per core, none below 4 MB of input; 0: in this process)"
    )
    shard_records: int = opt(
        10000, "JSONL lines / Arrow rows (at most text files) per shard, the unit of work and resume"
    )
    batch_files: int = opt(256, "documents per tokenizer call")
    checkpoint_seconds: float = opt(10.0, "seconds between checkpoints of the packing state")
    overwrite: bool = opt(False, "replace an existing store that holds different data")

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ConfigError(f"data.max_tokens ({self.max_tokens}) must be >= data.seq_len ({self.seq_len})")
        if not self.inputs and not self.sources:
            raise ConfigError("data.inputs is empty; give files, dirs or globs, or '@stdlib'")
        if self.batch_files < 1:
            raise ConfigError(f"data.batch_files must be >= 1, got {self.batch_files}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0 (0: tokenize in this process), got {self.workers}")
        if self.shard_records < 1:
            raise ConfigError(f"data.shard_records must be >= 1, got {self.shard_records}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names must be unique, got {names}")


# ----------------------------------------------------------------------------- shared sections


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp", "tensor"); -1 on one axis takes all remaining devices."""

    data: int = opt(-1, "data-parallel axis (batch split, params replicated)")
    fsdp: int = opt(1, "batch split and params/optimizer state sharded along 'embed'")
    tensor: int = opt(1, "model-parallel axis: heads, MLP units, vocabulary")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process (multi-host) set-up: `jax.distributed.initialize` when enabled.

    On Cloud TPU VMs and SLURM/Kubernetes GPU clusters JAX finds the coordinator itself:
    set `enabled: true` and leave the rest empty. Elsewhere give all three values (the same
    coordinator_address on every process, process_id 0..num_processes-1).
    """

    enabled: bool = opt(False, "call jax.distributed.initialize before anything else")
    coordinator_address: str | None = opt(None, "host:port of process 0")
    num_processes: int | None = opt(None, "number of processes")
    process_id: int | None = opt(None, "this process's index")


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """How a packed row is shown to every model: the teacher in the cache, the student and any
    online teacher in train / evaluate / compare. One section shared by those programs, so one
    key sets all of them; the cache records it in each teacher store's manifest, and train and
    evaluate refuse a store written with the other value (rskd_jax.documents)."""

    document_masking: bool = opt(
        False,
        "attend only within a document (segment ids from the token store's doc_starts) and "
        "restart RoPE positions at 0 at each document start",
    )


@dataclasses.dataclass(frozen=True)
class DataRun:
    """Root config of `python -m rskd_jax.data`."""

    data: DataConfig = opt(DataConfig())
    distributed: DistributedConfig = opt(DistributedConfig())


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and, for `source: random`, its architecture.

    Every key but `source` and `seed` is a LlamaConfig field of the same name (kept flat, so
    the YAML keys stay; `model_spec.build_model` passes them through, tests/test_model_spec.py
    checks they agree). Not imported from models: this module must not pull in jax.
    """

    source: str = opt("random", "'smollm2', a .gguf file, an HF directory, or 'random'")
    dtype: str = opt("float32", "compute dtype: float32 or bfloat16")
    param_dtype: str = opt("float32", "parameter dtype: float32 or bfloat16")
    remat: bool = opt(False, "recompute each layer's activations in the backward pass")
    attention: str = opt(
        "auto",
        "attention implementation: auto (cudnn on GPU in bf16/fp16, splash on TPU, chunked on CPU), xla, "
        "cudnn, splash or chunked; a path that cannot run falls back with a logged reason",
    )
    seed: int = opt(0, "random init seed (source: random)")
    vocab_size: int | None = opt(None, "random: vocabulary (default: the tokenizer's)")
    hidden_size: int = opt(64, "random: model width D")
    intermediate_size: int = opt(192, "random: MLP width F")
    num_layers: int = opt(2, "random: decoder layers")
    num_heads: int = opt(4, "random: query heads")
    num_kv_heads: int = opt(2, "random: key/value heads (GQA)")
    head_dim: int | None = opt(None, "random: head dim (default hidden_size / num_heads)")
    rope_theta: float = opt(10000.0, "random: RoPE base")
    tie_embeddings: bool = opt(True, "random: share the embedding and the LM head")
    max_position_embeddings: int = opt(2048, "random: longest sequence")

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ConfigError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")


# ----------------------------------------------------------------------------- cache


METHODS = STORE_METHODS


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """One teacher store written by the cache pass (several share one teacher forward)."""

    name: str = opt("rskd_n50", "store name: written to <cache.output>/<name>")
    method: Literal[STORE_METHODS] = opt(
        "sample",
        "sample (with replacement, counts), systematic (stratified, counts), head_tail (exact "
        "top-h + sampled tail), sample_wor (Gumbel-top-k), top_k, ghost, full",
    )
    num_draws: int = opt(
        50, "sample / systematic: draws N; head_tail: tail draws N; sample_wor / top_k / ghost: ids kept k"
    )
    head: int = opt(0, "head_tail only (>= 1): ids h kept exactly; the store holds K = h + N slots")
    temperature: float = opt(
        1.0, "proposal temperature (sample, systematic, head_tail's tail, sample_wor); targets stay unbiased"
    )
    normalize: bool = opt(False, "sample_wor: self-normalised weights (consistent, biased)")
    renormalize: bool = opt(True, "top_k: divide the kept probabilities by their sum")
    stream: int = opt(
        0,
        "draw stream: outputs that differ only in stream draw independently (each position's key "
        "is folded with the stream when > 0), e.g. fresh samples per epoch from one teacher pass",
    )

    def __post_init__(self):
        if not 0 <= self.stream < 2**32:
            raise ConfigError(f"outputs[{self.name}].stream must be in [0, 2**32), got {self.stream}")
        if self.stream and self.method in ("top_k", "ghost", "full"):
            raise ConfigError(f"outputs[{self.name}]: stream applies to sampled stores, not {self.method!r}")
        if self.num_draws < 1:
            raise ConfigError(f"outputs[{self.name}].num_draws must be >= 1, got {self.num_draws}")
        if not self.temperature > 0:
            raise ConfigError(f"outputs[{self.name}].temperature must be > 0, got {self.temperature}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"output name {self.name!r} must be a non-empty name without '/'")
        if self.method == "head_tail" and self.head < 1:
            raise ConfigError(f"outputs[{self.name}]: method head_tail needs head >= 1, got {self.head}")
        if self.method != "head_tail" and self.head != 0:
            raise ConfigError(f"outputs[{self.name}]: head applies to method head_tail only, not {self.method!r}")

    def slots(self, vocab_size: int) -> int:
        """K, the entries per position of this output's store: N (h + N for head_tail; V for
        full). ConfigError if head_tail's h + N exceeds the vocabulary."""
        if self.method == "full":
            return vocab_size
        if self.method == "head_tail" and self.head + self.num_draws > vocab_size:
            raise ConfigError(
                f"outputs[{self.name}]: head + num_draws = {self.head + self.num_draws} "
                f"exceeds the vocabulary {vocab_size}"
            )
        return self.num_draws + self.head


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """`python -m rskd_jax.cache`: token store + teacher -> teacher stores."""

    tokens: str = opt("runs/tokens", "token store (path or kvstore URL)")
    output: str = opt("runs/teacher", "directory/URL prefix; each output goes to <output>/<name>")
    splits: tuple[str, ...] = opt(("train", "val"), "token-store splits to cache")
    max_rows: int | None = opt(None, "cache only the first rows of each split (slices, dry runs)")
    batch_size: int = opt(8, "sequences per step, global (all processes together)")
    chunk_rows: int = opt(8, "rows per store chunk; processes own whole chunks")
    device_batch: int = opt(
        0,
        "rows per device per teacher forward: a fixed shape, so the store "
        "does not depend on batch_size or the data-parallel width (it depends "
        "on this). 0: the store's recorded value, or for a new store the rows "
        "per device of batch_size",
    )
    logits_chunk_mb: float = opt(
        0.0,
        "float32 logits per device per LM-head iteration of the step, in MB (the positions per row "
        "this gives, `position_chunk`, are recorded in the store: the rounding may depend on them). "
        "0: the store's recorded chunk, or for a new store 1/64 of the device's memory (16 MB to "
        "1 GB), 16 MB where the device does not report it (CPU)",
    )
    seed: int = opt(
        0,
        "sampling seed; row r of split s: fold_in(fold_in(key(seed), split_code(s)), r), "
        "position p: fold_in(row key, p)",
    )
    diagnostics: bool = opt(True, "store the teacher's log-prob of the next token and its entropy")
    overwrite: bool = opt(False, "replace existing stores written with a different manifest")
    full_max_gb: float = opt(4.0, "refuse a `full` output projected above this many GB")
    outputs: tuple[OutputConfig, ...] = opt((OutputConfig(),), "the stores to write")

    def __post_init__(self):
        if self.batch_size < 1 or self.chunk_rows < 1 or self.device_batch < 0:
            raise ConfigError("cache.batch_size and cache.chunk_rows must be >= 1, cache.device_batch >= 0")
        names = [o.name for o in self.outputs]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"cache.outputs needs at least one output and unique names, got {names}")


@dataclasses.dataclass(frozen=True)
class CacheRun:
    """Root config of `python -m rskd_jax.cache`."""

    cache: CacheConfig = opt(CacheConfig())
    teacher: ModelSpec = opt(ModelSpec(source="smollm2"))
    context: ContextConfig = opt(ContextConfig())
    mesh: MeshConfig = opt(MeshConfig())
    distributed: DistributedConfig = opt(DistributedConfig())


# ----------------------------------------------------------------------------- train / evaluate
# (owned by the training code: rskd_jax.train, rskd_jax.evaluate)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`python -m rskd_jax.train`: token store + teacher store -> student checkpoints."""

    tokens: str = opt("runs/tokens", "token store (path or kvstore URL)")
    teacher_store: str | None = opt(None, "teacher store (sparse, ghost, full_cached losses)")
    epoch_stores: tuple[str, ...] = opt(
        (),
        "more teacher stores of the same tokens and kind (e.g. other draw streams of one teacher "
        "pass): epoch e trains on [teacher_store, *epoch_stores][e mod n], fresh targets per epoch",
    )
    output: str = opt("runs/train", "run directory: checkpoints, metrics.jsonl, TensorBoard, hf/")
    steps: int = opt(1000, "optimizer steps in total (a resumed run continues to this)")
    batch_size: int = opt(8, "sequences per optimizer step, global (all processes)")
    grad_accum: int = opt(1, "micro-batches per step (scanned inside the jitted step)")
    seed: int = opt(0, "data order and state seed")
    log_every: int = opt(1, "steps between metrics.jsonl / TensorBoard records")
    eval_every: int = opt(0, "steps between validation passes (0: only at the end)")
    eval_batches: int = opt(4, "validation batches per pass (of train.batch_size rows)")
    checkpoint_every: int = opt(100, "steps between checkpoints (and one at the end)")
    keep_checkpoints: int = opt(3, "latest checkpoints kept (the best by val_loss is kept too)")
    async_checkpoints: bool = opt(True, "write checkpoints in the background")
    export_hf: bool = opt(True, "export the final student to <output>/hf (HF safetensors)")
    progress: bool = opt(True, "tqdm progress bar")

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_batches",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be >= 0, got {self.eval_every}")
        if self.epoch_stores and not self.teacher_store:
            raise ConfigError("train.epoch_stores needs train.teacher_store (the first epoch's store)")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """L = alpha * CE + (1 - alpha) * KD (+ z_loss * (log Z)^2); method picks the KD term."""

    method: Literal[LOSS_METHODS] = opt(
        "sparse",
        "ce | sparse (sampled, without-replacement or top-K store) | ghost | "
        "full_online (teacher runs in the step) | full_cached (store of full log-probs)",
    )
    alpha: float = opt(0.0, "weight of the cross-entropy term")
    kd_temperature: float = opt(1.0, "softmax temperature of full_online / full_cached KD")
    z_loss: float = opt(0.0, "coefficient of the (log Z)^2 auxiliary loss")
    chunk_size: int = opt(0, "positions per loss chunk (no [B, L, V] logits); 0: unchunked")

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if not self.kd_temperature > 0:
            raise ConfigError(f"loss.kd_temperature must be > 0, got {self.kd_temperature}")
        if self.z_loss < 0 or self.chunk_size < 0:
            raise ConfigError("loss.z_loss and loss.chunk_size must be >= 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay, global-norm clipping."""

    learning_rate: float = opt(3e-4, "peak learning rate")
    warmup_steps: int = opt(100, "linear warmup steps")
    end_lr_ratio: float = opt(0.1, "final learning rate / peak (cosine decay to train.steps)")
    b1: float = opt(0.9, "Adam beta1")
    b2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float = opt(0.1, "decoupled weight decay (not on norms, biases, 1-D params)")
    clip_norm: float = opt(1.0, "global gradient-norm clip (0: none)")

    def __post_init__(self):
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.clip_norm < 0:
            raise ConfigError("optim: learning_rate > 0, warmup_steps >= 0, clip_norm >= 0")


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """Root config of `python -m rskd_jax.train`."""

    train: TrainConfig = opt(TrainConfig())
    loss: LossConfig = opt(LossConfig())
    optim: OptimConfig = opt(OptimConfig())
    student: ModelSpec = opt(ModelSpec(source="random"))
    teacher: ModelSpec = opt(ModelSpec(source="smollm2"))  # loss.method=full_online only
    context: ContextConfig = opt(ContextConfig())
    mesh: MeshConfig = opt(MeshConfig())
    distributed: DistributedConfig = opt(DistributedConfig())


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """`python -m rskd_jax.evaluate`: a student checkpoint on a token-store split."""

    checkpoint: str | None = opt(
        None, "run dir (latest checkpoint), a checkpoint step dir, or an HF directory; default: train.output"
    )
    tokens: str | None = opt(None, "token store; default: train.tokens")
    split: str = opt("val", "token-store split")
    teacher: str | None = opt(
        None,
        "KL / agreement reference: a teacher store (estimated KL), "
        "or a model source ('smollm2', .gguf, HF dir, 'random' = the "
        "teacher section)",
    )
    batch_size: int = opt(8, "sequences per batch, global")
    max_batches: int | None = opt(None, "evaluate only this many batches")
    chunk_size: int = opt(0, "positions per logits chunk (0: whole rows)")

    def __post_init__(self):
        if self.batch_size < 1 or self.chunk_size < 0:
            raise ConfigError("evaluate.batch_size must be >= 1 and evaluate.chunk_size >= 0")


@dataclasses.dataclass(frozen=True)
class EvaluateRun(TrainRun):
    """Root config of `python -m rskd_jax.evaluate`: a train config plus `evaluate`, so the
    train YAML of a run serves both programs."""

    evaluate: EvaluateConfig = opt(EvaluateConfig())
