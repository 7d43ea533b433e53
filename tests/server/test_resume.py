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
from confide.privacy.accountant import pld_epsilon
from confide.privacy.mechanisms import SampledGaussian
from confide.server.faults import CRASH_AFTER_ROUND_ENV

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
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, None]:
    # One real `confide simulate` process killed after round 1 and resumed. The comparison
    # with an uninterrupted run of the same seed is made in-process, at every crash point,
    # by server/test_fault_injection.py; here the real CLI, Ray and checkpoint files.
    root = tmp_path_factory.mktemp("resume")
    crashed = root / "crashed"
    first = simulate(crashed, crash_after=1)
    assert first.returncode != 0, "the fault injection must kill the server"
    assert not (crashed / "summary.json").exists()
    assert len(rows(crashed)) == 1
    resumed = simulate(crashed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return crashed, None


def test_resumed_run_matches_uninterrupted(runs: tuple[Path, None]) -> None:
    crashed, _ = runs
    a = rows(crashed)
    assert [r["round"] for r in a] == [1, 2], "no round counted twice, none lost"
    # Epsilon is a function of the mechanism events only: after round r, each partner's
    # claim is PLD of exactly its r recorded events (an uninterrupted run records the same
    # events: noise-multiplier is fixed, rates and steps follow from the seeded split).
    entries = [json.loads(x) for x in (crashed / "ledger.jsonl").read_text().splitlines()]
    events: dict[str, list[SampledGaussian]] = {}
    for e in entries:
        if e["type"] == "example_dp":
            pay = e["payload"]
            events.setdefault(pay["partner"], []).append(SampledGaussian.from_json(pay))
    assert all(len(ev) == 2 for ev in events.values()) and len(events) == 2
    for r, row in enumerate(a, start=1):
        for partner, eps in row["epsilon_example_level"].items():
            assert eps == pytest.approx(pld_epsilon(events[partner][:r], 1e-5), rel=1e-6)
    eps_a = [e for r in a for e in sorted(r["epsilon_example_level"].values())]
    assert eps_a[2] > eps_a[0], "round 2 adds to round 1's spend"
    # the partners kept their keys (pseudonyms) across the restart
    assert set(a[0]["epsilon_example_level"]) == set(a[1]["epsilon_example_level"])
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["rounds_completed"] == 2


def test_resumed_ledger_chain_is_continuous_and_verifies(runs: tuple[Path, None]) -> None:
    crashed, _ = runs
    entries = [json.loads(x) for x in (crashed / "ledger.jsonl").read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(len(entries)))
    types = [e["type"] for e in entries]
    assert types.count("run_started") == 1 and types.count("run_resumed") == 1
    assert sum(1 for e in entries if e["type"] == "round_completed") == 2
    result = verify_run(crashed)
    assert result.ok, result


def test_resume_refuses_changed_configuration(runs: tuple[Path, None], tmp_path: Path) -> None:
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
