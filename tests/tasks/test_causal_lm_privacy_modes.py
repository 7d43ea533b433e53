"""The causal-lm task under every privacy mode the classifier has: local
example DP, secure aggregation with the example noise shared inside the secure sum (the
default with secure aggregation), and secure aggregation with distributed DP. The real
ClientApp and server round loop run in-process (tests.inprocess); the audit verifies each
run's ledger and replays its epsilons. The trainer, secure sum and ledger never ask which
task runs: the same code paths as the classification tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from confide.audit.verify import verify_run
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.server.federation import Federation
from tests.inprocess import InProcessGrid
from tests.tasks.test_causal_lm_task import write_csv

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROWS = [(f"name[Place {i}], food[{food}]", f"Place {i} serves {food} food.")
        for i in range(12) for food in ("Chinese", "Italian", "French")]
MODES = {
    "local": {},
    "secure-shared": {"secure-aggregation": True},
    "secure-distributed": {"secure-aggregation": True, "distributed-dp": True},
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("mode", list(MODES))
def test_causal_lm_runs_and_verifies_under_each_privacy_mode(tmp_path: Path, mode: str
                                                             ) -> None:
    data = write_csv(tmp_path / "e2e.csv", rows=ROWS)
    out = tmp_path / "run"
    cfg = build_config({"task": "causal-lm", "model": "tiny", "data": str(data),
                        "eval-data": str(data), "prompt-column": "mr",
                        "completion-column": "ref", "clients": 3, "rounds": 2,
                        "max-length": 24, "batch-size": 12, "physical-batch-size": 12,
                        "target-epsilon": 8.0, "max-epsilon": 8.0, "preflight": "off",
                        "generate-prompts": 2, "max-new-tokens": 4, "seed": 5,
                        "out": str(out), **MODES[mode]})
    assert cfg.example_dp_noise == ("shared" if mode == "secure-shared" else "local")
    summary = Federation.open(InProcessGrid(3), cfg, out).run()
    assert summary["rounds_completed"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perplexity"] > 1.0 for r in rows)
    eps = summary["privacy"]["example_level"]
    assert len(eps) == 3 and all(0 < e <= 8.0 + 1e-6 for e in eps.values())
    types = [json.loads(x)["type"] for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert types.count(E.EXAMPLE_DP) == 6  # 3 partners x 2 rounds
    if mode == "secure-shared":
        assert all(r["shared_noise_shares"] >= 1 for r in rows)
    if mode != "local":
        assert all(r["secagg_survivors"] == 3 for r in rows)
    if mode == "secure-distributed":
        assert summary["privacy"]["client_level_epsilon"] > 0  # distributed DP accounted
    result = verify_run(out)
    assert result.ok, [str(p) for c in result.checks for p in c.problems]
