"""Progress inside a round: the partner's training loop reports steps done / planned into a
small file in the partner's own folder; whoever can read that folder (the simulation driver,
which holds every virtual partner's folder in its run folder; a partner on its own disk)
shows "round r: s/S steps, ETA mm:ss".

    {"round": 3, "done": 41, "planned": 146, "started": 1765000000.1, "updated": ...}

`ProgressWriter` is the callback the DP training loop calls after every step (a callback
argument of `train_dp`, never a global): it writes at most every `interval` seconds (plus
the round's start and its last step), atomically (`atomic_write_text`: a reader sees the
old or the new file, never half of one), and refuses a count that goes backwards or past
the plan. `read_progress` / `round_progress` / `progress_text` are the reader's side.

Why this is not a disclosure. The counts: the planned number of noisy steps is fixed before
the round from public values (batch size, the public row count, epochs; it is in the signed
receipt), and Poisson batches are processed in exactly that many steps, empty ones included,
so "s of S steps done" is a function of the plan and the clock, not of the records. The
clock is another matter: a step over a larger Poisson batch takes longer, so the times at
which the count moves reflect batch sizes, as the round's duration does (which is why the
reply carries no training time under DP, `confide.clients.disclosure`). So the file stays
where the partner keeps its own state and is never sent: in a deployment the server and the
operator's console learn nothing from it; in a simulation it is read by the driver, which
holds every partner's data anyway.

A core-light module (no torch): the driver imports it for the display.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confide.run_layout import atomic_write_text

PROGRESS_FILE = "progress.json"  # in the partner's folder (confide.clients.state_location)
WRITE_INTERVAL_S = 2.0  # at most one write per partner this often: cheap, and moves < 10 s


class ProgressError(ValueError):
    """A progress report that cannot be true (counts backwards or past the plan)."""


@dataclass(frozen=True)
class RoundProgress:
    round: int
    done: int  # noisy steps taken so far this round
    planned: int  # steps the round takes (fixed before it starts)
    started: float  # wall-clock time (time.time()) the round's training began
    updated: float  # wall-clock time of `done`

    def to_json(self) -> str:
        return json.dumps({"round": self.round, "done": self.done, "planned": self.planned,
                           "started": self.started, "updated": self.updated})


class ProgressWriter:
    """The training loop's progress callback: `writer(done)` after each step.

    Writes `path` at once (0 steps: the display learns the plan when the round's training
    starts), then at most every `interval` seconds, and always on the last step. `clock`
    is the wall clock (the reader, another process, compares it with its own)."""

    def __init__(self, path: Path, round_id: int, planned: int, *,
                 interval: float = WRITE_INTERVAL_S,
                 clock: Callable[[], float] = time.time) -> None:
        if isinstance(planned, bool) or not isinstance(planned, int) or planned < 1:
            raise ProgressError(f"planned steps must be an integer >= 1 (got {planned!r})")
        if not (interval >= 0 and math.isfinite(interval)):
            raise ProgressError(f"progress interval must be >= 0 seconds (got {interval})")
        self.path, self.round, self.planned = path, round_id, planned
        self.interval, self.clock = interval, clock
        self.started = clock()
        self.done = 0
        self.last_write: float | None = None
        self.writes = 0
        self.failed = False
        self._write(self.started)

    def __call__(self, done: int) -> None:
        if done < self.done or done > self.planned or done < 0:
            raise ProgressError(f"round {self.round}: {done} steps done after {self.done}, "
                                f"{self.planned} planned: progress only moves forward, "
                                "within the plan")
        self.done = done
        now = self.clock()
        due = self.last_write is None or now - self.last_write >= self.interval
        if due or done == self.planned:
            self._write(now)

    def _write(self, now: float) -> None:
        self.last_write = now
        if self.failed:
            return
        report = RoundProgress(self.round, self.done, self.planned, self.started, now)
        try:
            # world-readable like the run folder's other reports: it holds no secret
            atomic_write_text(self.path, report.to_json(), mode=0o644)
        except OSError:
            # a display aid: a full or read-only disk must not fail the round (saving the
            # node's state, which matters, reports it)
            self.failed = True
            return
        self.writes += 1


def progress_writer(state_dir: Path | None, round_id: int, planned: int
                    ) -> ProgressWriter | None:
    """The writer for a partner whose folder is `state_dir` (None: no folder, no report)."""
    if state_dir is None:
        return None
    return ProgressWriter(state_dir / PROGRESS_FILE, round_id, planned)


def counting_calls(fn: Callable[[Any], None], on_step: Callable[[int], None] | None
                   ) -> Callable[[Any], None]:
    """`fn`, telling `on_step` after each call how many calls there were: the progress of a
    shared-noise round, whose `on_rows` is called once per physical batch of a fixed number
    (`confide.clients.dp_training.padded_batches`)."""
    if on_step is None:
        return fn
    calls = 0

    def counted(arg: Any) -> None:
        nonlocal calls
        fn(arg)
        calls += 1
        on_step(calls)

    return counted


def read_progress(path: Path) -> RoundProgress | None:
    """The report in `path`; None when it is missing or not a report (another version's,
    a file being replaced on a file system without atomic rename): a display skips it."""
    try:
        data = json.loads(path.read_text())
        report = RoundProgress(int(data["round"]), int(data["done"]), int(data["planned"]),
                               float(data["started"]), float(data["updated"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not 0 <= report.done <= report.planned:
        return None
    return report


def partner_progress_files(run_out: Path) -> list[Path]:
    """The progress files of a simulation's virtual partners (RUN/partners/partition-N/)."""
    return sorted((run_out / "partners").glob(f"partition-*/{PROGRESS_FILE}"))


