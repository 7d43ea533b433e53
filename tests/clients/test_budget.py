"""The budget asked before the secure set-up (confide.clients.budget): a node that cannot
afford a round refuses when asked to advertise keys for it, with a signed "budget" refusal
and no keys; a node that can afford it advertises as before."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from confide import wire as W
from confide.clients import client_app
from confide.clients.identity import enrol
from confide.clients.node_state import load_node_state, save_node_state
from confide.clients.secure_client import BUDGET_STAGE, ClientStore
from confide.config import RunConfig, build_config
from confide.privacy.accountant import Spend
from confide.privacy.mechanisms import SampledGaussian
from confide.privacy.secagg import AdvertiseKeys, SecAggRefusal, SecAggServer
from confide.privacy.secagg.identity import refusal_verifies

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RUN_KEY = "ab" * 32
BASE = {"model": "tiny", "clients": 2, "rounds": 2, "max-length": 16, "num-labels": 2,
        "batch-size": 8, "local-epochs": 0.01, "noise-multiplier": 1.0, "preflight": "off",
        "secure-aggregation": True, "max-epsilon": 4.0}
MODES = {"local noise": {"example-dp-noise": "local"},
         "shared noise": {"example-dp-noise": "shared", "local-epochs": 1.0}}
# an earlier run's spend: far past max-epsilon 4 on its own
SPENT = SampledGaussian(0.5, 1.0, 40)
# a small earlier spend: well within max-epsilon 4
SOME = SampledGaussian(2.0, 0.01, 5)


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def partner(tmp_path: Path, cfg: RunConfig, spent: SampledGaussian | None,
            **node_config: Any) -> Context:
    """An enrolled partner (alone on the roster), with `spent` in its history (an earlier
    run's)."""
    state_dir = tmp_path / "node"
    line = enrol(state_dir, delta=cfg.delta, max_epsilon=cfg.max_epsilon)
    (tmp_path / "roster.txt").write_text(line + "\n")
    context = Context(1, 7, {"state-dir": str(state_dir),
                             "federation-roster": str(tmp_path / "roster.txt"),
                             **node_config}, RecordDict(), {})
    if spent is not None:
        state = load_node_state(context, delta=cfg.delta, max_epsilon=cfg.max_epsilon,
                                state_dir=state_dir)
        state.accountant.record(Spend(spent, 3, "cd" * 32))
        save_node_state(context, state, state_dir)
    return context


def advertise(cfg: RunConfig, context: Context, q: int = 1) -> tuple[ConfigRecord, bytes]:
    """The set-up's advertise stage for round q, as the server sends it; the reply's
    secure-aggregation record, and the session id."""
    session = W.session_config(cfg, session_id=os.urandom(16), num_clients=2,
                               vector_length=5)
    down = ConfigRecord({W.SECAGG_ROUND: q, W.ADVERTISE: json.dumps([q]),
                         f"config/{q}": W.config_to_json(session), f"id/{q}": 1})
    config = ConfigRecord({**cfg.to_dict(), W.RUN_KEY: RUN_KEY})
    msg = Message(RecordDict({W.CONFIG: config, W.SECAGG: down}), dst_node_id=7,
                  message_type=W.SECAGG_MESSAGE_TYPE)
    reply = client_app.secagg_stage(msg, context)
    assert not reply.has_error()
    return reply.content[W.SECAGG_UP], session.session_id


@pytest.mark.parametrize("mode", list(MODES))
def test_a_node_with_spent_budget_refuses_at_the_advertise_stage(tmp_path: Path,
                                                                 mode: str) -> None:
    cfg = build_config({**BASE, **MODES[mode], "out": str(tmp_path / "run")})
    context = partner(tmp_path, cfg, SPENT)
    up, session = advertise(cfg, context)

    assert f"{W.ADVERTISE}/1" not in up  # no keys: the set-up learns it now
    with pytest.raises(SecAggRefusal):
        ClientStore(context).config(1)  # and nothing kept for the round
    refusal = json.loads(str(up[f"{W.REFUSAL}/1/{BUDGET_STAGE}"]))
    assert refusal_verifies(refusal)
    assert refusal["stage"] == "budget" and refusal["round"] == 1
    assert refusal["session"] == session.hex()
    assert "privacy budget exhausted" in str(refusal["reason"])
    assert up[f"error/1/{BUDGET_STAGE}"] == refusal["reason"]
    # signed by the partner's identity on the roster
    roster = (tmp_path / "roster.txt").read_text()
    assert str(refusal["identity"]) in roster
    # a forged reason no longer verifies
    assert not refusal_verifies({**refusal, "reason": "nothing to see"})


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("spent", [None, SOME], ids=["fresh", "some spent"])
def test_a_node_with_budget_advertises_as_before(tmp_path: Path, mode: str,
                                                 spent: SampledGaussian | None) -> None:
    cfg = build_config({**BASE, **MODES[mode], "out": str(tmp_path / "run")})
    context = partner(tmp_path, cfg, spent)
    up, session = advertise(cfg, context)

    assert not [k for k in up if str(k).startswith((W.REFUSAL, "error/"))]
    keys = AdvertiseKeys.from_bytes(bytes(up[f"{W.ADVERTISE}/1"]))
    assert keys.sender == 1
    assert ClientStore(context).config(1).session_id == session
    # the server takes the keys as from any node
    server = SecAggServer(ClientStore(context).config(1), 1)
    server.receive(keys)


def test_the_run_cap_of_the_partners_policy_refuses_at_the_advertise_stage(
        tmp_path: Path) -> None:
    """max-run-epsilon: the run's own epsilon with round q included, as the round's own
    check computes it."""
    cfg = build_config({**BASE, **MODES["local noise"], "out": str(tmp_path / "run")})
    context = partner(tmp_path, cfg, None, **{"max-run-epsilon": 1e-3})
    up, _ = advertise(cfg, context)

    assert f"{W.ADVERTISE}/1" not in up
    refusal = json.loads(str(up[f"{W.REFUSAL}/1/{BUDGET_STAGE}"]))
    assert refusal_verifies(refusal)
    assert "max-run-epsilon" in str(refusal["reason"])


def test_a_node_affording_round_one_but_not_round_two_refuses_round_two_only(
        tmp_path: Path) -> None:
    """The planned spend is round q's on top of what is spent: a cap just above one round's
    epsilon lets round 1 through and refuses round 2 once round 1 is spent."""
    cfg = build_config({**BASE, **MODES["local noise"], "out": str(tmp_path / "run")})
    context = partner(tmp_path, cfg, None)
    up, _ = advertise(cfg, context, q=1)
    assert f"{W.ADVERTISE}/1" in up
    # round 1 spent (as its training round would record it), then the cap between one and
    # two rounds' epsilon
    state = load_node_state(context, delta=cfg.delta, max_epsilon=cfg.max_epsilon,
                            state_dir=tmp_path / "node")
    from confide.clients.budget import _local_plan
    from confide.clients.policy import node_policy

    one = _local_plan(_message(cfg), context, cfg, 1, RUN_KEY, state,
                      node_policy(context, cfg))
    state.accountant.record(Spend(one, 1, RUN_KEY))
    save_node_state(context, state, tmp_path / "node")
    first = state.accountant.epsilon()
    second = state.accountant.epsilon_if(Spend(one, 2, RUN_KEY))
    capped = build_config({**BASE, **MODES["local noise"], "out": str(tmp_path / "run"),
                           "max-epsilon": (first + second) / 2})
    up, _ = advertise(capped, context, q=2)
    assert f"{W.ADVERTISE}/2" not in up
    assert refusal_verifies(json.loads(str(up[f"{W.REFUSAL}/2/{BUDGET_STAGE}"])))


def _message(cfg: RunConfig) -> Message:
    config = ConfigRecord({**cfg.to_dict(), W.RUN_KEY: RUN_KEY})
    return Message(RecordDict({W.CONFIG: config}), dst_node_id=7,
                   message_type=W.SECAGG_MESSAGE_TYPE)
