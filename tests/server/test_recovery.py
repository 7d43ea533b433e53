"""What `--resume` refuses, read-only, in process.

A 2-round run stops after round 1 (the server process "dies": the ledger is let go of
without run_finished). Resuming it works and verifies; resuming from altered weights, a
finished run, or with another configuration is refused with a message and writes nothing."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from confide.audit.verify import verify_run
from confide.cli import main
from confide.config import build_config
from confide.server.federation import Federation
from confide.server.recovery import ResumeRefused
from tests.inprocess import InProcessGrid

TINY = {"model": "tiny", "clients": 2, "rounds": 2, "max-length": 16,
        "noise-multiplier": 1.1, "batch-size": 16, "physical-batch-size": 16,
        "local-epochs": 0.04, "preflight": "off", "seed": 3}
CLI = ["simulate", "--model", "tiny", "--clients", "2", "--rounds", "2", "--seed", "3",
       "--set", "max-length=16", "--set", "noise-multiplier=1.1", "--set", "batch-size=16",
       "--set", "physical-batch-size=16", "--set", "local-epochs=0.04",
       "--set", "preflight=off"]


def federation(out: Path, **extra: object) -> Federation:
    cfg = build_config({**TINY, "out": str(out), **extra})
    return Federation.open(InProcessGrid(2), cfg, out)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose server stopped after round 1's checkpoint."""
    out = tmp_path_factory.mktemp("recovery") / "run"
    fed = federation(out)
    fed.run_round(1)
    assert fed.ledger is not None
    fed.ledger.close()
    return out


@pytest.fixture(scope="module")
def finished(stopped: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recovery-finished") / "run"
    shutil.copytree(stopped, out)
    federation(out, resume=True).run()
    return out


def copy(src: Path, tmp_path: Path) -> Path:
    shutil.copytree(src, tmp_path / "run")
    return tmp_path / "run"


def test_a_run_folder_moved_elsewhere_resumes_and_verifies(finished: Path) -> None:
    # `finished` was resumed from a copy of the stopped run in another folder (`out` differs)
    result = verify_run(finished)
    assert result.ok, [str(p) for p in result.problems]
    assert result.rounds_completed == 2


def test_altered_checkpoint_is_refused_naming_the_file(stopped: Path, tmp_path: Path) -> None:
    out = copy(stopped, tmp_path)
    path = out / "checkpoint" / "global_round1.safetensors"
    weights = dict(load_file(str(path)))
    name = sorted(weights)[0]
    weights[name] = weights[name] + np.float32(1e-3)  # weights nobody trained
    save_file(weights, str(path))
    before = snapshot(out)
    with pytest.raises(ResumeRefused, match=r"global_round1\.safetensors") as err:
        federation(out, resume=True)
    assert "does not hold the model the ledger recorded for round 1" in str(err.value)
    assert snapshot(out) == before, "a refused resume writes nothing"


def test_resume_of_a_finished_run_is_refused_and_writes_nothing(
        finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = copy(finished, tmp_path)
    before = snapshot(out)
    with pytest.raises(ResumeRefused, match="finished run"):
        federation(out, resume=True)
    assert main([*CLI, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run (2 rounds)" in err and "Traceback" not in err
    assert snapshot(out) == before
    assert verify_run(out).ok


def test_resume_with_another_configuration_names_the_keys(
        stopped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = copy(stopped, tmp_path)
    before = snapshot(out)
    with pytest.raises(ResumeRefused, match=r"Differing keys: learning-rate: .* -> 0\.5"):
        federation(out, resume=True, **{"learning-rate": 0.5})
    assert main([*CLI, "--set", "learning-rate=0.5", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "learning-rate" in err
    assert snapshot(out) == before


def test_truncated_checkpoint_is_a_message_not_a_traceback(
        stopped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = copy(stopped, tmp_path)
    path = out / "checkpoint" / "global_round1.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # a disk that filled up mid-write, say
    before = snapshot(out)
    assert main([*CLI, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and str(out / "checkpoint") in err and "Traceback" not in err
    assert snapshot(out) == before


def test_summary_states_the_budget_and_whether_every_partner_kept_it(finished: Path) -> None:
    import json

    privacy = json.loads((finished / "summary.json").read_text())["privacy"]
    assert privacy["max_epsilon"] == build_config(TINY).max_epsilon
    assert privacy["within_max_epsilon"] is True
    assert all(e <= privacy["max_epsilon"] for e in privacy["example_level"].values())
