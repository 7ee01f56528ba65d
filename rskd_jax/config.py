"""Program configs: frozen dataclasses, YAML files, dotted `key=value` overrides, strict checks.

Every program (`python -m rskd_jax.data|cache|train|evaluate`) has one root dataclass whose
fields are sections named after programs, so one YAML layout serves all of them:

    data:                       # python -m rskd_jax.data --config configs/tiny/data.yaml
      inputs: ["@stdlib"]
      seq_len: 128

and `data.seq_len=256` on the command line overrides it. Unknown keys, in the file or an
override, are errors naming the key, the closest valid key and every valid one. Values are
checked against the annotations (int, float, str, bool, Optional, list/tuple, Literal, nested
dataclasses); YAML lists become tuples so configs stay hashable. Override values are read as
YAML; what YAML rejects stays a string (`data.inputs=[@stdlib, docs/]` works unquoted). Field
help comes from `field(metadata={"help": ...})` (see `opt`) and is printed by `--help`.

    cfg = load_config(DataRun, "configs/tiny/data.yaml", ["data.seq_len=256"])
    cfg, flags = parse_cli(DataRun, sys.argv[1:], prog="python -m rskd_jax.data",
                           flags=("dry-run",))
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config file or override is invalid: unknown key, wrong type, bad syntax."""


