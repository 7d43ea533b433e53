"""Fault injection on a finished run's record: the ledger cut back at a round boundary
(a valid chain prefix, nothing to re-sign), metrics cut to match, summary.json and the
model deleted. With the partners' own node states in the run folder (as a simulation keeps
them) the audit fails, naming the rounds the partners remember; with the checkpoint alone
it fails too; with neither it is INCOMPLETE, never PASS."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from confide.audit.verify import main, render_verdict, verify_run
from confide.config import build_config
from confide.server.federation import Federation
from tests.inprocess import InProcessGrid

TINY = {"model": "tiny", "clients": 2, "rounds": 4, "max-length": 16, "num-labels": 2,
        "noise-multiplier": 1.1, "batch-size": 16, "physical-batch-size": 16,
        "local-epochs": 0.04, "max-train-examples": 48, "max-eval-examples": 32,
        "preflight": "off", "seed": 9}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cut-back") / "run"
    cfg = build_config({**TINY, "out": str(out)})
    # no state_root: each node keeps its state in out/partners/, as simulated partners do
    Federation.open(InProcessGrid(cfg.clients), cfg, out).run()
    assert verify_run(out, pld=False).verdict == "PASS"
    assert len(list(out.glob("partners/*/node_state.json"))) == 2
    return out


def cut_back(finished: Path, tmp_path: Path, after_round: int) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    lines = (out / "ledger.jsonl").read_text().splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines)
               if json.loads(line)["type"] == "round_completed"
               and json.loads(line)["payload"]["round"] == after_round)
    (out / "ledger.jsonl").write_text("".join(lines[:end + 1]))
    rows = [r for r in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(r)["round"] <= after_round]
    (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    for name in ("summary.json", "report.html", "report.md"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "model")
    return out


def test_cut_back_with_partner_records_fails_naming_the_rounds(finished: Path,
                                                               tmp_path: Path) -> None:
    out = cut_back(finished, tmp_path, 2)
    result = verify_run(out, pld=False)
    assert result.verdict == "FAIL", render_verdict(result)
    problems = [p.reason for p in result.check("partners").problems]
    # round 3's receipts were acknowledged by round 4's train message; round 4's are still
    # pending at the nodes (the run's last round): round 3 is the evidence
    assert len(problems) == 2 and all("round(s) 3 that the ledger lacks" in p
                                      for p in problems), problems
    assert main([str(out)]) == 1


def test_cut_back_with_the_checkpoint_only_fails(finished: Path, tmp_path: Path) -> None:
    out = cut_back(finished, tmp_path, 2)
    shutil.rmtree(out / "partners")
    result = verify_run(out, pld=False)
    assert result.verdict == "FAIL"
    assert "the checkpoint is of round 4, but the ledger completes only 2" in \
        result.check("checkpoint").problems[0].reason


def test_cut_back_without_partner_records_is_incomplete(finished: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    out = cut_back(finished, tmp_path, 2)
    shutil.rmtree(out / "partners")
    shutil.rmtree(out / "checkpoint")
    result = verify_run(out, pld=False)
    assert result.verdict == "INCOMPLETE", render_verdict(result)
    assert main([str(out)]) == 3
    assert "VERDICT: INCOMPLETE (2 of 4 rounds recorded" in capsys.readouterr().out
