"""The `confide` command line explains itself: every config-backed flag's help is generated
from the key's definition (meaning, default, allowed values), switches say which way they
turn their key, and the top-level help names every command."""

from __future__ import annotations

import argparse

import pytest

from confide.cli import SIMULATE_FLAGS, SIMULATE_SWITCHES, build_parser, main, resolve_config
from confide.config import SCHEMA, SHARED_NOISE_DEFAULTS, shown_default


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {flag: action.help or "" for action in parser._actions
            for flag in action.option_strings}


def _shown(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).lower() if isinstance(value, bool) else str(value)


CONFIG_FLAGS = {**SIMULATE_FLAGS, **SIMULATE_SWITCHES}


@pytest.mark.parametrize("flag", sorted(CONFIG_FLAGS))
def test_every_config_flag_names_its_meaning_default_and_allowed_values(flag: str) -> None:
    key = CONFIG_FLAGS[flag]
    spec = SCHEMA[key]
    text = _helps(_subparser("simulate"))[flag]
    assert spec.help in text
    assert f"default: {_shown(spec.default)}" in text
    assert spec.allowed in text
    assert key in text
    assert not text.startswith("config key") and not text.startswith("sets ")


def test_shared_noise_defaults_are_named_where_they_differ() -> None:
    helps = _helps(_subparser("simulate"))
    for flag, key in SIMULATE_FLAGS.items():
        if key in SHARED_NOISE_DEFAULTS:
            assert f"or {_shown(SHARED_NOISE_DEFAULTS[key])} when example-dp-noise = " \
                   "'shared'" in helps[flag]
    assert shown_default("rounds").startswith("3, or 30 when")


@pytest.mark.parametrize("flag", sorted(SIMULATE_SWITCHES))
def test_a_switch_says_which_value_it_sets_and_does_set_it(flag: str) -> None:
    key = SIMULATE_SWITCHES[flag]
    text = _helps(_subparser("simulate"))[flag]
    others = ["--secure-aggregation"] if key == "distributed-dp" else []
    cfg = resolve_config(build_parser().parse_args(["simulate", flag, *others]))
    value = getattr(cfg, key.replace("-", "_"))
    assert text.startswith(f"turn {'on' if value else 'off'} {key} (")
    assert f"sets {key} = {str(value).lower()} " in text


def test_negated_example_dp_reads_turn_off() -> None:
    text = _helps(_subparser("simulate"))["--no-example-dp"]
    assert text.startswith("turn off example-dp (DP-SGD on each partner): sets example-dp "
                           "= false (default: true;")


def test_resume_says_what_it_continues_and_how() -> None:
    text = _helps(_subparser("simulate"))["--resume"]
    assert "last checkpointed round" in text
    assert "--config RUN/config.toml --resume" in text


def test_rendered_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in CONFIG_FLAGS:
        assert flag in out
    assert "python -m confide.config" in out


def test_top_level_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    description = next(line for line in out.splitlines() if line.startswith("`confide`"))
    for command in ("simulate", "audit", "generate", "export", "predict", "deploy"):
        assert command in description
        assert f"\n    {command} " in out  # its line in the commands list, with its help
