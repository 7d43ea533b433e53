"""Progress inside a round: the writer (throttled, atomic, forward only), the reader, the
display text, and the training loops' step callback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from confide.clients.dp_training import clipped_example_gradients, padded_batches
from confide.clients.progress import (
    PROGRESS_FILE,
    ProgressError,
    ProgressWriter,
    RoundProgress,
    counting_calls,
    partner_progress_files,
    progress_text,
    progress_writer,
    read_progress,
    round_progress,
)
from confide.model import ModelSpec
from confide.tasks import build_model
from tests.clients.test_dp_training import easy_task, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_writer_throttles_and_always_writes_start_and_end(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / PROGRESS_FILE
    writer = ProgressWriter(path, 3, 10, interval=2.0, clock=clock)  # the plan, at once
    assert read_progress(path) == RoundProgress(3, 0, 10, 1000.0, 1000.0)
    for done in range(1, 10):
        clock.now += 0.5
        writer(done)
    # 4.5 s of steps at 0.5 s each, one write per 2 s at most: 0, 4 (2.0 s), 8 (4.0 s)
    assert writer.writes == 3
    report = read_progress(path)
    assert report is not None and (report.done, report.updated) == (8, 1004.0)
    clock.now += 0.1
    writer(10)  # the last step is written whatever the interval
    assert writer.writes == 4
    assert read_progress(path) == RoundProgress(3, 10, 10, 1000.0, clock.now)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == [PROGRESS_FILE]  # no temp file left


def test_writer_counts_only_forward_within_the_plan(tmp_path: Path) -> None:
    writer = ProgressWriter(tmp_path / PROGRESS_FILE, 1, 5, interval=0.0)
    writer(2)
    writer(2)  # a repeat (a skipped physical step) is fine
    with pytest.raises(ProgressError, match="only moves forward"):
        writer(1)
    with pytest.raises(ProgressError, match="5 planned"):
        writer(6)
    with pytest.raises(ProgressError, match="planned steps must be an integer >= 1"):
        ProgressWriter(tmp_path / PROGRESS_FILE, 1, 0)
    assert progress_writer(None, 1, 5) is None  # no folder: no report


def test_a_failed_write_keeps_the_old_report_and_never_fails_the_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / PROGRESS_FILE
    writer = ProgressWriter(path, 2, 4, interval=0.0)
    writer(1)

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    writer(2)  # no exception: the display is an aid
    monkeypatch.undo()
    assert writer.failed
    report = read_progress(path)
    assert report is not None and report.done == 1  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == [PROGRESS_FILE]
    writer(3)  # stopped writing after the failure
    assert read_progress(path) == report


def test_reader_skips_what_is_not_a_report(tmp_path: Path) -> None:
    path = tmp_path / PROGRESS_FILE
    assert read_progress(path) is None
    path.write_text("{not json")
    assert read_progress(path) is None
    path.write_text(json.dumps({"round": 1, "done": 7, "planned": 5, "started": 0,
                                "updated": 1}))
    assert read_progress(path) is None  # more done than planned: not a report to trust
    for n in (1, 0):
        folder = tmp_path / "partners" / f"partition-{n}"
        ProgressWriter(folder / PROGRESS_FILE, 1, 3)
    assert [p.parent.name for p in partner_progress_files(tmp_path)] == [
        "partition-0", "partition-1"]


def report(round_: int, done: int, planned: int, started: float, updated: float
           ) -> RoundProgress:
    return RoundProgress(round_, done, planned, started, updated)


def test_round_progress_takes_the_newest_fresh_round() -> None:
    reports = [report(1, 10, 10, 0, 50), report(2, 3, 10, 60, 70), report(2, 5, 10, 60, 75),
               report(4, 1, 10, 0, 10)]  # round 4 of an earlier run: before this driver
    assert round_progress(reports, after=20, min_round=1) == (2, reports[1:3])
    assert round_progress(reports, after=20, min_round=3) is None  # round 2 is completed
    assert round_progress([], after=0, min_round=1) is None


def test_progress_text_partners_side_by_side() -> None:
    # two partners, each 2 steps/s, 20 and 30 steps left: the round ends in ~12.5 s
    reports = [report(3, 20, 40, 100, 110), report(3, 10, 40, 105, 110)]
    assert progress_text(3, reports, 110) == "round 3: 30/80 steps, ETA 00:13"
    # the ETA moves between the partners' writes
    assert progress_text(3, reports, 115) == "round 3: 30/80 steps, ETA 00:08"


def test_progress_text_partners_one_after_another() -> None:
    # Ray runs one partner at a time: one done, one at 10/40 at 1 step/s, two not started
    reports = [report(1, 40, 40, 0, 40), report(1, 10, 40, 40, 50)]
    text = progress_text(1, reports, 50, partners=4)
    assert text == "round 1: 50/160 steps (2/4 partners started), ETA 01:50"
    assert progress_text(1, [report(1, 40, 40, 0, 40)] * 2, 41) == (
        "round 1: 80/80 steps, finishing")
    # the next partner has just started: the finished one's pace (1 step/s) until it moves
    assert progress_text(1, [report(1, 40, 40, 0, 40), report(1, 0, 40, 41, 41)], 41) == (
        "round 1: 40/80 steps, ETA 00:40")
    assert progress_text(1, [report(1, 0, 40, 0, 0)], 1) == "round 1: 0/40 steps, ETA --:--"
    assert progress_text(2, [], 0) == "round 2: waiting for partners"
    long = progress_text(1, [report(1, 1, 5000, 0, 2)], 2)
    assert long.endswith("ETA 2:46:38")


def test_train_dp_reports_every_planned_step_in_order() -> None:
    data = easy_task(n=40)
    model = build_model(ModelSpec("tiny", 2, fine_tune="full"))
    seen: list[int] = []
    result = run(model, data, batch_size=8, physical_batch_size=4, epochs=1.0,
                 on_step=seen.append)
    assert seen == list(range(1, result.steps + 1))  # after each noisy step
    plain: list[int] = []
    result = run(model, data, dp=False, batch_size=8, epochs=1.0, on_step=plain.append)
    assert plain == list(range(1, result.steps + 1))


def test_shared_noise_round_reports_its_padded_batches() -> None:
    torch.manual_seed(0)
    data = easy_task(n=20)
    model = build_model(ModelSpec("tiny", 2, fine_tune="full"))
    seen: list[int] = []
    batches: list[int] = []
    clipped_example_gradients(model, data, sample_rate=0.3, max_grad_norm=1.0,
                              physical_batch_size=4, slots=10,
                              on_rows=counting_calls(lambda rows: batches.append(len(rows)),
                                                     seen.append))
    assert batches == [4, 4, 2]  # the rows still reach the encoder
    assert seen == [1, 2, 3] and padded_batches(10, 4) == 3
    plain = print
    assert counting_calls(plain, None) is plain  # no folder, no wrapper