def round_progress(reports: Iterable[RoundProgress], *, after: float, min_round: int
                   ) -> tuple[int, list[RoundProgress]] | None:
    """The reports of the newest round >= `min_round` updated at or after `after` (the
    driver's start: a resumed run's folder holds the earlier run's files); None if none."""
    fresh = [r for r in reports if r.round >= min_round and r.updated >= after]
    if not fresh:
        return None
    current = max(r.round for r in fresh)
    return current, [r for r in fresh if r.round == current]


def progress_text(round_id: int, reports: list[RoundProgress], now: float, *,
                  partners: int | None = None) -> str:
    """"round r: s/S steps, ETA mm:ss" over the partners that reported round r.

    `partners`: how many partners train this round (the sampled count). Those that have not
    started (Ray runs as many at once as it has CPUs for) are counted at the mean plan of
    those that have, and the ETA is the steps left over the rate of the partners training
    now (the steps per second of the ones started and unfinished; the finished ones' pace
    while those have just started): right both when partners train side by side and one
    after another."""
    if not reports:
        return f"round {round_id}: waiting for partners"
    done = sum(r.done for r in reports)
    planned = sum(r.planned for r in reports)
    waiting = max(0, (partners or 0) - len(reports))
    total = planned + round(waiting * planned / len(reports))
    text = f"round {round_id}: {done}/{total} steps"
    if waiting:
        text += f" ({len(reports)}/{len(reports) + waiting} partners started)"
    if done >= total:
        return text + ", finishing"
    active = [r for r in reports if r.done < r.planned]
    rate = sum(_rate(r) for r in active)
    paces = [_rate(r) for r in reports if r.done == r.planned and _rate(r) > 0]
    if rate <= 0 and paces:  # the ones training have just started: the finished ones' pace
        rate = sum(paces) / len(paces) * max(1, len(active))
    if rate <= 0:
        return text + ", ETA --:--"
    # time since the last report counts: the ETA moves between a partner's writes
    since = min(max(0.0, now - r.updated) for r in reports)
    left = max(0.0, (total - done) / rate - since)
    return text + f", ETA {_clock(left)}"


def _rate(report: RoundProgress) -> float:
    elapsed = report.updated - report.started
    return report.done / elapsed if report.done and elapsed > 0 else 0.0


def _clock(seconds: float) -> str:
    s = math.ceil(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60:02d}:{s % 60:02d}"
