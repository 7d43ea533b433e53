"""Shared noise (the default with secure aggregation) with a registered node that answers
every message with an error (seen in deployment: a node that refuses the app bundle). It
never reports its record count; the round goes on without it, as a dropout, instead of the
run failing with "shared noise: nodes [...] did not report their rows"."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Error, Message

from confide.audit.verify import verify_run
from confide.server.federation import Federation
from tests.inprocess import InProcessGrid, tiny_secure_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SILENT = 4


class OneSilentNode(InProcessGrid):
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(super().send_and_receive(
            [m for m in messages if m.metadata.dst_node_id != SILENT], timeout=timeout))
        for msg in messages:
            if msg.metadata.dst_node_id == SILENT:
                reply = Message(Error(code=0, reason="app bundle refused"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SILENT
                replies.append(reply)
        return replies


def test_a_node_that_never_reports_its_rows_is_a_dropout(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_secure_config(out, clients=4, rounds=2, seed=3)
    assert cfg.example_dp_noise == "shared"
    summary = Federation.open(OneSilentNode(4), cfg, out).run()
    assert summary["rounds_completed"] == 2
    assert len(summary["privacy"]["example_level"]) == 3  # the three that answered
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["secagg_aborted"] is None and r["secagg_survivors"] == 3
        assert r["secagg_dropouts"] == 1
    assert verify_run(out).ok
