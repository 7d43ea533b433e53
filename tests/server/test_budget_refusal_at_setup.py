"""A secure run whose sampled partners have no budget left stops in the set-up's first stage:
each node answers the advertise request with a signed refusal of stage "budget" (its
BudgetExhausted reason), and the server stops the run there (`NoBudgetLeft`, the same
message family as a plain run's), without asking anyone to share keys. The refusals stay in
the round's secure_aggregation entry, and the stopped run's ledger verifies.

The nodes are the real ClientApp (in process). The first tests script the refusal on the
wire exactly as the contract says (`refusal/<q>/budget` in the SECAGG_UP record, signed with
the node's own identity, `secagg.identity.sign_refusal`), so the server's half is tested
alone; the last lets the nodes' own budget check refuse after an earlier run spent it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from confide import wire as W
from confide.audit.verify import main as verify_main
from confide.clients.identity import node_identity
from confide.config import RunConfig, build_config, from_flat_record
from confide.privacy import ledger_events as E
from confide.privacy.secagg.identity import sign_refusal
from confide.server.federation import Federation
from confide.server.recovery import NoBudgetLeft
from tests.inprocess import InProcessGrid, tiny_secure_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REASON = ("privacy budget exhausted: spent epsilon 8.0000, this round would reach 8.6000 > "
          "max-epsilon 8.0000")


class SpentBudget(InProcessGrid):
    """Nodes in `spent` refuse every advertise request for their budget; every message the
    server sends is kept (`sent`) so the test can tell which stages ran."""

    def __init__(self, nodes: int, state_root: Path, spent: set[int]) -> None:
        super().__init__(nodes, state_root=state_root)
        self.spent = spent

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        refusing = [m for m in messages if self._advertise(m) and
                    m.metadata.dst_node_id in self.spent]
        replies = list(super().send_and_receive(
            [m for m in messages if m not in refusing], timeout=timeout))
        for msg in refusing:
            self._enrol(msg)
            self.sent.append(msg)
            replies.append(self._refusal(msg))
        return replies

    @staticmethod
    def _advertise(msg: Message) -> bool:
        down = msg.content.config_records.get(W.SECAGG)
        return down is not None and bool(json.loads(str(down.get(W.ADVERTISE, "[]"))))

    def _refusal(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        cfg = from_flat_record(dict(msg.content[W.CONFIG]))
        key, _ = node_identity(self.contexts[node], cfg)
        down = msg.content[W.SECAGG]
        up = ConfigRecord()
        for q in json.loads(str(down[W.ADVERTISE])):
            session = W.config_from_json(str(down[f"config/{q}"])).session_id
            up[f"error/{q}/budget"] = REASON
            up[f"{W.REFUSAL}/{q}/budget"] = json.dumps(
                sign_refusal(key, session, int(q), "budget", REASON))
        reply = Message(RecordDict({W.SECAGG_UP: up}), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = node
        return reply


def _config(out: Path) -> RunConfig:
    return tiny_secure_config(out, clients=3, rounds=2, seed=5)


def _stages(grid: InProcessGrid) -> set[str]:
    keys = set()
    for msg in grid.sent:
        down = msg.content.config_records.get(W.SECAGG)
        keys.update(k.split("/")[0] for k in (down or {}))
    return keys


def test_every_partner_refusing_the_setup_for_budget_stops_before_sharing_keys(
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    grid = SpentBudget(3, tmp_path / "nodes", spent={1, 2, 3})
    with pytest.raises(NoBudgetLeft) as caught:
        Federation.open(grid, _config(out), out).run()
    message = str(caught.value)
    assert "every partner refused round 1 because its privacy budget is spent" in message
    assert message.count(REASON) == 3 and "lifetime budget" in message
    stages = _stages(grid)
    assert W.ADVERTISE in stages
    assert W.KEY_DIRECTORY not in stages and W.MASKED_REQUEST not in stages, stages
    assert not any(m.metadata.message_type == "train" for m in grid.sent)
    entries = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert [e["type"] for e in entries][-2:] == [E.ROUND_CONFIGURED, E.SECURE_AGGREGATION]
    secure = entries[-1]["payload"]
    assert secure["participants"] == [] and len(secure["dropouts"]) == 3
    assert [(r["round"], r["stage"], r["reason"]) for r in secure["refusals"]] == \
        [(1, "budget", REASON)] * 3
    assert not (out / "summary.json").exists()
    assert verify_main([str(out)]) == 3  # intact, and not a finished run: INCOMPLETE


def test_one_partner_without_budget_is_a_dropout_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "run"
    grid = SpentBudget(3, tmp_path / "nodes", spent={3})
    summary = Federation.open(grid, _config(out), out).run()
    assert summary["rounds_completed"] == 2
    assert W.KEY_DIRECTORY in _stages(grid)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["secagg_survivors"] for r in rows] == [2, 2]


def test_partners_whose_budget_an_earlier_run_spent_refuse_before_sharing_keys(
        tmp_path: Path) -> None:
    """The same with the nodes' own budget check: a first secure run (local noise: a node
    knows its planned spend before advertising) spends each partner's whole lifetime
    budget (max-epsilon = target-epsilon); the next run stops in its set-up."""
    nodes = tmp_path / "nodes"

    def run(out: Path) -> tuple[InProcessGrid, Federation]:
        grid = InProcessGrid(3, state_root=nodes)
        for context in grid.contexts.values():
            context.node_config["max-epsilon"] = 8.0
        cfg = build_config({**_config(out).to_dict(), "rounds": 1, "target-epsilon": 8.0,
                            "max-epsilon": 8.0, "example-dp-noise": "local",
                            "local-epochs": 0.04, "max-train-examples": 48,
                            "max-eval-examples": 32})
        return grid, Federation.open(grid, cfg, out)

    _, fed = run(tmp_path / "study-1")
    assert fed.run()["rounds_completed"] == 1
    second = tmp_path / "study-2"
    grid, fed = run(second)
    with pytest.raises(NoBudgetLeft) as caught:
        fed.run()
    assert "every partner refused round 1 because its privacy budget is spent" in \
        str(caught.value)
    assert W.KEY_DIRECTORY not in _stages(grid)
    assert not any(m.metadata.message_type == "train" for m in grid.sent)
    entries = [json.loads(x) for x in (second / "ledger.jsonl").read_text().splitlines()]
    secure = [e["payload"] for e in entries if e["type"] == E.SECURE_AGGREGATION]
    assert len(secure) == 1 and {r["stage"] for r in secure[0]["refusals"]} == {"budget"}
    assert not [e for e in entries if e["type"] in (E.EXAMPLE_DP, E.ROUND_COMPLETED)]
