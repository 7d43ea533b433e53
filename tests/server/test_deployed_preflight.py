"""A deployed shared-noise run (in-process grid: not the simulation engine, so the server
never sees the data split) checks its pre-flight right after the size exchange, before any
training message: one line before it, the full report after, saved in summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.privacy import ledger_events as E
from confide.privacy import preflight as P
from confide.server.exchange import is_simulation
from confide.server.federation import Federation
from tests.inprocess import InProcessGrid, tiny_secure_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")



def test_shared_noise_preflight_runs_after_the_size_exchange(
        tmp_path: Path, flwr_records: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    cfg = tiny_secure_config(out, clients=3, rounds=1, seed=3).replace(preflight="warn")
    grid = InProcessGrid(3)
    assert not is_simulation(grid) and cfg.privacy_mode.shared_noise
    seen: list[tuple[P.PreflightReport, list[str]]] = []
    fed = Federation.open(grid, cfg, out, on_preflight=lambda r: seen.append(
        (r, [m.metadata.message_type for m in grid.sent])))
    assert fed.preflight is None and seen == []  # nothing known yet: deferred, one line
    (before,) = [r.getMessage() for r in flwr_records.records
                 if "pre-flight" in r.getMessage()]
    assert "\n" not in before and "before round 1" in before
    summary = fed.run()
    (report, sent_before), = seen
    assert "train" not in sent_before and sent_before  # after the size exchange, before training
    assert report.partition_rows_known and report.rounds == 1
    (ex,) = report.mechanisms
    assert ex.mechanism == "example-dp (shared noise)" and ex.ratio is not None
    assert report.verdict == P.WEAK  # one round: one server step
    assert "server optimizer takes 1 step" in ex.reason
    assert summary["preflight"]["partition_rows_known"] is True
    assert summary["preflight"]["mechanisms"][0]["verdict"] == P.WEAK
    assert summary["rounds_completed"] == 1


def test_preflight_error_refuses_before_any_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # sigma 10,000: no round can carry signal, whatever the rows turn out to be
    cfg = tiny_secure_config(out, clients=3, rounds=1, seed=3).replace(
        preflight="error", noise_multiplier=10_000.0)
    grid = InProcessGrid(3)
    fed = Federation.open(grid, cfg, out)
    with pytest.raises(P.PreflightRefused, match="cannot learn"):
        fed.run()
    assert grid.sent and all(m.metadata.message_type != "train" for m in grid.sent)
    kinds = [json.loads(line)["type"] for line in fed.folder.ledger.read_text().splitlines()]
    assert kinds == [E.RUN_STARTED]  # nothing configured, nothing spent
