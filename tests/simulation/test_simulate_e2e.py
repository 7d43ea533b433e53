"""End to end in Flower's simulation engine (Ray): tiny model, 3 partners, 2-3 rounds."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from confide.config import build_config
from confide.data import synthetic_sentiment
from confide.simulation.runner import simulate

CONTRACT_FILES = ["config.toml", "metrics.jsonl", "summary.json", "ledger.jsonl",
                  "report.html", "model/weights.safetensors", "model/model_info.json"]
METRIC_KEYS = {"round", "num_clients_sampled", "num_clients_aggregated", "accuracy", "loss",
               "epsilon_example_level", "epsilon_client_level", "bytes_uploaded", "seconds"}


def write_partner_files(folder: Path, sizes: list[int]) -> None:
    folder.mkdir()
    data = synthetic_sentiment(sum(sizes) + 100, seed=5)
    start = 0
    for i, n in enumerate(sizes):
        with (folder / f"partner{i}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            for t, label in zip(data.texts[start:start + n], data.labels[start:start + n],
                                strict=True):
                w.writerow([t, int(label)])
        start += n
    with (folder.parent / "eval.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for t, label in zip(data.texts[start:], data.labels[start:], strict=True):
            w.writerow([t, int(label)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 partners; partner 2 has few rows, so with a fixed noise multiplier its sampling
    rate and epsilon per round are highest and its budget runs out in round 2 (under DP a
    partner plans with its public row count, rounded up to at least 100: 100 rows give
    epsilon 2.52 after one round and 3.15 after two, 480 rows 1.02 / 1.27 / 1.48)."""
    root = tmp_path_factory.mktemp("sim")
    write_partner_files(root / "partners", [480, 480, 100])
    cfg = build_config({
        "model": "tiny", "fine-tune": "lora", "rounds": 3, "clients": 3,
        "data": str(root / "partners"), "eval-data": str(root / "eval.csv"),
        "noise-multiplier": 1.0, "batch-size": 8, "physical-batch-size": 8,
        "local-epochs": 1.0, "max-epsilon": 3.0, "target-epsilon": 3.0, "max-length": 24,
        "learning-rate": 0.01, "seed": 3, "out": str(root / "run")})
    out, _ = simulate(cfg)
    return out


def test_output_contract(run_dir: Path) -> None:
    for name in CONTRACT_FILES:
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(r) >= METRIC_KEYS
        assert 0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0
        assert r["num_clients_sampled"] == 3
        assert r["bytes_uploaded"] > 0 and r["seconds"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert set(summary["final_metrics"]) == {"accuracy", "loss"}
    assert summary["privacy"]["delta"] == 1e-5
    assert summary["privacy"]["example_level"] == rows[-1]["epsilon_example_level"]
    assert summary["secure_aggregation"] is False and summary["distributed_dp"] is False
    assert "<img" in (run_dir / "report.html").read_text()


def test_epsilon_cumulative_and_budget_guard(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    partners = set(rows[0]["epsilon_example_level"])
    assert len(partners) == 3
    refused = {p for r in rows for p in r["refused"]}
    assert len(refused) == 1, "exactly the small partner runs out of budget"
    small = refused.pop()
    for p in partners:
        series = [r["epsilon_example_level"][p] for r in rows]
        assert all(e <= 3.0 for e in series), f"{p} passed max-epsilon: {series}"
        trained = [r for r in rows if p not in r["refused"]]
        eps = [r["epsilon_example_level"][p] for r in trained]
        assert all(b > a for a, b in itertools.pairwise(eps)), f"{p}: {eps}"
    # the refused partner is excluded from aggregation in the rounds it refused
    for r in rows:
        if small in r["refused"]:
            assert r["num_clients_aggregated"] == 2
            assert r["epsilon_example_level"][small] == rows[0]["epsilon_example_level"][small]
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    refusals = [e for e in ledger if e["type"] == "budget_refusal"]
    assert refusals and all(e["payload"]["partner"] == small for e in refusals)


def test_summary_has_the_full_partner_table(run_dir: Path) -> None:
    """summary.json: one row per partner (the console summarises above 20 partners)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    table = summary["partners"]
    assert [t["partner"] for t in table] == sorted(summary["privacy"]["example_level"])
    for t in table:
        p = t["partner"]
        assert t["epsilon"] == summary["privacy"]["example_level"][p]
        assert t["epsilon_rdp"] == summary["privacy"]["example_level_rdp"][p]
        assert t["refused_rounds"] == [r["round"] for r in rows if p in r["refused"]]
        assert t["rounds_trained"] == [r["round"] for r in rows if p not in r["refused"]]
