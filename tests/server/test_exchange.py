"""The one exchange function: deployed, it pushes and pulls through Flower's Grid API and the
operator's console gets a progress line (replies received / asked, elapsed, ETA) while it
waits; its timeout is kept; in simulation it is the grid's own send_and_receive and logs
nothing (the driver shows progress)."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from confide.server import exchange as X
from confide.server.exchange import RoundProgress, exchange


class SlowGrid(Grid):
    """A Flower Grid whose node `n` answers `n * delay` seconds after the push; nodes in
    `silent` never answer."""

    def __init__(self, delay: float, silent: frozenset[int] = frozenset()) -> None:
        self.delay, self.silent = delay, silent
        self.pushed: dict[str, Message] = {}
        self.at = 0.0
        self.calls = {"push": 0, "pull": 0, "send_and_receive": 0}

    def set_run(self, run: object) -> None: ...

    @property
    def run(self) -> object:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.calls["push"] += 1
        self.at = time.monotonic()
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            self.pushed[f"m{i}"] = m
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.calls["pull"] += 1
        now = time.monotonic() - self.at
        out = []
        for mid in list(message_ids):
            node = self.pushed[mid].metadata.dst_node_id
            if node not in self.silent and now >= node * self.delay:
                reply = Message(RecordDict({"c": ConfigRecord({"ok": 1})}),
                                reply_to=self.pushed.pop(mid))
                out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        self.calls["send_and_receive"] += 1
        return []


def _messages() -> list[Message]:
    return [Message(RecordDict({"c": ConfigRecord({"x": n})}), dst_node_id=n,
                    message_type="train") for n in (1, 2, 3)]


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(X, "PROGRESS_EVERY_S", 0.2)
    monkeypatch.setattr(X, "PULL_EVERY_S", 0.05)


def test_deployed_exchange_logs_progress_while_it_waits(fast: None, flwr_records) -> None:
    grid = SlowGrid(delay=0.3)
    progress = RoundProgress()
    progress.start(4)
    replies = exchange(grid, _messages(), timeout=30, progress=progress, what="train")
    assert len(replies) == 3 and grid.calls["send_and_receive"] == 0
    lines = [r.getMessage() for r in flwr_records.records if "replies" in r.getMessage()]
    assert lines, "no progress line while waiting ~0.9 s with a 0.2 s period"
    assert all(line.startswith("round 4: train: ") and " of 3 replies, " in line
               and "elapsed in the round" in line and "ETA" in line for line in lines), lines
    assert any("1 of 3 replies" in line or "2 of 3 replies" in line for line in lines), lines


def test_the_eta_comes_from_the_previous_round() -> None:
    progress = RoundProgress(server_round=2, started=time.monotonic() - 30, previous_s=90.0)
    line = progress.line("train", 1, 4, 30.0)
    assert "1 of 4 replies" in line and "0:30 elapsed" in line
    assert "ETA 1:00 (the previous round took 1:30)" in line
    first = RoundProgress(server_round=1, started=time.monotonic() - 20)
    assert "ETA 0:40 (from the replies so far)" in first.line("train", 2, 6, 20.0)
    assert "ETA unknown" in first.line("train", 0, 6, 20.0)


def test_the_timeout_is_kept_and_late_replies_are_left_out(fast: None) -> None:
    grid = SlowGrid(delay=0.05, silent=frozenset({3}))
    start = time.monotonic()
    replies = exchange(grid, _messages(), timeout=0.6, progress=RoundProgress(), what="train")
    took = time.monotonic() - start
    assert len(replies) == 2  # node 3 never answered
    assert 0.55 <= took < 2.0, took


def test_simulation_and_in_process_grids_use_their_own_send_and_receive(
        flwr_records) -> None:
    class InMemoryGrid(SlowGrid):  # the simulation engine's grid, by its name
        pass

    grid = InMemoryGrid(delay=0.0)
    assert exchange(grid, _messages(), timeout=5, progress=RoundProgress()) == []
    assert grid.calls == {"push": 0, "pull": 0, "send_and_receive": 1}
    assert not [r for r in flwr_records.records if "replies" in r.getMessage()]
    assert exchange(SlowGrid(0.0), [], timeout=5, progress=RoundProgress()) == []
