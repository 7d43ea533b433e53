"""A one-round run is said in the singular everywhere it is counted: the simulate console,
the pre-flight line, verify's checks and verdict, the report and a refused resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.audit.report import write_report
from confide.audit.verify import main as verify_main
from confide.cli import main
from confide.config import build_config
from confide.logs import plural
from confide.privacy import preflight as P
from confide.server.federation import Federation
from confide.server.recovery import ResumeRefused, check_not_finished
from confide.server.run_folder import RunFolder
from tests.inprocess import InProcessGrid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ONE_ROUND = {"model": "tiny", "clients": 2, "rounds": 1, "max-length": 16, "num-labels": 2,
             "batch-size": 16, "physical-batch-size": 16, "local-epochs": 0.04,
             "max-train-examples": 48, "max-eval-examples": 32}


def test_plural() -> None:
    assert [plural(n, "round") for n in (0, 1, 2)] == ["0 rounds", "1 round", "2 rounds"]


def test_preflight_counts_one_round() -> None:
    cfg = build_config({"clients": 2, "rounds": 1, "client-dp": True, "example-dp": False,
                        "client-dp-noise-multiplier": 1.0})
    report = P.check(cfg, 40_000, None)
    assert report.headline().endswith("2 partners per round, 1 round)")
    assert report.cannot_learn
    assert "Even if the one round pushed the same way" in report.mechanisms[0].reason


def test_a_finished_one_round_run_is_one_round(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    summary = Federation.open(InProcessGrid(2, state_root=tmp_path / "nodes"),
                              build_config({**ONE_ROUND, "out": str(out)}), out).run()
    assert summary["rounds_completed"] == 1
    capsys.readouterr()
    assert verify_main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "VERDICT: PASS (1 round, " in text
    assert "1 round completed" in text and "1 round, tolerance" in text
    assert "1 rounds" not in text
    report = next(p for p in write_report(out) if p.suffix == ".md").read_text()
    assert "1 rounds" not in report and "partners per round, 1 round;" in report
    with pytest.raises(ResumeRefused, match=r"holds a finished run \(1 round\)"):
        check_not_finished(RunFolder(out))


def test_simulate_announces_one_round(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    # refused by the pre-flight check before Ray starts: the announcement is printed first
    args = ["simulate", "--out", str(tmp_path / "run"), "--set", "preflight=error",
            "--set", "client-dp=true", "--set", "client-dp-noise-multiplier=1.0"]
    for key, value in ONE_ROUND.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "2 partners, 1 round, model tiny" in captured.out
    assert "1 rounds" not in captured.out + captured.err
