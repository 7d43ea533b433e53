"""Under secure aggregation a node's receipt binds the masked vector it sent (the server
never sees its delta), the run and the model it trained from; it countersigns the ledger
head each train message names, and keeps a receipt pending until a countersigned head
covers it. Real ClientApp, tiny model, through the in-process grid."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Message

from confide import wire as W
from confide.audit.partner import audit_partner
from confide.clients.node_state import STATE_FILE, NodeState
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.privacy.receipts import receipt_binding, update_digest
from confide.server.federation import Federation
from tests.inprocess import InProcessGrid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NODES, ROUNDS = 3, 2


class KeepsMaskedInputs(InProcessGrid):
    """Remembers, per (node, round), the masked vector each train reply carried."""

    masked: dict[tuple[int, int], str]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        rounds = {m.metadata.dst_node_id: int(m.content[W.CONFIG][W.ROUND]) for m in messages
                  if m.metadata.message_type == "train"}
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for r in replies:
            node = r.metadata.src_node_id
            if node in rounds and not r.has_error() and W.MASKED in r.content.array_records:
                self.masked[(node, rounds[node])] = update_digest(
                    {"vector": r.content[W.MASKED]["vector"].numpy()})
        return replies


def test_secure_receipts_bind_the_masked_vector_and_heads_release_them(
        tmp_path: Path) -> None:
    out, states = tmp_path / "run", tmp_path / "nodes"
    cfg = build_config({"model": "tiny", "clients": NODES, "rounds": ROUNDS,
                        "max-length": 16, "num-labels": 2, "batch-size": 32,
                        "physical-batch-size": 32, "secure-aggregation": True,
                        "preflight": "off", "seed": 3, "out": str(out)})
    grid = KeepsMaskedInputs(NODES, state_root=states)
    grid.masked = {}
    Federation.open(grid, cfg, out).run()
    ledger = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    run_key = ledger[0]["payload"]["ledger_public_key"]
    models = {e["payload"]["round"]: e["payload"]["sha256"] for e in ledger
              if e["type"] == E.MODEL_DIGEST}
    for node in range(1, NODES + 1):
        state = NodeState.from_json((states / f"node-{node}" / STATE_FILE).read_text(),
                                    cfg.delta, cfg.max_epsilon)
        receipts = [e["payload"]["receipt"] for e in ledger if e["type"] == E.EXAMPLE_DP
                    and e["payload"]["partner"] == state.pseudonym]
        assert len(receipts) == ROUNDS
        for receipt in receipts:
            r = receipt["payload"]["round"]
            bound = receipt_binding(receipt)
            assert bound is not None and bound.run == run_key
            assert bound.update_sha256 == grid.masked[(node, r)]
            if r > 1:
                assert bound.model_sha256 == models[r - 1]
        # round 2 countersigned the head after round 1: only round 2's receipt is pending
        pending = state.unrecorded_receipts(run_key, None)
        assert [json.loads(p)["payload"]["round"] for p in pending] == [ROUNDS]
        assert [h.round for h in state.records[run_key].heads] == [1, 2]
        result = audit_partner(states / f"node-{node}", out)
        assert result.ok, result.problems
    counters = [e for e in ledger if e["type"] == E.HEAD_COUNTERSIGNED]
    assert len(counters) == NODES * ROUNDS
