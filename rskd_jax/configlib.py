"""Config machinery: frozen dataclasses, YAML files, dotted `key=value` overrides, strict checks.

The program sections live in rskd_jax/config.py (which re-exports everything here); each
program (`python -m rskd_jax.data|cache|train|evaluate`) has one root dataclass whose
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

import copy
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

    >>> from rskd_jax.config import DataRun
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


def load_config_dict(cls: type[T], raw: dict[str, Any], overrides: Sequence[str] = ()) -> T:
    """`load_config` from a nested dict instead of a file: overrides applied in order, validated.

    >>> from rskd_jax.config import OptimConfig
    >>> load_config_dict(OptimConfig, {"b2": 0.99}, ["clip_norm=0"]).clip_norm
    0.0
    """
    raw = copy.deepcopy(raw)
    for override in overrides:
        _set_dotted(cls, raw, override)
    return _build(cls, raw)


def config_to_dict(cfg: Any) -> Any:
    """Config -> plain nested dicts/lists (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML text (what save_config writes)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Any, url_or_dir: str, name: str = "config.yaml") -> str:
    """Writes the resolved config as YAML into a local dir or kvstore URL; returns its URL."""
    import tensorstore as ts

    from rskd_jax.store.common import store_url  # tensorstore only where configs are saved

    text = dump_config(cfg)
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