def opt(default: Any, help: str = "") -> Any:
    """A dataclass field with a default and a one-line help text shown by `--help`."""
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = ", ".join(_type_name(a) for a in args) if args else "any"
        return f"list[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Checks `value` (from YAML) against annotation `tp`; returns it in canonical form."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, key)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, int, float, bool)) and not (origin is tuple and Ellipsis not in args):
            value = [value]  # a scalar where a list is expected: a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        if origin is tuple and args and Ellipsis not in args:  # fixed-length tuple[int, int]
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        elem = args[0] if args else Any
        return tuple(_coerce(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            hint = f" (quote it: {key}='{value}')" if isinstance(value, (int, float)) else ""
            raise ConfigError(f"{key}: expected a string, got {value!r}{hint}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r} in the config class")


def _unknown_key(key: str, cls: type, where: str) -> ConfigError:
    parent, _, name = key.rpartition(".")
    valid = [f.name for f in dataclasses.fields(cls)]
    full = {v: f"{parent}.{v}" if parent else v for v in valid}
    # A key one level too high ('seq_len' for 'data.seq_len') is the commonest slip.
    for f, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp) and name in {g.name for g in dataclasses.fields(tp)}:
            full[name] = f"{full[f]}.{name}"
    close = difflib.get_close_matches(name, list(full), n=1)
    hint = f"; did you mean {full[close[0]]!r}?" if close else "."
    scope = f" under {parent!r}" if parent else ""
    return ConfigError(f"unknown key {key!r}{where}{hint} Valid keys{scope}: {', '.join(valid)}")


def _build(cls: type[T], raw: Any, prefix: str = "", where: str = "") -> T:
    """Builds dataclass `cls` from a nested dict, strictly."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            raise _unknown_key(f"{prefix}.{key}" if prefix else str(key), cls, where)
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], dotted)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"missing required key {dotted!r}")
    return cls(**kwargs)


def config_from_dict(cls: type[T], raw: dict[str, Any]) -> T:
    """Builds and validates config `cls` from a nested dict (as read from YAML)."""
    return _build(cls, raw)


# ----------------------------------------------------------------------------- loading


def _parse_value(text: str) -> Any:
    """A YAML scalar/list; text YAML rejects (e.g. '@stdlib', '[@stdlib, docs/]') stays text."""
    text = text.strip()
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        if text.startswith("[") and text.endswith("]"):
            return [_parse_value(item) for item in text[1:-1].split(",") if item.strip()]
        return text


def _set_dotted(cls: type, raw: dict[str, Any], override: str) -> None:
    """Applies one `a.b.c=value` override to the nested dict `raw`, checking the key path."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. data.seq_len=256)")
    value = _parse_value(text)
    parts, node, node_cls = key.split("."), raw, cls
    for i, part in enumerate(parts):
        if part not in {f.name for f in dataclasses.fields(node_cls)}:
            raise _unknown_key(".".join(parts[: i + 1]), node_cls, f" in override {override!r}")
        if i == len(parts) - 1:
            node[part] = value
            break
        sub_cls = typing.get_type_hints(node_cls)[part]
        if not dataclasses.is_dataclass(sub_cls):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])!r} has no sub-keys")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, node_cls = node[part], sub_cls


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Reads YAML `path` (optional), applies dotted overrides in order, validates strictly.

    >>> load_config(DataRun, None, ["data.seq_len=256", "data.inputs=[a.txt, docs/]"]).data.seq_len
    256
    """
    raw: dict[str, Any] = {}
    where = ""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        raw, where = loaded or {}, f" in {path}"
    for override in overrides:
        _set_dotted(cls, raw, override)
    try:
        return _build(cls, raw, where=where)
    except ConfigError as err:
        if path is None or path in str(err):
            raise
        raise ConfigError(f"{err} ({where.strip()})") from None


def config_to_dict(cfg: Any) -> Any:
    """Config -> plain nested dicts/lists (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def save_config(cfg: Any, url_or_dir: str, name: str = "config.yaml") -> str:
    """Writes the resolved config as YAML into a local dir or kvstore URL; returns its URL."""
    import tensorstore as ts

    from rskd_jax.store.common import store_url  # tensorstore only where configs are saved

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    url = store_url(url_or_dir)
    ts.KvStore.open(url).result().write(name, text.encode("utf-8")).result()
    return url + name


# ----------------------------------------------------------------------------- command line


def _help_lines(cls: type, prefix: str = "") -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += _help_lines(tp, dotted)
            continue
        default = (
            f.default
            if f.default is not _MISSING
            else (f.default_factory() if f.default_factory is not _MISSING else "(required)")
        )
        shown = yaml.safe_dump(config_to_dict(default), default_flow_style=True, width=10**6).strip()
        shown = shown.removesuffix("\n...").removesuffix("...").strip()
        text = f.metadata.get("help", "")
        lines.append(f"  {dotted}={shown}  ({_type_name(tp)}){'  ' + text if text else ''}")
    return lines


def parse_cli(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    flags: Sequence[str] = (),
) -> Any:
    """`[--config FILE] [--FLAG ...] [key=value ...]` -> config (and flags, if any declared).

    Returns the config alone when `flags` is empty, else `(config, {flag_name: bool})` with
    dashes in flag names turned into underscores (`"dry-run"` -> `"dry_run"`). `--help`
    prints every key with its default, type and help, then exits 0; errors exit 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or sys.argv[0]
    found = {name.replace("-", "_"): False for name in flags}
    path, overrides = None, []
    usage = f"usage: {prog} [--config FILE]{''.join(f' [--{n}]' for n in flags)} [key=value ...]"
    i = 0
    try:
        while i < len(argv):
            arg = argv[i]
            if arg in ("-h", "--help"):
                print(usage + "\n\nkeys (key=default  (type)  help):\n" + "\n".join(_help_lines(cls)))
                raise SystemExit(0)
            if arg == "--config" or arg.startswith("--config="):
                if arg == "--config":
                    if i + 1 >= len(argv):
                        raise ConfigError("--config needs a file name")
                    i += 1
                    path = argv[i]
                else:
                    path = arg.split("=", 1)[1]
            elif arg.startswith("--"):
                if arg[2:] not in flags:
                    known = ["--config", "--help"] + [f"--{n}" for n in flags]
                    raise ConfigError(
                        f"unknown option {arg!r}; options: {', '.join(known)}; config keys are given as key=value"
                    )
                found[arg[2:].replace("-", "_")] = True
            elif "=" in arg:
                overrides.append(arg)
            else:
                raise ConfigError(f"unexpected argument {arg!r}: give overrides as key=value")
            i += 1
        cfg = load_config(cls, path, overrides)
    except ConfigError as err:
        print(f"{usage}\n{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return (cfg, found) if flags else cfg


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
        (
            ".py",
            ".txt",
            ".md",
            ".rst",
            ".txt.gz",
            ".txt.zst",
            ".jsonl",
            ".jsonl.gz",
            ".jsonl.zst",
            ".ndjson",
            ".json.gz",
            ".json.zst",
            ".parquet",
            ".arrow",
        ),
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
class DataRun:
    """Root config of `python -m rskd_jax.data`."""

    data: DataConfig = opt(DataConfig())
    distributed: DistributedConfig = opt(DistributedConfig())


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and, for `source: random`, its architecture."""

    source: str = opt("random", "'smollm2', a .gguf file, an HF directory, or 'random'")
    dtype: str = opt("float32", "compute dtype: float32 or bfloat16")
    param_dtype: str = opt("float32", "parameter dtype: float32 or bfloat16")
    remat: bool = opt(False, "recompute each layer's activations in the backward pass")
    attention: str = opt(
        "auto",
        "attention implementation: auto (chunked on CPU, jax.nn.dot_product_attention elsewhere), xla or chunked",
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
        if self.attention not in ("auto", "xla", "chunked"):
            raise ConfigError(f"attention must be auto, xla or chunked, got {self.attention!r}")


# ----------------------------------------------------------------------------- cache


METHODS = ("sample", "sample_wor", "top_k", "ghost", "full")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """One teacher store written by the cache pass (several share one teacher forward)."""

    name: str = opt("rskd_n50", "store name: written to <cache.output>/<name>")
    method: Literal["sample", "sample_wor", "top_k", "ghost", "full"] = opt(
        "sample", "sample (with replacement, counts), sample_wor (Gumbel-top-k), top_k, ghost, full"
    )
    num_draws: int = opt(50, "sample: draws N; sample_wor / top_k / ghost: ids kept k")
    temperature: float = opt(1.0, "proposal temperature (sample, sample_wor); targets stay unbiased")
    normalize: bool = opt(False, "sample_wor: self-normalised weights (consistent, biased)")
    renormalize: bool = opt(True, "top_k: divide the kept probabilities by their sum")

    def __post_init__(self):
        if self.num_draws < 1:
            raise ConfigError(f"outputs[{self.name}].num_draws must be >= 1, got {self.num_draws}")
        if not self.temperature > 0:
            raise ConfigError(f"outputs[{self.name}].temperature must be > 0, got {self.temperature}")
        if not self.name or "/" in self.name:
            raise ConfigError(f"output name {self.name!r} must be a non-empty name without '/'")


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
    mesh: MeshConfig = opt(MeshConfig())
    distributed: DistributedConfig = opt(DistributedConfig())


# ----------------------------------------------------------------------------- train / evaluate
# (owned by the training code: rskd_jax.train, rskd_jax.evaluate)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`python -m rskd_jax.train`: token store + teacher store -> student checkpoints."""

    tokens: str = opt("runs/tokens", "token store (path or kvstore URL)")
    teacher_store: str | None = opt(None, "teacher store (sparse, ghost, full_cached losses)")
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


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """L = alpha * CE + (1 - alpha) * KD (+ z_loss * (log Z)^2); method picks the KD term."""

    method: Literal["ce", "sparse", "ghost", "full_online", "full_cached"] = opt(
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
