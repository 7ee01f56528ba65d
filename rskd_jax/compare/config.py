"""The comparison program's config: every program's sections plus `reproduce`.

    cfg = load_config(CompareRun, "configs/tiny/reproduce.yaml", ["reproduce.timing_reps=0"])

`PipelineRun` holds the sections of the four programs (data, cache, teacher, student, train,
loss, optim, context, mesh); `CompareRun` adds the `reproduce` section (sources, methods and the
settings of the eval, gradient-check, timing and report stages). The section keeps its name
`reproduce` because docs/results/results.json records the resolved config under it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from rskd_jax.config import (
    CacheConfig,
    ConfigError,
    ContextConfig,
    DataConfig,
    LossConfig,
    MeshConfig,
    ModelSpec,
    OptimConfig,
    TrainConfig,
    TrainRun,
    opt,
)
from rskd_jax.configlib import load_config_dict

STAGES = ("data", "cache", "train", "eval", "grad", "timing", "report")
# a student's keys that the comparison sets itself (MethodConfig.set may not change them)
METHOD_FIXED = frozenset({"train.tokens", "train.teacher_store", "train.epoch_stores", "train.output", "loss.method"})


@dataclasses.dataclass(frozen=True)
class PipelineRun:
    """Every program's sections in one root: the base of the comparison's config."""

    data: DataConfig = opt(DataConfig())
    cache: CacheConfig = opt(CacheConfig())
    teacher: ModelSpec = opt(ModelSpec(source="smollm2"))
    student: ModelSpec = opt(ModelSpec())
    train: TrainConfig = opt(TrainConfig())
    loss: LossConfig = opt(LossConfig())
    optim: OptimConfig = opt(OptimConfig())
    context: ContextConfig = opt(ContextConfig())
    mesh: MeshConfig = opt(MeshConfig())


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One text source: its own token store, its own val split in the mix."""

    name: str = opt("stdlib", "source name: the mix's val split is val_<name>")
    inputs: tuple[str, ...] = opt(("@stdlib",), "files/dirs/globs; '@pydoc[/sub]' = the python3.11-doc reST sources")
    max_tokens: int | None = opt(None, "stop after about this many tokens (train + val), in sorted path order")
    exclude: tuple[str, ...] = opt((), "fnmatch patterns of paths to skip")

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(f"source name {self.name!r} must be alphanumeric (and '_')")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """One student: its loss and the cache output (store) it trains from."""

    name: str = opt("ce", "method name (run dir train/<name>, results row)")
    loss: Literal["ce", "sparse", "ghost", "full_online"] = opt("ce", "loss.method of its train run")
    store: str | None = opt(None, "cache output it trains from (sparse, ghost)")
    epoch_stores: tuple[str, ...] = opt(
        (), "cache outputs of later epochs (train.epoch_stores): epoch e reads [store, *these][e mod n]"
    )
    set: tuple[str, ...] = opt(
        (),
        "overrides of this student's train/loss/optim sections, e.g. ['optim.clip_norm=0', "
        "'train.batch_size=32', 'train.grad_accum=4'] (steps follow reproduce.epochs and the batch)",
    )

    def __post_init__(self):
        for override in self.set:
            key = override.partition("=")[0].strip()
            if key.split(".")[0] not in ("train", "loss", "optim") or key in METHOD_FIXED:
                raise ConfigError(
                    f"method {self.name!r}: set {override!r} must change a train, loss or optim key other than "
                    f"{', '.join(sorted(METHOD_FIXED))} (those are the comparison's)"
                )
        if (self.loss in ("sparse", "ghost")) != (self.store is not None):
            raise ConfigError(
                f"method {self.name!r}: loss {self.loss!r} {'needs' if self.store is None else 'takes no'} a store"
            )


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """The `reproduce` section: what is compared and how each stage measures it."""

    output: str = opt("runs/reproduce", "every store, run and state.json go under this directory")
    docs: bool = opt(True, "include sources that read '@pydoc' (false: drop them, no apt needed)")
    docs_dir: str = opt("runs/pydoc", "where python3.11-doc is extracted (fetched if missing)")
    sources: tuple[SourceConfig, ...] = opt((SourceConfig(),), "text sources")
    methods: tuple[MethodConfig, ...] = opt((MethodConfig(),), "students")
    epochs: float | None = opt(1.0, "train steps = epochs * train rows / train.batch_size (null: train.steps)")
    reference: str | None = opt(
        None,
        "results.json of an earlier run of the same data, student and eval whose full-KD row gives the gap's "
        "end when no method here is full_online (its ce val losses must equal this run's)",
    )
    gap_ends: tuple[str, ...] | None = opt(
        None,
        "[CE method, full-KD method]: the ends of the gap closed, e.g. both trained with the same optim "
        "override (null: the method named 'ce' and the full_online one)",
    )
    eval_batch_size: int = opt(8, "rows per eval batch (teacher online)")
    eval_max_rows: int | None = opt(None, "val rows per source evaluated (null: all)")
    grad_at: Literal["ce_final", "init"] = opt("ce_final", "params of the gradient check")
    grad_batches: int = opt(4, "batches of the gradient check (figures are averaged over them)")
    grad_batch_size: int = opt(4, "rows per gradient-check batch")
    timing_reps: int = opt(5, "interleaved timed steps per method (0: use the runs' metrics)")
    timing_methods: tuple[str, ...] | None = opt(None, "methods timed (null: all)")
    reliability: tuple[str, ...] = opt(("ce", "top_k_12", "rskd_n50", "full_kd"), "reliability diagrams")
    results_dir: str = opt("docs/results", "results.json and plots")
    readme: str | None = opt("README.md", "README whose Results markers are filled (null: print)")
    compile_cache: bool = opt(True, "persistent XLA compile cache under <output>/jax_cache")
    until: str | None = opt(None, "stop after this stage: " + ", ".join(STAGES))
    progress: bool = opt(True, "progress bars")

    @property
    def ce_end(self) -> str:
        """The CE method: the baseline of the gap closed, the gradient check's params, step times."""
        return self.gap_ends[0] if self.gap_ends else "ce"

    @property
    def full_end(self) -> str | None:
        """The full-KD method the gap closes towards (None: none here, see `reference`)."""
        if self.gap_ends:
            return self.gap_ends[1]
        return next((m.name for m in self.methods if m.loss == "full_online"), None)

    def __post_init__(self):
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"reproduce.methods needs unique names, got {names}")
        if self.gap_ends is None and "ce" not in names:
            raise ConfigError("reproduce.methods must include a method named 'ce' (the baseline), or set gap_ends")
        if self.gap_ends is not None:
            loss = {m.name: m.loss for m in self.methods}
            ends = tuple(self.gap_ends)
            if len(ends) != 2 or loss.get(ends[0]) != "ce" or loss.get(ends[1]) != "full_online":
                raise ConfigError(
                    f"reproduce.gap_ends must name a ce method and a full_online method of reproduce.methods, "
                    f"got {list(ends)}"
                )
        if len({s.name for s in self.sources}) != len(self.sources) or not self.sources:
            raise ConfigError("reproduce.sources needs at least one source and unique names")
        if self.until is not None and self.until not in STAGES:
            raise ConfigError(f"reproduce.until must be one of {STAGES}, got {self.until!r}")
        for name in ("eval_batch_size", "grad_batches", "grad_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reproduce.{name} must be >= 1")


@dataclasses.dataclass(frozen=True)
class CompareRun(PipelineRun):
    """Root config of `python -m rskd_jax.compare`: the programs' sections plus `reproduce`."""

    reproduce: CompareConfig = opt(CompareConfig())

    def __post_init__(self):
        stores = {o.name for o in self.cache.outputs}
        for m in self.reproduce.methods:
            if m.set:  # keys and values checked now, not when its stage starts
                try:
                    load_config_dict(TrainRun, {}, m.set)
                except ConfigError as err:
                    raise ConfigError(f"method {m.name!r}: {err}") from None
            if m.epoch_stores and m.store is None:
                raise ConfigError(f"method {m.name!r}: epoch_stores need a store (the first epoch's)")
            for name in m.epoch_stores:
                if name not in stores:
                    raise ConfigError(
                        f"method {m.name!r}: epoch store {name!r} is not in cache.outputs ({sorted(stores)})"
                    )
            if m.store is not None and m.store not in stores:
                raise ConfigError(
                    f"method {m.name!r} trains from store {m.store!r}, which is not in cache.outputs ({sorted(stores)})"
                )
