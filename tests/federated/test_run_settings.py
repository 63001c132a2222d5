"""One definition of the run settings: every RunConfig field reaches every front end (CLI flag,
TOML key, `sweep --set` key, Flower run-config key) under one name, `--help` shows its
default, and errors name what the user typed."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedsb_dp import __version__
from fedsb_dp.cli import build_parser, main
from fedsb_dp.errors import ConfigError, SettingError, SettingsConflict
from fedsb_dp.federated.run_config import RunConfig, read_settings_file
from fedsb_dp.federated.settings import SettingField, settings_of
from fedsb_dp.flower.run_config import FlowerOptions, from_flower, run_values, to_flower
from fedsb_dp.run_flags import values_from_args
from fedsb_dp.sweep.command import set_values

ROOT = Path(__file__).resolve().parents[2]
ITEMS = settings_of(RunConfig)


def _sample(item: SettingField):
    """A value of the setting's type that is not its default."""
    kind = item.kind
    if item.setting.choices:
        return next(c for c in reversed(item.setting.choices) if c != item.default)
    if kind.many:
        return (2, 3) if kind.base is int else ("query", "value")
    return {bool: not item.default, int: 7, float: 0.25, str: "other"}[kind.base]


def _text(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _tuples(values: dict) -> dict:
    """TOML and JSON give lists where RunConfig holds tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _cli(parser, *argv):
    return values_from_args(parser.parse_args(["run", *argv]))


def test_every_field_is_declared_as_a_setting():
    assert [item.name for item in ITEMS] == [f.name for f in fields(RunConfig)]


@pytest.mark.parametrize("item", ITEMS, ids=lambda item: item.name)
def test_every_setting_has_one_name_in_every_front_end(item, tmp_path):
    value = _sample(item)
    expected = {item.name: value}
    parser = build_parser()
    if item.kind.base is bool:
        switch = item.flag if value else f"--no-{item.key}"
        assert _cli(parser, switch) == expected
        if item.setting.off_alias:
            assert _cli(parser, item.setting.off_alias) == {item.name: False}
    else:
        for flag in (item.flag, *item.setting.aliases):
            assert _cli(parser, flag, _text(value)) == expected, flag
    toml = tmp_path / "run.toml"
    toml.write_text(f"[run]\n{item.name} = {_toml(value)}\n")
    assert _tuples(read_settings_file(str(toml))) == expected
    assert _tuples(set_values([f"{item.name}={_text(value)}"])) == expected
    flower = value if not isinstance(value, tuple) else _text(value)
    assert run_values({item.key: flower})[0] == expected


def test_help_shows_every_setting_with_its_default_and_unit(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: argparse would break at hyphens
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    entries = []  # one per option: its invocation line and the help under it
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
    for item in ITEMS:
        line = next((x for x in entries if x.strip().startswith(item.flag + " ")), None)
        assert line is not None, f"{item.flag} missing from --help"
        assert f"[default: {item.default_text()}]" in line, line
        if item.setting.unit:
            assert item.setting.unit in line
        for alias in item.setting.aliases:
            assert f", {alias} " in line


def test_every_front_end_builds_the_same_config(tmp_path):
    """A run far from the defaults, given through the CLI (old and new flag names), a TOML
    file, `sweep --set` and the Flower run config."""
    config = RunConfig(
        epsilon=2.5, delta=1e-6, accountant="rdp", max_grad_norm=1.5, method="fedsb", rank=8,
        client_ranks=(2, 4, 8, 8), targets=("query", "value"), train_head=False,
        train_pooler=True, pooling="cls", adapter_dropout=0.1, model_dropout=False,
        init="random-orthonormal", max_length=48, max_train_records=400, partition="dirichlet:0.5",
        clients=4, rounds=5, local_steps=3, batch_size=16, learning_rate=0.01, optimizer="sgd",
        participation=0.5, min_clients=2, seed=5, out=str(tmp_path / "run"))
    changed = {k: v for k, v in config.to_dict().items()
               if v != getattr(RunConfig(epsilon=1.0), k)}
    argv = ["--clip", "1.5", "--lr", "0.01", "--batch-size", "16", "--frozen-head"]
    for name, value in changed.items():
        item = next(i for i in ITEMS if i.name == name)
        if name in ("max_grad_norm", "learning_rate", "batch_size", "train_head"):
            continue  # given by their older names above
        if item.kind.base is bool:
            argv.append(item.flag if value else f"--no-{item.key}")
        else:
            argv += [item.flag, _text(tuple(value) if isinstance(value, list) else value)]
    assert RunConfig.from_dict(_cli(build_parser(), *argv)) == config
    toml = tmp_path / "run.toml"
    toml.write_text("[run]\n" + "".join(
        f"{k} = {_toml(tuple(v) if isinstance(v, list) else v)}\n" for k, v in changed.items()))
    assert RunConfig.from_toml(str(toml)) == config
    assert RunConfig.from_dict(set_values(
        [f"{k}={_text(tuple(v) if isinstance(v, list) else v)}" for k, v in changed.items()])
    ) == config
    assert from_flower(to_flower(config))[0] == config
    # Flags override the file, whatever name they use.
    args = build_parser().parse_args(["run", "--config", str(toml), "--clip", "2"])
    assert RunConfig.from_toml(args.config, **values_from_args(args)).max_grad_norm == 2.0


def test_the_flower_app_config_lists_every_setting_at_its_default():
    with open(ROOT / "pyproject.toml", "rb") as fh:
        app = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert list(app) == list(to_flower(RunConfig(epsilon=3.0)))
    config, options = from_flower(app)
    assert config == RunConfig(epsilon=app["epsilon"]) and options == FlowerOptions()
    assert app["learning-rate"] == ""  # the method's own default, whichever --method is set


def test_cli_error_names_the_flag_typed(capsys):
    assert main(["run", "--clip", "0"]) == 2
    assert "error: --clip 0 must be > 0" in capsys.readouterr().err
    assert main(["run", "--epsilon", "3", "--max-grad-norm", "0"]) == 2
    assert "error: --max-grad-norm 0 must be > 0" in capsys.readouterr().err
    assert main(["run", "--frozen-head", "--participation", "1.5", "--epsilon", "1"]) == 2
    assert "error: --participation 1.5 must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--clip", "abc"])
    assert exit_.value.code == 2
    assert "--clip: 'abc' must be a number" in capsys.readouterr().err



@pytest.mark.parametrize("argv, message", [
    (["--epsilon", "3", "--no-dp"], "--epsilon 3 and --no-dp contradict each other"),
    (["--no-dp", "--method", "central-lora", "--partition", "dirichlet:0.3"],
     "--method central-lora trains on the pooled data; --partition dirichlet:0.3 does not"),
    (["--epsilon", "3", "--dp-level", "client", "--init", "gradient-svd"],
     "--dp-level client accounts whole clients; --init gradient-svd on client data"),
    (["--epsilon", "3", "--clients", "3", "--client-ranks", "2,2"],
     "--client-ranks 2,2 has 2 entries for --clients 3"),
])
def test_combination_errors_name_every_flag_typed(argv, message, capsys):
    assert main(["run", *argv]) == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_combination_errors_name_fields_in_files_and_survive_pickling(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("epsilon = 3.0\nno_dp = true\n")
    assert main(["run", "--config", str(toml)]) == 2
    assert (f"epsilon=3.0 and no_dp=True contradict each other: drop one (in {toml})"
            in capsys.readouterr().err)
    error = pickle.loads(pickle.dumps(SettingsConflict({"rank": 0}, "{rank} is odd")))
    assert str(error) == "rank=0 is odd"

def test_file_errors_name_the_key_and_the_file(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('epsilon = 1.0\nmax_grad_norm = 0.0\nrank = "8"\n')
    with pytest.raises(SettingError, match=r"rank='8' must be an integer"):
        RunConfig.from_toml(str(toml))
    toml.write_text("epsilon = 1.0\nmax_grad_norm = 0.0\n")
    assert main(["run", "--config", str(toml)]) == 2
    assert f"max_grad_norm=0.0 must be > 0 (in {toml})" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--set 'clip' is not a run setting"):
        set_values(["clip=1"])
    with pytest.raises(SettingError, match=r"--set rank='x' must be an integer"):
        set_values(["rank=x"])
    with pytest.raises(SettingError, match=r"^max-grad-norm=0 must be > 0"):
        from_flower({**to_flower(RunConfig(epsilon=1.0)), "max-grad-norm": 0})


def test_setting_errors_survive_a_process_boundary():
    error = pickle.loads(pickle.dumps(SettingError("rank", 0, "must be ≥ 1")))
    assert (error.setting, error.value, str(error)) == ("rank", 0, "rank=0 must be ≥ 1")


def test_version_and_verbose_after_the_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fedsb-dp {__version__}"
    parser = build_parser()
    assert parser.parse_args(["run", "--epsilon", "1", "-v"]).verbose is True
    assert parser.parse_args(["-v", "run", "--epsilon", "1"]).verbose is True
    assert parser.parse_args(["run", "--epsilon", "1"]).verbose is False
    assert parser.parse_args(["sweep", "--out", "x", "--verbose"]).verbose is True


def test_console_script_exit_code_names_the_flag():
    """The real entry point: exit status 2, the flag as typed, `-v` after the subcommand."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "fedsb_dp.cli", "run", "--clip", "0", "-v"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "fedsb-dp: error: --clip 0 must be > 0" in done.stderr


def test_per_client_noise_is_refused_where_it_does_not_apply(tmp_path):
    assert RunConfig(epsilon=3).noise == "shared"
    with pytest.raises(ConfigError, match="dp_level='client' adds one noise at the server"):
        RunConfig(epsilon=3, noise="per-client", dp_level="client", clients=20)
    with pytest.raises(ConfigError, match="no_dp run adds no noise"):
        RunConfig(no_dp=True, noise="per-client")
    with pytest.raises(SettingError, match="noise='each'"):
        RunConfig(epsilon=3, noise="each")
    code = main(["run", "--epsilon", "3", "--noise", "per-client", "--dp-level", "client",
                 "--out", str(tmp_path / "run")])
    assert code == 2 and not os.path.exists(tmp_path / "run")
