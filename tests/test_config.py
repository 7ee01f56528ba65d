"""Config machinery: strict keys, type checks, dotted overrides, CLI, saving."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
import yaml

from rskd_jax.config import ConfigError, DataRun, config_to_dict, load_config, opt, parse_cli, save_config


@dataclasses.dataclass(frozen=True)
class Inner:
    num_draws: int = opt(50, "draws per position")
    temperature: float = 1.0
    mode: Literal["replace", "gumbel"] = "replace"


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    steps: int | None = None
    shape: tuple[int, int] = (2, 3)
    tags: tuple[str, ...] = ()
    flag: bool = False
    sampling: Inner = opt(Inner())


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_file_and_overrides_in_order(tmp_path):
    assert load_config(Outer) == Outer()
    path = write(tmp_path, "name: a\nsampling:\n  num_draws: 12\n  mode: gumbel\ntags: [p, q]\n")
    cfg = load_config(
        Outer,
        path,
        ["sampling.num_draws=50", "sampling.temperature=0.5", "tags=[a, b, c]", "steps=7", "sampling.num_draws=13"],
    )
    assert cfg == Outer(
        name="a", steps=7, tags=("a", "b", "c"), sampling=Inner(num_draws=13, temperature=0.5, mode="gumbel")
    )
    assert load_config(Outer, None, ["tags=one"]).tags == ("one",)  # scalar -> 1-element list
    assert load_config(Outer, None, ["shape=[4, 5]"]).shape == (4, 5)
    assert load_config(Outer, None, ["steps=null"]).steps is None
    assert load_config(Outer, None, ["sampling.temperature=1e-3"]).sampling.temperature == 1e-3
    assert load_config(Outer, None, ["sampling.temperature=2"]).sampling.temperature == 2.0


def test_unknown_keys_are_errors_naming_them(tmp_path):
    path = write(tmp_path, "sampling:\n  num_draw: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    msg = str(err.value)
    assert "'sampling.num_draw'" in msg and "did you mean 'sampling.num_draws'" in msg
    assert "num_draws, temperature, mode" in msg and path in msg
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'sampling.tempreature' in override.*"
        r"did you mean 'sampling.temperature'",
    ):
        load_config(Outer, None, ["sampling.tempreature=2"])
    with pytest.raises(ConfigError, match="unknown key 'nme'.*did you mean 'name'"):
        load_config(Outer, None, ["nme=a"])
    with pytest.raises(ConfigError, match="has no sub-keys"):
        load_config(Outer, None, ["steps.x=1"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Outer, None, ["=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=abc", "steps: expected int | null, got 'abc'"),
        ("sampling.num_draws=1.5", "sampling.num_draws: expected an integer, got 1.5"),
        ("flag=1", "flag: expected true or false"),
        ("name=12", "name: expected a string, got 12 \\(quote it"),
        ("sampling.mode=topk", "sampling.mode: expected one of 'replace', 'gumbel'"),
        ("shape=[1, 2, 3]", "shape: expected 2 values"),
        ("tags=[a, 3]", r"tags\[1\]: expected a string"),
        ("sampling=5", "sampling: expected a mapping"),
    ],
)
def test_type_errors_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_data_config_layout_and_checks(tmp_path):
    cfg = load_config(DataRun, None, ["data.seq_len=256", "data.inputs=[a.txt, docs/]"])
    assert cfg.data.seq_len == 256 and cfg.data.inputs == ("a.txt", "docs/")
    assert load_config(DataRun).data.inputs == ("@stdlib",)
    # '@' cannot start a YAML token; overrides keep such values as text.
    assert load_config(DataRun, None, ["data.inputs=@stdlib/json/*.py"]).data.inputs == ("@stdlib/json/*.py",)
    assert load_config(DataRun, None, ["data.inputs=[@stdlib, docs/]"]).data.inputs == ("@stdlib", "docs/")
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        load_config(DataRun, None, ["data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="unknown key 'seq_len'.*did you mean 'data.seq_len'"):
        load_config(DataRun, write(tmp_path, "seq_len: 3\n"))


def test_save_config_round_trips(tmp_path):
    cfg = load_config(Outer, None, ["tags=[a]", "sampling.num_draws=9"])
    url = save_config(cfg, str(tmp_path / "run"))
    assert url.endswith("run/config.yaml")
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert yaml.safe_load(text) == config_to_dict(cfg)
    assert load_config(Outer, str(tmp_path / "run" / "config.yaml")) == cfg


def test_parse_cli(tmp_path, capsys):
    path = write(tmp_path, "data:\n  seq_len: 64\n")
    cfg, flags = parse_cli(DataRun, ["--config", path, "data.output=o", "--dry-run"], prog="p", flags=("dry-run",))
    assert (cfg.data.seq_len, cfg.data.output, flags) == (64, "o", {"dry_run": True})
    assert parse_cli(DataRun, [f"--config={path}"]).data.seq_len == 64  # no flags: config alone
    with pytest.raises(SystemExit) as exit_:
        parse_cli(DataRun, ["--help"], prog="python -m rskd_jax.data")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for line in (
        "data.seq_len=512  (int)",
        "data.inputs=['@stdlib']  (list[str])",
        "data.max_tokens=null  (int | null)",
        "data.overwrite=false  (bool)",
    ):
        assert line in out
    for argv, message in (
        (["--bogus"], "unknown option '--bogus'"),
        (["data.seq_lne=3"], "did you mean"),
        (["seq_len"], "give overrides as key=value"),
        (["--config"], "needs a file"),
    ):
        with pytest.raises(SystemExit) as exit_:
            parse_cli(DataRun, argv, prog="p")
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_output_head_rules_and_slots():
    from rskd_jax.config import OutputConfig

    assert OutputConfig(method="head_tail", head=4, num_draws=25).slots(100) == 29
    assert OutputConfig(method="systematic", num_draws=50).slots(100) == 50
    assert OutputConfig(method="full").slots(100) == 100
    with pytest.raises(ConfigError, match=r"outputs\[x\]: method head_tail needs head >= 1, got 0"):
        OutputConfig(name="x", method="head_tail", num_draws=25)
    with pytest.raises(ConfigError, match=r"head applies to method head_tail only, not 'systematic'"):
        OutputConfig(name="x", method="systematic", head=2)
    with pytest.raises(ConfigError, match=r"head \+ num_draws = 30 exceeds the vocabulary 29"):
        OutputConfig(name="x", method="head_tail", head=5, num_draws=25).slots(29)
    from rskd_jax.config import CacheRun

    with pytest.raises(ConfigError, match="systemtic"):
        load_config(CacheRun, None, ["cache.outputs=[{name: a, method: systemtic}]"])
    run = load_config(CacheRun, None, ["cache.outputs=[{name: ht4_n25, method: head_tail, head: 4, num_draws: 25}]"])
    assert run.cache.outputs[0].head == 4
