"""One base for every error a user can act on; the command catches that class alone."""

from __future__ import annotations

import pytest

from confide.audit.report import ReportWriteError
from confide.cli import main
from confide.config import ConfigError
from confide.data import DataError
from confide.errors import ConfideError
from confide.model import ModelError
from confide.server.recovery import EveryPartnerFailed, Interrupted, NoBudgetLeft, RunWriteError
from confide.server.run_folder import CheckpointError
from confide.simulation.ray_cluster import SimulationEngineError


@pytest.mark.parametrize(("cls", "status"), [
    (ConfigError, 2), (DataError, 2), (ModelError, 2), (CheckpointError, 2),
    (RunWriteError, 1), (ReportWriteError, 1), (NoBudgetLeft, 1), (EveryPartnerFailed, 1),
    (SimulationEngineError, 1), (Interrupted, 130)])
def test_each_error_carries_its_exit_status_and_keeps_its_builtin_base(cls, status) -> None:
    assert issubclass(cls, ConfideError) and cls.exit_status == status
    assert issubclass(cls, ValueError | RuntimeError)


@pytest.mark.parametrize(("cls", "status", "prefix"), [
    (NoBudgetLeft, 1, "confide: error: "), (Interrupted, 130, "confide: "),
    (DataError, 2, "confide: error: ")])
def test_the_command_prints_the_message_and_exits_with_its_status(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cls, status,
        prefix) -> None:
    import confide.cli as cli

    def failing(args):  # what the audit command would raise
        raise cls("what went wrong, and how to go on")

    monkeypatch.setattr(cli, "_audit", failing)
    assert main(["audit", "verify", "RUN"]) == status
    assert capsys.readouterr().err == f"{prefix}what went wrong, and how to go on\n"


def test_any_other_error_is_a_bug_and_keeps_its_traceback(monkeypatch) -> None:
    import confide.cli as cli

    def failing(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_audit", failing)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["audit", "verify", "RUN"])
