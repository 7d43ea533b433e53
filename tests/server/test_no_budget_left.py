"""Partners following the docs (`--max-epsilon 8`, the default
`target-epsilon 8`) spend their whole lifetime budget in one run. The next run must not go
through every round with every partner refusing and finish "successfully" with nothing
aggregated: it stops at round 1 and says why, with each partner's remaining budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.audit.verify import main as verify_main
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.server.federation import Federation
from confide.server.recovery import NoBudgetLeft
from tests.inprocess import InProcessGrid

DOCS = {"model": "tiny", "clients": 2, "rounds": 1, "max-length": 16, "num-labels": 2,
        "batch-size": 16, "physical-batch-size": 16, "local-epochs": 0.04, "preflight": "off",
        "target-epsilon": 8.0, "max-epsilon": 8.0, "max-train-examples": 48,
        "max-eval-examples": 32}


def run(out: Path, nodes: Path) -> dict:
    grid = InProcessGrid(2, state_root=nodes)
    for context in grid.contexts.values():
        context.node_config["max-epsilon"] = 8.0  # `confide deploy supernode --max-epsilon 8`
    return Federation.open(grid, build_config({**DOCS, "out": str(out)}), out).run()


def test_second_run_with_every_budget_spent_stops_before_training_and_says_why(
        tmp_path: Path) -> None:
    first = run(tmp_path / "study-1", tmp_path / "nodes")
    assert first["rounds_completed"] == 1
    assert all(7.0 < e <= 8.0 for e in first["privacy"]["example_level"].values())
    with pytest.raises(NoBudgetLeft) as caught:
        run(tmp_path / "study-2", tmp_path / "nodes")
    message = str(caught.value)
    assert "every partner refused round 1" in message
    for partner in first["privacy"]["example_level"]:
        assert f"{partner}: spent" in message and "of its max-epsilon 8" in message
    assert "lifetime budget" in message and "smallest remaining budget" in message
    second = tmp_path / "study-2"
    # nothing was trained, evaluated or written as a result; the refusals are recorded
    assert not (second / "summary.json").exists()
    metrics = second / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""
    types = [json.loads(x)["type"] for x in (second / "ledger.jsonl").read_text().splitlines()]
    assert types.count(E.BUDGET_REFUSAL) == 2 and E.EXAMPLE_DP not in types
    assert types[-1] == E.BUDGET_REFUSAL and E.ROUND_COMPLETED not in types
    # the stopped run's record is intact, and not that of a finished run: INCOMPLETE
    assert verify_main([str(second)]) == 3
