"""One rule for spelling configuration keys: case and `_` / `-` do not matter (`Rounds`,
`target_epsilon` and `target-epsilon` are keys as the README lists them); one key spelt two
ways with different values is refused, naming both; an unknown key gets a 'did you mean'."""

from __future__ import annotations

from argparse import Namespace

import pytest

from confide.cli import main, resolve_config
from confide.config import ConfigError, build_config, normalise_key


@pytest.mark.parametrize("key", ["rounds", "Rounds", "ROUNDS", " rounds "])
def test_case_does_not_matter(key: str) -> None:
    assert normalise_key(key) == "rounds"
    assert build_config({key: 2}).rounds == 2


@pytest.mark.parametrize("key", ["target_epsilon", "target-epsilon", "Target_Epsilon"])
def test_underscore_and_dash_are_one_key(key: str) -> None:
    assert build_config({key: 2.0}).target_epsilon == 2.0


def test_one_key_spelt_twice_with_different_values_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"target-epsilon is given twice with different "
                                          r"values: target_epsilon = 3\.0 and target-epsilon"):
        build_config({"target_epsilon": 3, "target-epsilon": 8})
    assert build_config({"rounds": 2, "Rounds": "2"}).rounds == 2  # the same value: fine


@pytest.mark.parametrize(("typo", "meant"), [("rouds", "rounds"),
                                             ("target-epsilom", "target-epsilon"),
                                             ("max_epsilom", "max-epsilon"),
                                             ("noise-multipler", "noise-multiplier")])
def test_an_unknown_key_gets_a_did_you_mean(typo: str, meant: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown configuration key '{typo}' "
                                          rf"\(did you mean [^)]*{meant}"):
        build_config({typo: 1})


def test_set_keys_follow_the_rule_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    args = Namespace(config=None, set=["Rounds=2", "target_epsilon=3"],
                     **{flag[2:].replace("-", "_"): None for flag in (
                         "--rounds", "--clients", "--model", "--data", "--eval-data",
                         "--partitioner", "--target-epsilon", "--max-epsilon", "--delta",
                         "--fine-tune", "--seed", "--out", "--secagg-threshold",
                         "--secagg-neighbours", "--secagg-bits", "--dropout-rate",
                         "--dropout-stage")},
                     **{flag: False for flag in ("secure_aggregation", "distributed_dp",
                                                 "verify_secagg", "no_example_dp", "resume")})
    cfg = resolve_config(args)
    assert (cfg.rounds, cfg.target_epsilon) == (2, 3.0)
    # a flag and --set for one key, spelt another way, still must agree
    assert main(["simulate", "--target-epsilon", "3", "--set", "Target_Epsilon=8"]) == 2
    err = capsys.readouterr().err
    assert "target-epsilon is given twice with different values" in err
    assert main(["simulate", "--set", "Roundz=2"]) == 2
    assert "did you mean rounds" in capsys.readouterr().err
