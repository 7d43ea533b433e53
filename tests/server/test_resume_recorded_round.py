"""Resume never trains a round the ledger records as completed: the run stopped (disk full)
after the ledger's round_completed, or while writing it, resumes after that round; a run
folder whose checkpoint lies behind its ledger is refused. A run that did train a round
twice (the checkpoint could not be written, so the round was not closed) says in words
that its spend went above the target."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from confide.audit.report import write_report
from confide.audit.verify import render_verdict, verify_run
from confide.config import build_config
from confide.privacy.ledger import Ledger, read_lines
from confide.server.federation import Federation
from confide.server.recovery import ResumeRefused, RunWriteError
from confide.server.run_folder import RunFolder
from confide.simulation.runner import final_table
from tests.inprocess import InProcessGrid

TINY = {"model": "tiny", "clients": 2, "rounds": 3, "max-length": 16, "num-labels": 2,
        "noise-multiplier": 1.1, "batch-size": 16, "physical-batch-size": 16,
        "local-epochs": 0.04, "max-train-examples": 48, "max-eval-examples": 32,
        "preflight": "off", "seed": 5}


def federation(out: Path, **extra: Any) -> Federation:
    cfg = build_config({**TINY, "out": str(out), **extra})
    return Federation.open(InProcessGrid(cfg.clients), cfg, out)


def entries(out: Path) -> list[dict[str, Any]]:
    return [line.entry for line in read_lines(out / "ledger.jsonl") if line.entry is not None]


def full_disk(path: object) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def node_rounds(out: Path) -> list[list[int]]:
    """Each simulated partner's own record of the rounds it spent budget in, this run."""
    key = entries(out)[0]["payload"]["ledger_public_key"]
    return [sorted(s["round"] for s in json.loads(p.read_text())["accountant"]["history"]
                   if s["run"] == key)
            for p in sorted(out.glob("partners/*/node_state.json"))]


def assert_each_round_trained_once(out: Path) -> None:
    configured = [e["payload"]["round"] for e in entries(out) if e["type"] == "round_configured"]
    assert configured == [1, 2, 3], "a recorded round was trained again"
    assert node_rounds(out) == [[1, 2, 3], [1, 2, 3]], "a partner spent twice in one round"
    rows = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]
    result = verify_run(out, pld=False)
    assert result.verdict == "PASS", render_verdict(result)


def test_disk_full_after_round_completed_resumes_after_that_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real = RunFolder.append_metrics

    def append_metrics(self: RunFolder, row: dict[str, Any]) -> None:
        if row["round"] == 2:
            raise full_disk(self.metrics)
        real(self, row)

    with monkeypatch.context() as m:
        m.setattr(RunFolder, "append_metrics", append_metrics)
        with pytest.raises(RunWriteError, match="No space left on device"):
            federation(out).run()
    assert [e["payload"]["round"] for e in entries(out)
            if e["type"] == "round_completed"] == [1, 2]
    federation(out, resume=True).run()
    assert_each_round_trained_once(out)


def test_stopped_while_writing_round_completed_resumes_after_that_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real = Ledger.append

    def append(self: Ledger, event: Any) -> dict[str, Any]:
        if event.TYPE == "round_completed" and event.round == 2:
            raise full_disk(out / "ledger.jsonl")
        return real(self, event)

    with monkeypatch.context() as m:
        m.setattr(Ledger, "append", append)
        with pytest.raises(RunWriteError):
            federation(out).run()
    # round 2 trained and its model recorded; the checkpoint (written first) holds the rest
    assert json.loads((out / "checkpoint" / "server_state.json").read_text())["round"] == 2
    assert verify_run(out, pld=False).verdict == "INCOMPLETE"
    federation(out, resume=True).run()
    assert_each_round_trained_once(out)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_checkpoint_behind_the_ledger_is_refused(tmp_path: Path) -> None:
    """A folder whose checkpoint is older than the rounds its ledger completed (an earlier
    version wrote the checkpoint after round_completed; or an older checkpoint copied
    back): resuming would train those rounds again, so it is refused, writing nothing."""
    out = tmp_path / "run"
    fed = federation(out)
    fed.run_round(1)
    shutil.copytree(out / "checkpoint", tmp_path / "checkpoint-round1")
    fed.run_round(2)
    assert fed.ledger is not None
    fed.ledger.close()
    shutil.rmtree(out / "checkpoint")
    shutil.copytree(tmp_path / "checkpoint-round1", out / "checkpoint")
    before = snapshot(out)
    with pytest.raises(ResumeRefused, match=r"records round\(s\) 2\.\.2 as completed, but "
                                            r"its checkpoint holds round 1: resuming would "
                                            "train that round again"):
        federation(out, resume=True)
    assert snapshot(out) == before


def test_a_round_trained_twice_says_the_spend_is_above_the_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint of round 2 cannot be written (disk full) before the round is
    closed: resume trains round 2 again (both attempts released updates, both are in the
    ledger), and the partners end above the target-epsilon the noise was calibrated
    to. The final table, summary.json, verify and the report say so in words."""
    out = tmp_path / "run"
    calibrated = {"noise-multiplier": 0.0, "target-epsilon": 2.0, "max-epsilon": 10.0}
    real = RunFolder.save_checkpoint

    def save_checkpoint(self: RunFolder, round_: int, *args: Any, **kwargs: Any) -> None:
        if round_ == 2:
            raise full_disk(self.checkpoint_dir / "global_round2.safetensors")
        real(self, round_, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(RunFolder, "save_checkpoint", save_checkpoint)
        with pytest.raises(RunWriteError):
            federation(out, **calibrated).run()
    summary = federation(out, resume=True, **calibrated).run()
    above = summary["privacy"]["above_target_epsilon"]
    assert sorted(node_rounds(out)[0]) == [1, 2, 2, 3]  # round 2 released twice
    assert len(above) == 2 and all(eps > 2.0 for eps in above.values())
    console = Console(width=200, record=True)
    console.print(final_table(out, summary))
    shown = console.export_text()
    assert "ABOVE TARGET" in shown and "more than the run's target-epsilon 2" in shown
    result = verify_run(out, pld=False)
    assert result.verdict == "PASS"  # a true record of what happened
    assert "ABOVE TARGET" in render_verdict(result)
    _, md = write_report(out, result=result)
    assert "ABOVE TARGET" in md.read_text()
