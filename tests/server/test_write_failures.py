"""A write that fails (disk full) at each of the run's write sites stops
the run with a message naming the file and the round it resumes from; resuming then
finishes a run that verifies, with the budget of the failed attempt still in the ledger."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from confide.audit.verify import verify_run
from confide.privacy import ledger_events as E
from confide.privacy.ledger import Ledger
from confide.run_layout import REPORT_HTML_FILE
from confide.server.recovery import RunWriteError
from confide.server.run_folder import RunFolder
from tests.server.test_recovery import federation, stopped  # noqa: F401  (fixture)


def full(path: object = "run folder"):
    def fail(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return fail


SITES = {
    # site -> (object, attribute, when it fails)
    "metrics": (RunFolder, "append_metrics", "metrics.jsonl"),
    "checkpoint": (RunFolder, "save_checkpoint", "checkpoint/global_round2.safetensors"),
    "summary": (RunFolder, "write_summary", "summary.json"),
    "model": (RunFolder, "save_model", "model/weights.safetensors"),
}


@pytest.mark.parametrize("site", [*SITES, "ledger"])
def test_disk_full_at_each_write_site_stops_clearly_and_resumes(
        site: str, stopped: Path, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)  # round 1 is done and checkpointed
    with monkeypatch.context() as m:
        if site == "ledger":  # the round's model_digest entry cannot be appended
            real = Ledger.append

            def append(self: Ledger, event: E.LedgerEvent) -> dict:
                if event.TYPE == E.MODEL_DIGEST:
                    full(out / "ledger.jsonl")()
                return real(self, event)
            m.setattr(Ledger, "append", append)
        else:
            owner, name, file = SITES[site]
            m.setattr(owner, name, full(out / file))
        with pytest.raises(RunWriteError) as err:
            federation(out, resume=True).run()
    message = str(err.value)
    assert "No space left on device" in message and "--resume" in message
    assert "resumes after round" in message
    federation(out, resume=True).run()  # space freed: the same command with --resume
    result = verify_run(out)
    assert result.ok, [str(p) for p in result.problems]
    assert result.rounds_completed == 2


def test_report_that_cannot_be_written_is_an_error_not_a_silent_half_png(
        stopped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import confide.audit.report as report

    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    federation(out, resume=True).run()
    # The ServerApp writes no report: its driver does, after the run (as simulate does)
    assert not (out / REPORT_HTML_FILE).exists()
    monkeypatch.setattr(report, "atomic_write_bytes", full(out / "report_assets" / "x.png"))
    warnings: list[str] = []
    with pytest.raises(report.ReportWriteError, match=f"confide audit report {out}"):
        report.write_report_after_run(out, 2, warnings.append)
    assert not warnings
    assert not list(out.glob("report*.png")) and not (out / REPORT_HTML_FILE).exists()
    assert verify_run(out).ok  # the run itself is complete

