"""A deployed ClientApp ends with its SuperNode (confide.deploy.lifeline).

Stand-ins for Flower's process tree (SuperNode -> SuperExec -> ClientApp) whose ClientApp
never handles a stop request in its main thread, as the ClientApp seen hung in a futex wait
after its SuperNode was stopped. With Flower's own parent monitor only it survives its
parents (the failure, reproduced first); with the lifeline it is gone within seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from confide.deploy import lifeline

TREE = textwrap.dedent("""
    import os, signal, subprocess, sys, threading
    role, guard, pids = sys.argv[1], sys.argv[2], sys.argv[3]
    if role == "supernode":
        subprocess.Popen([sys.executable, __file__, "superexec", guard, pids])
        threading.Event().wait()
    elif role == "superexec":  # Flower passes its pid as --parent-pid
        subprocess.Popen([sys.executable, __file__, "clientapp", guard, pids,
                          "--parent-pid", str(os.getpid())])
        threading.Event().wait()
    else:
        # the stop request (SIGINT) never reaches Python code in the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        parent = int(sys.argv[5])
        if guard == "flower":
            from flwr.supercore.app_utils import start_parent_process_monitor
            start_parent_process_monitor(parent)
        else:
            from confide.deploy import lifeline
            lifeline.EXIT_GRACE_S = 0.5
            lifeline.start_lifeline(lifeline.parent_pid_arg(sys.argv[4:]))
        with open(pids, "a") as fh:
            fh.write(f"{os.getppid()} {os.getpid()}\\n")
        threading.Event().wait()
""")


def _alive(pid: int) -> bool:
    return lifeline.process_start(pid) is not None


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture()
def started(tmp_path: Path) -> Iterator[list[int]]:
    """Pids this test started (ended at teardown, one by one)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tree(tmp_path: Path, guard: str, started: list[int]
          ) -> tuple[subprocess.Popen, int, int]:
    """(SuperNode stand-in, SuperExec pid, ClientApp pid) once the ClientApp is ready."""
    script, pids = tmp_path / "tree.py", tmp_path / f"pids-{guard}"
    script.write_text(TREE)
    node = subprocess.Popen([sys.executable, str(script), "supernode", guard, str(pids)],
                            env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    started.append(node.pid)
    deadline = time.monotonic() + 60
    while not (pids.exists() and pids.read_text().strip()):
        assert time.monotonic() < deadline, "the stand-in ClientApp did not start"
        time.sleep(0.1)
    superexec, clientapp = (int(x) for x in pids.read_text().split())
    started.extend([superexec, clientapp])
    return node, superexec, clientapp


def test_clientapp_survived_its_superexec_with_flower_guard_only(tmp_path: Path,
                                                                 started: list[int]) -> None:
    node, superexec, clientapp = _tree(tmp_path, "flower", started)
    os.kill(superexec, signal.SIGKILL)
    time.sleep(3)
    assert _alive(clientapp)  # reparented, still running: what the lifeline is for
    assert lifeline.parent_of(clientapp) != superexec
    node.kill()
    node.wait()


@pytest.mark.parametrize("stopped", ["superexec", "supernode"])
def test_clientapp_ends_with_its_superexec_or_supernode(tmp_path: Path, started: list[int],
                                                        stopped: str) -> None:
    node, superexec, clientapp = _tree(tmp_path, "lifeline", started)
    # a SuperNode stopped alone (its SuperExec left running), or the SuperExec killed
    os.kill(node.pid if stopped == "supernode" else superexec, signal.SIGKILL)
    start = time.monotonic()
    assert _wait_gone(clientapp, 10), f"ClientApp {clientapp} outlived its {stopped}"
    assert time.monotonic() - start < lifeline.WATCH_INTERVAL_S + 0.5 + 3
    node.kill()
    node.wait(10)


def test_watched_processes_and_the_parent_pid_argument() -> None:
    assert lifeline.parent_pid_arg(["--token", "t", "--parent-pid", "42"]) == 42
    assert lifeline.parent_pid_arg(["--parent-pid=7"]) == 7
    assert lifeline.parent_pid_arg(["--insecure"]) is None
    watched = lifeline.watched_processes(os.getpid())
    assert [w.role for w in watched][:1] == ["SuperExec"] and watched[0].pid == os.getpid()
    assert not watched[0].gone()
    # a pid whose process was replaced by a later one (pid reuse) counts as gone
    assert lifeline.Watched(os.getpid(), "0", "SuperNode").gone()
    reported: list[str] = []
    thread = lifeline.start_lifeline(None, interval=0.05, on_gone=reported.append)
    time.sleep(0.3)  # this process's parent and grandparent are alive: nothing reported
    assert thread.is_alive() and reported == []
    # a zombie (exited, not reaped) is gone
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(1.0)
    assert lifeline.process_start(zombie.pid) is None
    zombie.wait()


def test_heartbeat_stops_before_the_task_reports_it_finished() -> None:
    # Flower revokes the task's token when it reports its output; a heartbeat after that
    # was refused with 401 ("Runtime task-token authentication failed") in every node log
    from flwr.supercore.heartbeat import HeartbeatSender

    from confide.deploy.verified_clientapp import _heartbeats_first

    beats: list[float] = []
    seen: list[bool] = []
    sender_cls, push = _heartbeats_first(
        HeartbeatSender, lambda **_: seen.append(sender.is_running))
    sender = sender_cls(lambda: beats.append(time.monotonic()) or True)
    sender.start()
    push(client=None, context=None, sub_status="completed", details="")
    assert seen == [False] and beats  # it had been beating, and stopped before the report
    count = len(beats)
    time.sleep(0.2)
    assert len(beats) == count
