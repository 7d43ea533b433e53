"""End to end in Flower's simulation engine: example-level DP with the noise shared inside
secure aggregation (example-dp-noise = 'shared'), tiny model, 3 partners, 2 rounds. The
audit verifies the run and the claimed epsilons replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.audit.verify import verify_run
from confide.clients.disclosure import public_rows
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.privacy.accountant import calibrate_noise, pld_epsilon
from confide.privacy.mechanisms import SharedNoiseSampledGaussian
from confide.privacy.replay import replay_example_level
from confide.simulation.runner import simulate

TARGET = 4.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shared-sim")
    cfg = build_config({
        "model": "tiny", "fine-tune": "lora", "rounds": 2, "clients": 3, "seed": 3,
        "max-train-examples": 120, "max-eval-examples": 40, "max-length": 16,
        "target-epsilon": TARGET, "max-epsilon": 10.0, "batch-size": 16,
        "physical-batch-size": 16, "secure-aggregation": True,
        "example-dp-noise": "shared", "server-optimizer": "adam",
        "server-learning-rate": 0.01, "server-momentum": 0.9, "out": str(root / "run")})
    out, _ = simulate(cfg)
    return out


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _example_events(run_dir: Path) -> list[E.ExampleDpEvent]:
    entries = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    return [E.ExampleDpEvent.from_payload(e["payload"]) for e in entries
            if e.get("type") == E.EXAMPLE_DP]


def test_shared_rounds_release_one_noisy_gradient_each(run_dir: Path) -> None:
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["secagg_aborted"] is None and r["secagg_survivors"] == 3
        assert r["shared_noise_shares"] >= 1
        # one rate q for all: sum_i q n_i = batch-size, the federation's expected batch
        assert r["shared_expected_batch"] == pytest.approx(16)
    assert rows[0]["accuracy"] != rows[1]["accuracy"] or rows[0]["loss"] != rows[1]["loss"]


def test_ledger_records_the_shared_mechanism_per_partner(run_dir: Path) -> None:
    events = _example_events(run_dir)
    assert len(events) == 6  # 3 partners x 2 rounds
    sigma = {e.noise_multiplier for e in events}
    assert len(sigma) == 1  # one sigma per run
    rates = {e.sample_rate for e in events}
    for e in events:
        m = e.mechanism
        assert isinstance(m, SharedNoiseSampledGaussian)
        assert m.steps == 1 and m.colluders == 0
        assert m.noise_shares >= 1 and 0 < m.tv_slack < 1e-6
        assert e.receipt is not None and e.receipt["payload"]["noise"] == "shared"
    # one sampling rate for every partner (central DP-SGD on the union), calibrated so it
    # reaches the target after 2 rounds: every partner ends at the target
    assert len(rates) == 1
    q = rates.pop()
    from confide.config import load_toml
    from confide.tasks.inputs import federated_data

    partitions = federated_data(build_config(load_toml(run_dir / "config.toml"))).partitions
    # batch / all records, each partner's count as it declares it (rounded up: public)
    assert q == pytest.approx(16 / sum(public_rows(len(p)) for p in partitions))
    assert sigma.pop() == pytest.approx(calibrate_noise(TARGET, 1e-5, q, 2), rel=1e-9)
    finals = [e.epsilon_claimed for e in events if e.round == 2]
    assert all(f == pytest.approx(TARGET, rel=0.01) and f <= TARGET + 1e-9 for f in finals)
    replay = replay_example_level(events, 1e-5)
    for partner, rep in replay.items():
        mine = [e for e in events if e.partner == partner]
        assert rep.final == pytest.approx(mine[-1].epsilon_claimed, rel=0.01)
        assert pld_epsilon([e.mechanism for e in mine], 1e-5) == pytest.approx(
            mine[-1].epsilon_claimed)


def test_audit_verify_passes_and_checks_the_noise_shares(run_dir: Path, tmp_path: Path
                                                         ) -> None:
    report = verify_run(run_dir)
    assert report.ok, report
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["secure_aggregation"] is True
    # the plain (epsilon, delta')-DP statement with the sampler/discretisation slack of the
    # ledger's receipts: stated per partner, a hair above delta at the mode's 48 bits
    slack = summary["privacy"]["example_level_delta_with_slack"]
    assert set(slack) == set(summary["privacy"]["example_level"])
    assert all(1e-5 < d < 1.01e-5 for d in slack.values())
