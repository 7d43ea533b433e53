from pathlib import Path

import pytest

from confide.cli import main, resolve_config
from confide.config import SCHEMA, ConfigError, RunConfig, build_config, load_toml


def test_defaults_validate_and_roundtrip_through_toml(tmp_path: Path) -> None:
    cfg = RunConfig()
    assert set(cfg.to_dict()) == set(SCHEMA)
    cfg.write_toml(tmp_path / "c.toml")
    again = build_config(load_toml(tmp_path / "c.toml"))
    assert again == cfg and again.digest() == cfg.digest()


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("rounds", 0, "rounds = 0 is out of range; allowed: integer >= 1"),
    ("delta", 1.5, "delta = 1.5 is out of range; allowed: 0 < x < 1"),
    ("fine-tune", "adapter", "allowed: 'lora', 'full', 'head' or 'bitfit'"),
    ("target-epsilon", "abc", "target-epsilon = 'abc' is not a valid float"),
    ("example-dp", "maybe", "example-dp = 'maybe' is not a valid bool"),
    ("max-grad-norm", float("nan"), "max-grad-norm = nan is out of range"),
    ("clients", True, "clients = True has type bool, expected int"),
])
def test_bad_values_name_key_and_range(key: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({key: value})
    assert needle in str(info.value)


def test_unknown_key_is_an_error_with_a_hint() -> None:
    with pytest.raises(ConfigError, match="unknown configuration key 'target-epsilson'"):
        build_config({"target-epsilson": 3})
    with pytest.raises(ConfigError, match="did you mean"):
        build_config({"max-epsilonn": 3})


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match=r"max-epsilon .* is below target-epsilon"):
        build_config({"target-epsilon": 8, "max-epsilon": 4})
    with pytest.raises(ConfigError, match="distributed-dp needs secure-aggregation"):
        build_config({"distributed-dp": True})


def test_cli_flags_override_config_file_and_set(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('rounds = 7\nclients = 5\nfine-tune = "head"\n')
    import argparse

    from confide import cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli._simulate_parser(sub)
    args = parser.parse_args(["simulate", "--config", str(tmp_path / "c.toml"), "--rounds", "2",
                              "--set", "learning-rate=0.01", "--set", "clients=3",
                              "--secure-aggregation"])
    cfg = resolve_config(args)
    assert (cfg.rounds, cfg.clients, cfg.fine_tune, cfg.learning_rate) == (2, 3, "head", 0.01)
    assert cfg.secure_aggregation is True


def test_cli_reports_bad_value_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--rounds", "-1"]) == 2
    assert "rounds = -1 is out of range" in capsys.readouterr().err


def test_readme_documents_every_key() -> None:
    from confide.config import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [k for k in SCHEMA if f"| `{k}` |" not in readme]
    assert not missing, f"README configuration table lacks {missing}"
    assert markdown_table() in readme, "regenerate: python -m confide.config"


def test_flower_app_config_in_pyproject_matches_the_defaults() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml")
                              .read_text())
    app_config = pyproject["tool"]["flwr"]["app"]["config"]
    # `flwr run --run-config` may only override keys listed there: all of them must be
    assert build_config(app_config) == RunConfig()
    assert set(app_config) == set(SCHEMA)


def test_pyproject_app_config_is_generated_from_the_fields() -> None:
    """Values and types, not only keys: each is the field's declared default ('auto'
    unresolved), and the table is the generator's text (python -m confide.config
    --pyproject)."""
    import dataclasses
    import tomllib

    from confide.config import declared_defaults, pyproject_table

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    app_config = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    declared = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)
                if f.name != "extra"}
    assert declared_defaults() == declared
    assert list(app_config) == list(declared)
    for key, value in declared.items():
        assert (type(app_config[key]), app_config[key]) == (type(value), value), key
    assert pyproject_table() in text, "regenerate: python -m confide.config --pyproject"


def test_schema_is_derived_from_the_run_config_fields() -> None:
    """One definition: every key's type is its field's annotation, its default the field's
    default, and its allowed text / check / help the field's metadata."""
    import dataclasses
    from typing import get_type_hints

    kinds = get_type_hints(RunConfig)
    keys = [f for f in dataclasses.fields(RunConfig) if f.name != "extra"]
    assert list(SCHEMA) == [f.name.replace("_", "-") for f in keys]
    for f in keys:
        spec = SCHEMA[f.name.replace("_", "-")]
        assert (spec.kind, spec.default) == (kinds[f.name], f.default)
        assert (spec.allowed, spec.check, spec.help) == (
            f.metadata["allowed"], f.metadata["check"], f.metadata["help"])
    assert SCHEMA["example-dp-noise"].default == "auto"  # declared; RunConfig resolves it
    assert RunConfig().example_dp_noise == "local"


