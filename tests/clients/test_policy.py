"""A partner's own policy: floors the server cannot lower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.clients.identity import enrol
from confide.clients.policy import PartnerPolicy, PolicyError, PolicyRefusal
from confide.config import build_config
from confide.privacy.accountant import PartnerAccountant, Spend
from confide.privacy.mechanisms import SampledGaussian
from confide.server.federation import Federation
from confide.server.recovery import EveryPartnerFailed
from tests.inprocess import InProcessGrid, copy_message

RUN = {"model": "tiny", "clients": 2, "rounds": 1, "max-length": 16, "num-labels": 2,
       "batch-size": 16, "physical-batch-size": 16, "local-epochs": 0.04, "preflight": "off",
       "max-train-examples": 48, "max-eval-examples": 32}


@pytest.mark.parametrize(("config", "match"), [
    ({"max-delta": 1.5}, "max-delta = 1.5: allowed 0 < x < 1"),
    ({"max-delta": "small"}, "max-delta = 'small': allowed a number > 0"),
    ({"min-partners": 2.5}, "min-partners = 2.5: allowed an integer > 0"),
    ({"dp-colluders": -1}, "dp-colluders = -1: allowed an integer >= 0"),
    ({"max-run-epsilon": 0}, "max-run-epsilon = 0: allowed a number > 0"),
])
def test_bad_policy_values_name_the_key(config: dict, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        PartnerPolicy.from_node_config(config)


def test_delta_cap_defaults_to_a_tenth_of_one_over_rows() -> None:
    policy = PartnerPolicy()
    policy.check_run(build_config({"delta": 1e-4}), rows=500)  # cap 2e-4
    with pytest.raises(PolicyRefusal, match=r"delta 0.5 is above this partner's 0.0002 "
                                            r"\(the default cap 1/\(10 x 500 rows\)"):
        policy.check_run(build_config({"delta": 0.5, "allow-large-delta": True}), rows=500)
    with pytest.raises(PolicyRefusal, match="above this partner's 1e-06 \\(max-delta\\)"):
        PartnerPolicy(max_delta=1e-6).check_run(build_config({}), rows=10**9)


def test_noise_colluders_and_run_budget_floors() -> None:
    policy = PartnerPolicy.from_node_config({"min-noise-multiplier": 0.8, "dp-colluders": 1,
                                             "max-run-epsilon": 8.0})
    policy.check_noise(0.8)
    with pytest.raises(PolicyRefusal, match=r"0\.5 is below this partner's "
                                            r"min-noise-multiplier 0\.8"):
        policy.check_noise(0.5)
    policy.check_colluders(2)
    with pytest.raises(PolicyRefusal, match="assumes 0 colluding partners, fewer than"):
        policy.check_colluders(0)
    accountant = PartnerAccountant(1e-5, 100.0)
    step = SampledGaussian(1.0, 0.1, 50)
    accountant.record(Spend(step, 1, "run-a"))
    accountant.record(Spend(step, 2, "run-a"))  # run-a at 7.05; a third step: 8.60
    policy.check_run_budget(accountant, Spend(step, 1, "run-b"))  # another run: its own cap
    with pytest.raises(PolicyRefusal, match=r"round 3 would take this run to epsilon 8\.600"):
        policy.check_run_budget(accountant, Spend(step, 3, "run-a"))


def test_server_chosen_delta_is_refused_and_never_pinned(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes"
    lines = [enrol(nodes / f"node-{i}", delta=1e-5, max_epsilon=8.0) for i in (1, 2)]
    (nodes / "roster.txt").write_text("\n".join(lines))
    grid = InProcessGrid(2, state_root=nodes)
    cfg = build_config({**RUN, "delta": 0.5, "allow-large-delta": True,
                        "out": str(tmp_path / "run")})
    with pytest.raises(EveryPartnerFailed, match=r"delta 0\.5 is above this partner's"):
        Federation.open(grid, cfg, tmp_path / "run").run()
    for i in (1, 2):
        state = json.loads((nodes / f"node-{i}" / "node_state.json").read_text())
        assert state["accountant"]["delta"] == 1e-5 and state["accountant"]["history"] == []


def test_a_round_resent_to_drain_the_budget_is_refused(tmp_path: Path) -> None:
    """A malicious server re-sends round 1 of its run: the node trains it once, once more
    (a lost reply looks the same), and then refuses, whatever the message id."""
    nodes = tmp_path / "nodes"
    grid = InProcessGrid(2, state_root=nodes)
    cfg = build_config({**RUN, "out": str(tmp_path / "run")})
    fed = Federation.open(grid, cfg, tmp_path / "run")
    fed.run()
    replayed = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert replayed
    outcomes = []
    for _ in range(2):  # the same round, re-sent as new messages
        for reply in grid.send_and_receive([copy_message(m) for m in replayed]):
            outcomes.append(reply.error.reason if reply.has_error() else "trained")
    assert outcomes[:2] == ["trained", "trained"]
    assert all("trained 2 times already" in o for o in outcomes[2:])
    for i in (1, 2):
        history = json.loads((nodes / f"node-{i}" / "node_state.json").read_text())
        assert len(history["accountant"]["history"]) == 2  # the round and one re-send


def test_partner_config_settings_are_parsed_and_reach_every_virtual_partner(tmp_path: Path
                                                                            ) -> None:
    from flwr.app import Context, RecordDict

    from confide.clients.policy import (
        node_policy,
        parse_policy_setting,
        write_simulated_policies,
    )

    assert parse_policy_setting("max-delta=1e-6") == ("max-delta", 1e-6)
    assert parse_policy_setting("min-partners = 3") == ("min-partners", 3)
    with pytest.raises(PolicyError, match="KEY one of max-delta"):
        parse_policy_setting("delta=1e-6")
    with pytest.raises(PolicyError, match="min-partners = 1: allowed"):
        parse_policy_setting("min-partners=1")
    write_simulated_policies(tmp_path, 2, {"min-partners": 3, "dp-colluders": 1})
    cfg = build_config({"out": str(tmp_path)})
    for partition in (0, 1):
        context = Context(run_id=1, node_id=1, node_config={"partition-id": partition},
                          state=RecordDict(), run_config={})
        policy = node_policy(context, cfg)
        assert (policy.min_partners, policy.dp_colluders) == (3, 1)


def test_a_simulated_partners_lifetime_cap_comes_from_its_node_config(tmp_path: Path
                                                                     ) -> None:
    from flwr.app import Context, RecordDict

    from confide.clients.budget import node_max_epsilon
    from confide.clients.policy import write_simulated_policies

    write_simulated_policies(tmp_path, 1, {"max-epsilon": 2.5})
    cfg = build_config({"out": str(tmp_path), "max-epsilon": 8.0})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                      state=RecordDict(), run_config={})
    assert node_max_epsilon(cfg, context) == 2.5
