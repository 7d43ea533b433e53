"""A deployed ClientApp process never outlives its SuperNode.

Flower starts each ClientApp (`flwr-clientapp`) from `flower-superexec`, which the
SuperNode starts. Flower's own guard (`--parent-pid`) polls the parent with `kill(pid, 0)`
and then asks the process to stop with SIGINT, which its main thread must handle: a
ClientApp whose main thread was blocked (a Runtime API call retried without end once the
SuperNode was gone, a join of its heartbeat thread) or whose parent lingered as a zombie
stayed alive, reparented to init, holding the partner's data and CPU. The lifeline is a
daemon thread of Confide's own `flwr-clientapp` wrapper: when the process is reparented,
or its SuperExec or SuperNode is gone (no longer exists, is a zombie, or its pid now names
a later process), it asks for Flower's graceful exit and ends the process `EXIT_GRACE_S`
later whatever its main thread is doing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

WATCH_INTERVAL_S = 0.5
EXIT_GRACE_S = 5.0
EXIT_STATUS = 1  # ended because its node is gone: not a completed task


@dataclass(frozen=True)
class Watched:
    """A process by pid and start time (a pid is reused once its process is reaped)."""

    pid: int
    start: str | None
    role: str

    def gone(self) -> bool:
        now = process_start(self.pid)
        return now is None or (self.start is not None and now != self.start)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """The start time of a live process, None when it is gone or a zombie. Without /proc
    (not Linux): "" for a pid that exists (no start time to compare), else None."""
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return fields[19]  # starttime (field 22 of proc(5))


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields is not None else None


def parent_pid_arg(argv: Sequence[str]) -> int | None:
    """`--parent-pid N` (or `--parent-pid=N`) of Flower's command line, if any."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--parent-pid" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--parent-pid="):
            value = arg.split("=", 1)[1]
        if value is not None:
            with contextlib.suppress(ValueError):
                return int(value)
    return None


def watched_processes(parent_pid: int | None) -> list[Watched]:
    """The SuperExec (our parent) and the SuperNode (its parent); init is never watched."""
    parent = parent_pid or os.getppid()
    found = []
    for role, pid in (("SuperExec", parent), ("SuperNode", parent_of(parent))):
        if pid is None or pid <= 1:
            continue
        start = process_start(pid)
        if start is None:
            continue  # already gone at start: the reparenting check below still holds
        found.append(Watched(pid, start, role))
    return found


def _stop_now(reason: str) -> None:
    """Flower's graceful exit first (its SIGINT handler pushes the task's final status),
    then the process ends after EXIT_GRACE_S whatever its main thread is doing."""
    with contextlib.suppress(Exception):
        print(f"confide: {reason}: this ClientApp stops", file=sys.stderr, flush=True)
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), signal.SIGINT)
    threading.Event().wait(EXIT_GRACE_S)
    os._exit(EXIT_STATUS)


def start_lifeline(parent_pid: int | None, *, interval: float = WATCH_INTERVAL_S,
                   on_gone: Callable[[str], None] = _stop_now) -> threading.Thread:
    """Watch the SuperExec and SuperNode of this process from a daemon thread; call
    `on_gone(reason)` once when this process is reparented or either of them is gone."""
    watched = watched_processes(parent_pid)
    ppid = os.getppid()

    def run() -> None:
        while True:
            threading.Event().wait(interval)
            if os.getppid() != ppid:
                on_gone(f"its parent (pid {ppid}) is gone")
                return
            for w in watched:
                if w.gone():
                    on_gone(f"its {w.role} (pid {w.pid}) is gone")
                    return

    thread = threading.Thread(target=run, name="confide-lifeline", daemon=True)
    thread.start()
    return thread
