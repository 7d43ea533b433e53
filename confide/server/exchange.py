"""The one way the server sends a round's messages and waits for the replies (plain and
secure rounds, the size exchange, the receipts query).

Deployed, it pushes the messages through Flower's Grid API and pulls the replies in a loop
until all are in or the timeout passes, and the operator's console (the ServerApp's log)
gets a progress line at least every `PROGRESS_EVERY_S` seconds while it waits. In Flower's
simulation engine the driver shows progress itself (confide.clients.progress and the
simulation driver), so the exchange is the grid's own send_and_receive and logs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

PROGRESS_EVERY_S = 10.0
PULL_EVERY_S = 1.0


def is_simulation(grid: object) -> bool:
    """Flower's simulation engine drives the ServerApp through an InMemoryGrid (possibly
    wrapped, e.g. by server_app.AbortableGrid, which keeps it as `.inner`)."""
    seen = 0
    while type(grid).__name__ != "InMemoryGrid" and hasattr(grid, "inner") and seen < 8:
        grid, seen = grid.inner, seen + 1
    return type(grid).__name__ == "InMemoryGrid"


def _clock(seconds: float) -> str:
    whole = max(0, round(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


@dataclass
class RoundProgress:
    """What the progress line knows of the round in flight: its number, when it started
    and how long the previous round took (for the ETA)."""

    server_round: int = 0
    started: float = 0.0  # time.monotonic() at the round's start
    previous_s: float | None = None  # the previous round's duration, when there was one

    def start(self, server_round: int) -> None:
        self.server_round, self.started = server_round, time.monotonic()

    def finish(self) -> None:
        self.previous_s = time.monotonic() - self.started

    def line(self, what: str, received: int, asked: int, waited: float) -> str:
        """The operator's progress line: replies received / asked, elapsed and an ETA.

        It counts replies only: partners send the server no training progress (steps
        done are the partner's own to show; see the disclosure rule in
        confide.clients.progress), so the ETA comes from the previous round's duration,
        or, in a run's first round, from the pace of the replies so far."""
        elapsed = time.monotonic() - self.started
        if self.previous_s is not None:
            eta = (f"ETA {_clock(self.previous_s - elapsed)} (the previous round took "
                   f"{_clock(self.previous_s)})" if elapsed < self.previous_s
                   else f"over the previous round's {_clock(self.previous_s)}")
        elif received:
            eta = f"ETA {_clock(waited * (asked - received) / received)} (from the replies so far)"
        else:
            eta = "ETA unknown until the first reply"
        return (f"round {self.server_round}: {what}: {received} of {asked} replies, "
                f"{_clock(elapsed)} elapsed in the round, {eta}")


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float,
             progress: RoundProgress | None = None, what: str = "train") -> list[Message]:
    """Send `messages` and return the replies that arrive within `timeout` seconds.
    `progress`: log the progress line while waiting (deployed runs; ignored in simulation
    and for grids that are not Flower's, such as in-process test grids)."""
    messages = list(messages)
    if not messages:
        return []
    if progress is None or not isinstance(grid, Grid) or is_simulation(grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    asked = len(messages)
    pending = set(grid.push_messages(messages))
    start = time.monotonic()
    end, shown = start + timeout, start
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        now = time.monotonic()
        if not pending or now >= end:
            break
        if now - shown >= PROGRESS_EVERY_S:
            log(INFO, "%s", progress.line(what, len(replies), asked, now - start))
            shown = now
        time.sleep(min(PULL_EVERY_S, max(0.0, end - now)))
    return replies
