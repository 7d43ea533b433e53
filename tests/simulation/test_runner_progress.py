"""The driver's progress inside a round: it reads the virtual partners' progress files from
the run folder and shows steps done / planned and an ETA next to the round bar."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from rich.console import Console

from confide.clients.progress import PROGRESS_FILE, ProgressWriter
from confide.config import RunConfig
from confide.simulation.runner import InsideRound, engine_progress


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def partner_writer(out: Path, partition: int, round_: int, planned: int, clock: Clock
                   ) -> ProgressWriter:
    folder = out / "partners" / f"partition-{partition}"
    return ProgressWriter(folder / PROGRESS_FILE, round_, planned, interval=0.0, clock=clock)


def test_inside_round_reads_the_partners_files(tmp_path: Path) -> None:
    clock = Clock(500.0)
    # an earlier run's file (before this driver started): a resumed run must not show it
    partner_writer(tmp_path, 2, 3, 20, clock)(20)
    clock.now = 1000.0
    cfg = RunConfig(out=str(tmp_path), clients=3)
    shown: list[str] = []
    inside = InsideRound(cfg, shown.append, clock=clock)
    assert inside.text() == ""  # no partner has started this driver's round
    a = partner_writer(tmp_path, 0, 1, 20, clock)
    b = partner_writer(tmp_path, 1, 1, 20, clock)
    clock.now += 10
    a(10)
    b(5)  # 1.5 steps/s together; 45 steps left, 20 of them the partner not started yet
    assert inside.text() == "round 1: 15/60 steps (2/3 partners started), ETA 00:30"
    inside.round_done(1)
    assert inside.text() == ""  # round 1 is completed: its files are history
    partner_writer(tmp_path, 2, 2, 20, clock)
    assert inside.text().startswith("round 2: 0/60 steps")


def test_the_bar_shows_the_round_inside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    monkeypatch.setattr(InsideRound, "POLL_S", 0.02)
    cfg = RunConfig(out=str(tmp_path), clients=1, rounds=2)
    buffer = io.StringIO()
    console = Console(file=buffer, width=200)
    with engine_progress(cfg, console):
        writer = ProgressWriter(tmp_path / "partners" / "partition-0" / PROGRESS_FILE, 1, 146)
        time.sleep(0.05)
        writer.last_write = None  # due again: write now
        writer(41)
        time.sleep(0.3)  # several polls (a console that is no terminal renders at the end)
    text = buffer.getvalue()
    assert "round 0/2" in text
    assert "round 1: 41/146 steps, ETA " in text