def test_recorded_value_reads_keys_of_earlier_versions_as_they_meant_them() -> None:
    from confide.config import LEGACY_MEANINGS, recorded_config, recorded_value

    recorded = RunConfig(secure_aggregation=True).to_dict()
    assert recorded_value(recorded, "example-dp-noise") == "shared"
    assert recorded_value({"dp_colluders": 2}, "dp-colluders") == 2  # snake_case accepted
    assert recorded_value({"secure-aggregation": "yes"}, "secure-aggregation") == "yes"
    # a folder written before example-dp-noise existed: every partner noised locally,
    # although today's declared default ('auto') would mean 'shared' with secure aggregation
    old = {k: v for k, v in recorded.items() if k not in ("example-dp-noise", "dp-colluders")}
    assert recorded_value(old, "example-dp-noise") == LEGACY_MEANINGS["example-dp-noise"]
    assert recorded_value(old, "example-dp-noise") == "local"
    assert recorded_value(old, "dp-colluders") == 0  # no legacy row: the declared default
    assert recorded_value({}, "example-dp") is True
    assert recorded_config(old).example_dp_noise == "local"
    legacy = recorded_config({k: v for k, v in old.items() if k not in LEGACY_MEANINGS})
    assert {k: legacy.to_dict()[k] for k in LEGACY_MEANINGS} == LEGACY_MEANINGS
    assert recorded_config(recorded) == build_config(recorded)
    with pytest.raises(KeyError):
        recorded_value(recorded, "no-such-key")
    assert set(LEGACY_MEANINGS) <= set(SCHEMA)


def test_shared_example_noise_needs_secure_aggregation_and_one_gradient_per_round() -> None:
    import pytest

    from confide.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="needs secure-aggregation = true"):
        build_config({"example-dp-noise": "shared"})
    ok = build_config({"example-dp-noise": "shared", "secure-aggregation": True,
                       "dp-colluders": 1})
    assert ok.example_dp_noise == "shared" and ok.dp_colluders == 1
    for bad, why in (({"distributed-dp": True}, "exclude each other"),
                     ({"local-epochs": 2.0}, "one noisy gradient per round"),
                     ({"example-dp": False}, "needs example-dp"),
                     ({"grad-sample-mode": "ghost"}, "ghost")):
        with pytest.raises(ConfigError, match=why):
            build_config({"example-dp-noise": "shared", "secure-aggregation": True, **bad})
    with pytest.raises(ConfigError, match="example-dp-noise"):
        build_config({"example-dp-noise": "central"})


def test_shared_noise_mode_brings_its_measured_defaults_and_explicit_keys_win() -> None:
    from confide.config import SHARED_NOISE_DEFAULTS

    shared = build_config({"secure-aggregation": True, "example-dp-noise": "shared"})
    for key, value in SHARED_NOISE_DEFAULTS.items():
        assert shared.to_dict()[key] == value
    mine = build_config({"secure-aggregation": True, "example-dp-noise": "shared",
                         "rounds": 5, "batch-size": 200})
    assert (mine.rounds, mine.batch_size) == (5, 200)
    assert mine.server_optimizer == SHARED_NOISE_DEFAULTS["server-optimizer"]
    # resolved once: a replace() keeps what was resolved, and local mode is untouched
    assert mine.replace(seed=3).rounds == 5
    assert build_config({}).rounds == RunConfig().rounds


def test_auto_noise_is_shared_with_secure_aggregation_and_local_otherwise() -> None:
    from confide.config import SHARED_NOISE_DEFAULTS

    assert RunConfig().example_dp_noise == build_config({}).example_dp_noise == "local"
    secure = build_config({"secure-aggregation": True})
    assert secure.example_dp_noise == "shared"
    assert secure.rounds == SHARED_NOISE_DEFAULTS["rounds"]  # the mode's defaults come too
    assert RunConfig(secure_aggregation=True).example_dp_noise == "shared"
    # settings that exclude shared noise keep local noise, with the local defaults
    for other in ({"distributed-dp": True}, {"local-epochs": 2.0}, {"example-dp": False},
                  {"grad-sample-mode": "ghost"}, {"example-dp-noise": "local"}):
        cfg = build_config({"secure-aggregation": True, **other})
        assert cfg.example_dp_noise == "local" and cfg.rounds == RunConfig().rounds, other
    # config.toml records the resolved mode, never 'auto'
    assert secure.to_dict()["example-dp-noise"] == "shared"


def test_deployed_run_config_gets_the_mode_defaults_for_keys_left_at_the_app_default(
) -> None:
    import tomllib

    from confide.config import SHARED_NOISE_DEFAULTS, from_run_config

    app = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    shared = from_run_config({**app, "secure-aggregation": True})
    assert shared.example_dp_noise == "shared"
    assert shared.rounds == SHARED_NOISE_DEFAULTS["rounds"]
    assert shared.batch_size == SHARED_NOISE_DEFAULTS["batch-size"]
    mine = from_run_config({**app, "secure-aggregation": True, "rounds": 7})
    assert mine.rounds == 7  # changed by the user: wins
    assert from_run_config(app) == build_config({})  # local mode: the app defaults as they are
