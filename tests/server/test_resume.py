"""A server killed after round 1 resumes from its checkpoint: the same ledger chain, the
same epsilons as an uninterrupted run, no round counted twice, no budget lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from confide.audit.verify import verify_run
from confide.server.federation import CRASH_AFTER_ROUND_ENV

ARGS = ["--model", "tiny", "--clients", "2", "--rounds", "2", "--fine-tune", "lora",
        "--set", "max-length=16", "--set", "noise-multiplier=1.1", "--set", "batch-size=16",
        "--set", "physical-batch-size=16", "--seed", "7"]


def simulate(out: Path, *extra: str, crash_after: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if crash_after is not None:
        env[CRASH_AFTER_ROUND_ENV] = str(crash_after)
    return subprocess.run([sys.executable, "-m", "confide.cli", "simulate", *ARGS,
                           "--out", str(out), *extra], env=env, capture_output=True,
                          text=True, timeout=600)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    crashed = root / "crashed"
    first = simulate(crashed, crash_after=1)
    assert first.returncode != 0, "the fault injection must kill the server"
    assert not (crashed / "summary.json").exists()
    assert len(rows(crashed)) == 1
    resumed = simulate(crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = root / "straight"
    done = simulate(straight)
    assert done.returncode == 0, done.stderr[-3000:]
    return crashed, straight


def test_resumed_run_matches_uninterrupted(runs: tuple[Path, Path]) -> None:
    crashed, straight = runs
    a, b = rows(crashed), rows(straight)
    assert [r["round"] for r in a] == [1, 2], "no round counted twice, none lost"
    # Epsilon is a function of the mechanism events only: identical per round.
    eps_a = [e for r in a for e in sorted(r["epsilon_example_level"].values())]
    eps_b = [e for r in b for e in sorted(r["epsilon_example_level"].values())]
    assert eps_a == pytest.approx(eps_b, rel=1e-9)
    assert eps_a[2] > eps_a[0], "round 2 adds to round 1's spend"
    # the partners kept their keys (pseudonyms) across the restart
    assert set(a[0]["epsilon_example_level"]) == set(a[1]["epsilon_example_level"])
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["rounds_completed"] == 2


def test_resumed_ledger_chain_is_continuous_and_verifies(runs: tuple[Path, Path]) -> None:
    crashed, _ = runs
    entries = [json.loads(x) for x in (crashed / "ledger.jsonl").read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(len(entries)))
    types = [e["type"] for e in entries]
    assert types.count("run_started") == 1 and types.count("run_resumed") == 1
    assert sum(1 for e in entries if e["type"] == "round_completed") == 2
    result = verify_run(crashed)
    assert result.ok, result


def test_resume_refuses_changed_configuration(runs: tuple[Path, Path], tmp_path: Path) -> None:
    crashed, _ = runs
    again = subprocess.run([sys.executable, "-m", "confide.cli", "simulate", *ARGS,
                            "--set", "learning-rate=0.5", "--out", str(crashed), "--resume"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2
    # `runs` has finished the crashed run by now: that refusal comes first (a changed
    # configuration of an unfinished run: server/test_recovery.py names the keys)
    text = again.stderr + again.stdout
    assert "another configuration" in text or "holds a finished run" in text


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    out = simulate(tmp_path / "none", "--resume")
    assert out.returncode == 2
    assert "no checkpoint" in out.stderr
