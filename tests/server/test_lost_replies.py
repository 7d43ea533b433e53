"""A reply lost after the partner trained (the server died before recording it, or
the reply never arrived) is a real spend. The partner keeps the receipt until the server
acknowledges it and sends it again with its next reply of the run, whatever round that is;
the server records it then (`recorded_in_round`), so the ledger holds every release and the
audit's replay matches every claim. Before, only a re-ask of the same round recovered it: in
secure mode a resumed run may sample another cohort for the crashed round, and the ledger
then lacked the spend.

Real ClientApp and tiny model through the in-process grid (tests/inprocess.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from confide import wire as W
from confide.audit.verify import verify_run
from confide.clients.node_state import STATE_FILE, NodeState
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.privacy.accountant import epsilon_of
from confide.privacy.ledger import canonical_json, entry_hash_of, load_private_key
from confide.server.federation import Federation
from tests.inprocess import InProcessGrid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LOST_NODE, LOST_ROUND = 2, 1
BASE = {"model": "tiny", "rounds": 3, "max-length": 16, "num-labels": 2, "batch-size": 16,
        "physical-batch-size": 16, "max-eval-examples": 32, "preflight": "off", "seed": 5}


class LosesOneReply(InProcessGrid):
    """Node LOST_NODE trains in round `lost_round` (its state, budget included, is saved)
    but its reply never reaches the server, as after a timeout."""

    lost_round = LOST_ROUND

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        lose = any(m.metadata.dst_node_id == LOST_NODE and m.metadata.message_type == "train"
                   and int(m.content[W.CONFIG][W.ROUND]) == self.lost_round
                   for m in messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        return [r for r in replies if not (lose and r.metadata.src_node_id == LOST_NODE)]


def run_with_a_lost_reply(tmp_path: Path, nodes: int, **values: Any) -> tuple[Path, Path]:
    out, states = tmp_path / "run", tmp_path / "nodes"
    cfg = build_config({**BASE, "clients": nodes, "out": str(out), **values})
    summary = Federation.open(LosesOneReply(nodes, state_root=states), cfg, out).run()
    assert summary["rounds_completed"] == 3
    return out, states


def entries(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]


def check_nothing_lost(out: Path, states: Path) -> tuple[dict[str, Any], int]:
    """Every release the lost node's own accountant recorded for this run is in the
    ledger once; the one of the lost reply is recorded late, in the round of its next
    reply; the claim is the node's own epsilon; the audit passes. Returns that entry."""
    ledger = entries(out)
    run_key = ledger[0]["payload"]["ledger_public_key"]
    cfg = build_config(BASE)
    state = NodeState.from_json((states / f"node-{LOST_NODE}" / STATE_FILE).read_text(),
                                cfg.delta, cfg.max_epsilon)
    own = [s for s in state.accountant.history if s.run == run_key]
    recorded = [E.ExampleDpEvent.from_payload(e["payload"]) for e in ledger
                if e["type"] == E.EXAMPLE_DP
                and e["payload"]["partner"] == state.pseudonym]
    # the same releases in the same order (the lost one first, recorded with the next)
    assert [(e.round, e.mechanism.sampled_gaussian) for e in recorded] == [
        (s.round, s.mechanism.sampled_gaussian) for s in own]
    assert own[0].round == LOST_ROUND and len(own) >= 2
    assert [e.recorded_in_round for e in recorded] == [own[1].round] + [None] * (len(own) - 1)
    claimed = json.loads((out / "summary.json").read_text())["privacy"]["example_level"]
    assert claimed[state.pseudonym] == pytest.approx(
        epsilon_of([s.mechanism for s in own], cfg.delta), rel=1e-9)
    # what the node still holds unacknowledged is in the ledger (the run ended before a
    # message could acknowledge it)
    pending = state.unrecorded_receipts(run_key, None)
    signatures = {(e.receipt or {}).get("signature") for e in recorded}
    assert {json.loads(r)["signature"] for r in pending} <= signatures
    result = verify_run(out)
    assert result.ok, [str(p) for p in result.problems]
    return next(e for e in ledger if e["type"] == E.EXAMPLE_DP
                and e["payload"].get("recorded_in_round") is not None), len(pending)


