"""Ctrl-C and SIGTERM during `confide simulate`: stop within seconds, at any point.

The first SIGINT or SIGTERM asks the server to leave now (`StopRequest.abort`): between
rounds it records `run_interrupted`; inside a round its next exchange raises (the
`AbortableGrid`), so the round in progress is abandoned, as after a crash. The partners'
training in flight is ended too (this process's Ray workers are killed), so that Flower's
engine stops waiting for it. What a partner spent in the abandoned round is in its own
record (its node state, written before it replies): the resumed run records it through
the lost-receipt path. The driver then shuts Ray down, ends every process it started
(Ray's agents included), writes the report and prints the resume command.

If the engine has not ended `GRACE_SECONDS` after the signal (a step that cannot be
interrupted, such as a long central evaluation), or on a second signal, the driver leaves
at once: every process it started is killed, and the run resumes from its last
checkpoint (every run-folder file is replaced atomically; a torn ledger line is set aside
on resume).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn

from confide.server.recovery import StopRequest
from confide.simulation import ray_cluster

GRACE_SECONDS = 6.0  # first signal -> the engine has ended, or the driver leaves at once
REAP_INTERVAL = 0.5  # until then, workers Ray starts (for actors still being created) die
SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = 130  # the shell's code for "stopped by SIGINT"


class SignalStop:
    """The driver's handlers for SIGINT and SIGTERM around one simulation.

    `message` says where the run stands and how to resume it (read when the driver leaves
    at once); `say` prints a line for the user; `local_ray`: Ray runs as this process's
    own instance, so its workers and daemons are this process's descendants."""

    def __init__(self, stop: StopRequest, say: Callable[[str], None],
                 message: Callable[[], str], *, local_ray: bool,
                 grace: float = GRACE_SECONDS) -> None:
        self.stop = stop
        self.say = say
        self.message = message
        self.local_ray = local_ray
        self.grace = grace
        self.signal_name = ""  # the first signal's name; empty while none arrived
        self.engine_ended = threading.Event()
        self.started: list[Any] = []  # psutil.Process: what this process started, by then
        self._previous: dict[int, Any] = {}

    @property
    def signalled(self) -> bool:
        return bool(self.signal_name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[SignalStop]:
        """The handlers for the duration of the block (the previous ones afterwards); a
        no-op outside the main thread, where Python cannot set handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self.install()
        try:
            yield self
        finally:
            self.engine_ended.set()  # the command is leaving by itself: no timer may end it
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous.clear()

    def install(self) -> None:
        """Set (or set again) this object's handlers: `ray.init` replaces the SIGTERM
        handler with one that raises SystemExit in whatever the main thread is doing."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    @contextlib.contextmanager
    def engine(self) -> Iterator[None]:
        """Around the simulation engine: when it has ended, the grace timer stands down."""
        try:
            yield
        finally:
            self.engine_ended.set()

    def check_not_stopped(self, where: str) -> None:
        """Before something long starts: a stop asked for earlier ends the command here."""
        if self.signalled:
            from confide.server.recovery import Interrupted

            raise Interrupted(f"stopped ({self.signal_name}) {where}")

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signalled:
            self.leave_now(f"{name} again")
        self.signal_name = name
        self.stop.abort(name)
        self.say(f"{name}: stopping now; the round in progress is abandoned and the run "
                 f"stays resumable (a second {name} leaves at once) ...")
        if self.local_ray:
            self.started = ray_cluster.descendants()
            ray_cluster.kill_workers(self.started)  # Flower's engine waits for their tasks
        if not self.engine_ended.is_set():
            threading.Thread(target=self._grace_timer, name="confide-stop-timer",
                             daemon=True).start()

    def _grace_timer(self) -> None:
        deadline = time.monotonic() + self.grace
        while not self.engine_ended.wait(REAP_INTERVAL):
            if self.local_ray:  # a worker Ray started since (an actor still being created)
                ray_cluster.kill_workers(ray_cluster.descendants())
            if time.monotonic() >= deadline:
                self.leave_now(f"the simulation did not stop within {self.grace:g} s of "
                               f"{self.signal_name}")

    def end_processes(self) -> None:
        """Every process this one started (Ray's daemons, agents and workers) ends: those
        still alive after Ray's shutdown are terminated, then killed."""
        if self.local_ray:
            ray_cluster.end_processes([*self.started, *ray_cluster.descendants()])

    def leave_now(self, why: str) -> NoReturn:
        """Kill every process this one started and exit, without waiting for any thread."""
        if self.local_ray:
            ray_cluster.end_processes([*self.started, *ray_cluster.descendants()],
                                      timeout=0.0)
        try:
            text = self.message()
        except Exception as exc:  # the message must not keep the process alive
            text = f"the run folder could not be read ({exc})"
        print(f"confide: {why}: leaving now. {text}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
