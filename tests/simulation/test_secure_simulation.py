"""End to end in Flower's simulation engine with secure aggregation and distributed DP:
tiny model, 8 partners, 25 % injected dropouts at the masked-input stage, verify-secagg."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.audit.verify import verify_run
from confide.clients.faults import planned_dropouts
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.simulation.runner import simulate

SEED = 8  # with rate 0.25: partition 7 drops in round 1, partitions 0 and 2 in round 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("secure-sim")
    cfg = build_config({
        "model": "tiny", "fine-tune": "lora", "rounds": 2, "clients": 8, "seed": SEED,
        "max-train-examples": 240, "max-eval-examples": 80, "max-length": 16,
        "noise-multiplier": 1.0, "batch-size": 8, "physical-batch-size": 8,
        "learning-rate": 0.05, "secure-aggregation": True, "distributed-dp": True,
        "client-dp-noise-multiplier": 0.05, "client-dp-clipping-norm": 1.0,
        "dropout-rate": 0.25, "dropout-stage": "masked-input", "verify-secagg": True,
        # t = 4 of each 7-party neighbourhood, so that 5 of 8 survivors still release a sum
        "secagg-threshold": 0.51, "out": str(root / "run")})
    out, _ = simulate(cfg)
    return out


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_secure_rounds_match_the_plaintext_sum(run_dir: Path) -> None:
    assert planned_dropouts(SEED, 1, range(8), 0.25) == [7]
    metrics = rows(run_dir)
    assert [r["round"] for r in metrics] == [1, 2]
    for r in metrics:
        assert r["secagg_aborted"] is None
        assert r["secagg_max_abs_error"] <= r["secagg_quantization_step"]
        assert r["secagg_ring_sum_equal"] is True  # aggregate == plaintext sum of survivors
        assert r["num_clients_sampled"] == 8
        assert r["bytes_uploaded"] > 0
        assert r["epsilon_client_level"] is not None and r["epsilon_client_level"] > 0
    # round 1 loses partition 7; it also missed round 2's key shares (folded), and
    # partitions 0 and 2 drop in round 2
    assert [r["secagg_survivors"] for r in metrics] == [7, 5]
    assert metrics[1]["epsilon_client_level"] > metrics[0]["epsilon_client_level"]
    assert metrics[0]["accuracy"] != metrics[1]["accuracy"] or \
        metrics[0]["loss"] != metrics[1]["loss"]


def test_summary_and_ledger(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["secure_aggregation"] is True and summary["distributed_dp"] is True
    assert summary["privacy"]["client_level_epsilon"] == rows(run_dir)[-1]["epsilon_client_level"]
    entries = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    kinds = [e.get("type") for e in entries]
    assert kinds.count(E.SECURE_AGGREGATION) == 2 and kinds.count(E.CLIENT_DP) == 2
    assert kinds.count(E.EXAMPLE_DP) == 12  # example-level receipts still flow: 7 + 5


def test_audit_verify_passes(run_dir: Path) -> None:
    report = verify_run(run_dir)
    assert report.ok, report