def test_plain_run_records_the_lost_reply_with_the_next_one(tmp_path: Path) -> None:
    out, states = run_with_a_lost_reply(tmp_path, 3, **{"noise-multiplier": 1.1,
                                                         "local-epochs": 0.04})
    late, pending = check_nothing_lost(out, states)
    # round 3's message acknowledged rounds 1 and 2: only round 3's receipt is held
    assert pending == 1
    # the round lost one update: only two partners are in its aggregate
    done = [e["payload"] for e in entries(out) if e["type"] == E.ROUND_COMPLETED]
    assert len(done[0]["aggregated"]) == 2 and len(done[1]["aggregated"]) == 3
    assert late["payload"]["recorded_in_round"] == 2
    a_late_release_recorded_twice_or_out_of_place_fails_the_audit(out, late)


def test_secure_shared_noise_run_records_the_lost_reply_with_the_next_one(
        tmp_path: Path) -> None:
    out, states = run_with_a_lost_reply(tmp_path, 4, **{"secure-aggregation": True,
                                                         "batch-size": 32,
                                                         "physical-batch-size": 32})
    assert build_config({**BASE, "secure-aggregation": True}).example_dp_noise == "shared"
    check_nothing_lost(out, states)


def resigned(out: Path, ledger: list[dict[str, Any]]) -> list[str]:
    """Write `ledger` re-chained and re-signed with the run's key (the server holds it:
    only the audit can tell), and return the audit's problems."""
    key = load_private_key(out / "checkpoint" / "ledger_key.pem")
    prev = ledger[0]["prev_hash"]
    for entry in ledger:
        entry["prev_hash"] = prev
        entry["entry_hash"] = entry_hash_of(entry)
        entry["signature"] = key.sign(bytes.fromhex(entry["entry_hash"])).hex()
        prev = entry["entry_hash"]
    (out / "ledger.jsonl").write_bytes(b"".join(canonical_json(e) + b"\n" for e in ledger))
    return [str(p) for p in verify_run(out, pld=False).problems]


def a_late_release_recorded_twice_or_out_of_place_fails_the_audit(
        out: Path, late: dict[str, Any]) -> None:
    original = entries(out)
    i = original.index(late)
    twice = json.loads(json.dumps(original))
    twice.insert(i + 1, json.loads(json.dumps(late)))
    problems = resigned(out, twice)
    assert any("repeats a receipt the ledger already holds" in p for p in problems), problems
    in_its_own_round = json.loads(json.dumps(original))
    in_its_own_round[i]["payload"]["recorded_in_round"] = late["payload"]["round"]
    problems = resigned(out, in_its_own_round)
    assert f"[ordering] entry {i}: example_dp of round 1 out of order (round 2 is open)" \
        in problems, problems
    assert resigned(out, original) == []


def test_a_reply_lost_in_the_last_round_is_collected_before_the_run_ends(
        tmp_path: Path) -> None:
    """No later round asks the node again: the last round asks every node whose reply it
    did not record for the receipts its ledger lacks."""
    out, states = tmp_path / "run", tmp_path / "nodes"
    cfg = build_config({**BASE, "clients": 3, "out": str(out), "noise-multiplier": 1.1,
                        "local-epochs": 0.04})
    grid = LosesOneReply(3, state_root=states)
    grid.lost_round = 3
    Federation.open(grid, cfg, out).run()
    ledger = entries(out)
    state = NodeState.from_json((states / f"node-{LOST_NODE}" / STATE_FILE).read_text(),
                                cfg.delta, cfg.max_epsilon)
    own = [s.round for s in state.accountant.history
           if s.run == ledger[0]["payload"]["ledger_public_key"]]
    recorded = [e["payload"]["round"] for e in ledger if e["type"] == E.EXAMPLE_DP
                and e["payload"]["partner"] == state.pseudonym]
    assert own == recorded == [1, 2, 3]
    last = [e["payload"] for e in ledger if e["type"] == E.ROUND_COMPLETED][-1]
    assert state.pseudonym in last["replied"] and state.pseudonym not in last["aggregated"]
    claimed = json.loads((out / "summary.json").read_text())["privacy"]["example_level"]
    assert claimed[state.pseudonym] == pytest.approx(state.accountant.epsilon(), rel=1e-9)
    result = verify_run(out)
    assert result.ok, [str(p) for p in result.problems]
