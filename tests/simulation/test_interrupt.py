"""One Ctrl-C during `confide simulate` (SIGINT to the process group, as a
terminal sends it) stops the run at a safe point: exit 130 within seconds of the round in
flight, no Ray process left, run_interrupted in the ledger, the folder verifies, the
message says how to resume, and resuming finishes a run that verifies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from confide.audit.verify import verify_run
from confide.config import build_config
from confide.server.federation import Federation
from tests.inprocess import InProcessGrid

VALUES = {"model": "tiny", "clients": 2, "rounds": 3, "seed": 7, "max-length": 16,
          "noise-multiplier": 1.1, "batch-size": 16, "physical-batch-size": 16,
          "local-epochs": 0.04, "preflight": "off"}
ARGS = ["--model", "tiny", "--clients", "2", "--rounds", "3", "--seed", "7",
        *[x for k in ("max-length", "noise-multiplier", "batch-size", "physical-batch-size",
                      "local-epochs", "preflight") for x in ("--set", f"{k}={VALUES[k]}")]]


def ledger_types(out: Path) -> list[str]:
    path = out / "ledger.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["type"] for x in path.read_text().splitlines() if x.endswith("}")]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_one_sigint_stops_cleanly_and_the_run_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "confide.cli", "simulate", *ARGS,
                             "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 480
        while ledger_types(out).count("round_configured") < 2:  # round 2 is in flight
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "round 2 never started"
            time.sleep(0.2)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what one Ctrl-C in the terminal does
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    # the round in flight is finished (its nodes spent budget), then the run stops
    assert took < 60, f"took {took:.0f} s to stop"
    gone = time.monotonic() + 30  # Ray's own daemons take a few seconds to wind down
    while group_alive(proc.pid) and time.monotonic() < gone:
        time.sleep(0.5)
    assert not group_alive(proc.pid), "Ray workers or other children outlived the run"
    types = ledger_types(out)
    assert types[-1] == "run_interrupted" and types.count("round_completed") == 2
    assert "resumable" in err and "--resume" in err and "Traceback" not in err
    assert not (out / "summary.json").exists()
    result = verify_run(out)
    assert result.ok, [str(p) for p in result.problems]

    # resume (in process: the same partners, their state is in the run folder)
    cfg = build_config({**VALUES, "out": str(out), "resume": True})
    Federation.open(InProcessGrid(2), cfg, out).run()
    types = ledger_types(out)
    assert types.count("run_resumed") == 1 and types[-1] == "run_finished"
    assert types.count("round_completed") == 3
    result = verify_run(out)
    assert result.ok, [str(p) for p in result.problems]
