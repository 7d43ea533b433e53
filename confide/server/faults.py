"""Named crash points: fault injection that really kills the server process.

The fault-injection tests (tests/server/test_fault_injection.py) and the deployment tests
set `CONFIDE_CRASH_AT=stage:round` (or `stage:round:detail`) in the server's environment;
the code consults `crash_point(stage, round)` at that stage of a round and, when it is the
armed one, the process dies with `os._exit` (no exception handler, no `finally`, no atexit:
what `kill -9` or a power cut leaves). Unset, a crash point costs one dictionary lookup.

Stages (where they are consulted):
    before-sampling   federation: a round starts, before any node is sampled
    after-replies     plain and secure rounds: the nodes' replies are in (they spent
                      budget), none recorded
    mid-aggregation   plain and secure rounds: the aggregate is computed (secure: the sum
                      unmasked), not yet applied or recorded
    mid-checkpoint    run_folder: the checkpoint's weights are in their temp file, not renamed
    ledger-append     ledger: part of an entry's line is written (detail: the entry type)
    after-round       federation: the round is complete and checkpointed

The ledger lives in the privacy core, which knows nothing of fault injection: it offers a
hook before each write (`Ledger.before_write`), and the server plugs `ledger_crash_point`
into it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

CRASH_AT_ENV = "CONFIDE_CRASH_AT"
# optional: only the run whose folder is this one dies (a test process running several)
CRASH_RUN_DIR_ENV = "CONFIDE_FAULT_CRASH_RUN_DIR"
# earlier name of `after-round:N`, still read (deployment tests, scripts)
CRASH_AFTER_ROUND_ENV = "CONFIDE_FAULT_CRASH_AFTER_ROUND"
CRASH_EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL
STAGES = ("before-sampling", "after-replies", "mid-aggregation", "mid-checkpoint",
          "ledger-append", "after-round")


def armed(stage: str, round_: int, *, detail: str = "", run_dir: Path | None = None) -> bool:
    """True when this process is asked to die at `stage` of `round_` (and `detail`)."""
    spec = os.environ.get(CRASH_AT_ENV, "")
    if not spec and stage == "after-round" and os.environ.get(CRASH_AFTER_ROUND_ENV):
        spec = f"after-round:{os.environ[CRASH_AFTER_ROUND_ENV]}"
    if not spec:
        return False
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in STAGES or not parts[1].isdigit():
        raise ValueError(f"{CRASH_AT_ENV}={spec!r}: expected stage:round[:detail] with a "
                         f"stage among {', '.join(STAGES)}")
    if parts[0] != stage or int(parts[1]) != round_:
        return False
    if len(parts) == 3 and parts[2] != detail:
        return False
    only_in = os.environ.get(CRASH_RUN_DIR_ENV)
    return not only_in or run_dir is None or Path(only_in).resolve() == Path(run_dir).resolve()


def die(stage: str, round_: int) -> None:
    """Leave now, like `kill -9`: no cleanup of any kind runs."""
    sys.stderr.write(f"fault injection: server process dies at {stage} of round {round_}\n")
    sys.stderr.flush()
    os._exit(CRASH_EXIT_CODE)


def crash_point(stage: str, round_: int, *, detail: str = "",
                run_dir: Path | None = None) -> None:
    if armed(stage, round_, detail=detail, run_dir=run_dir):
        die(stage, round_)


def ledger_crash_point(run_dir: Path) -> Callable[[str, int, Callable[[], None]], None]:
    """The ledger's `before_write` hook for the run in `run_dir`: at an armed
    `ledger-append:round:entry type`, get part of the entry's line out, then die."""

    def before_write(kind: str, round_: int, write_part: Callable[[], None]) -> None:
        if armed("ledger-append", round_, detail=kind, run_dir=run_dir):
            write_part()
            die("ledger-append", round_)

    return before_write
