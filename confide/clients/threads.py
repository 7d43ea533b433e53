"""CPU threads of a deployed node's training.

torch uses every core by default; two SuperNodes on one machine then each run as many
threads as there are cores and a round took 6-9x longer than one node alone. Node config
`threads` (`confide deploy supernode --threads N`) sets the number; 0 or absent means this
machine's cores divided by the SuperNodes running on it when the round starts (each round
is a fresh ClientApp process, so a node started later is taken into account).
"""

from __future__ import annotations

import os
from pathlib import Path

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ThreadsError(ValueError):
    """The node config `threads` is unusable."""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def supernodes_running(proc: Path = Path("/proc")) -> int:
    """`flower-supernode` processes on this machine (Linux /proc; 1 where it cannot tell)."""
    count = 0
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")[:2]
        except OSError:
            continue
        if any(Path(a.decode(errors="replace")).name == "flower-supernode" for a in argv):
            count += 1
    return max(1, count)


def node_threads(setting: object, *, cores: int | None = None, nodes: int | None = None
                 ) -> int:
    """The thread count for node config `threads` = `setting` (0/None/'auto': automatic)."""
    if setting not in (None, "", "auto", 0, "0"):
        try:
            value = int(str(setting))
        except ValueError:
            raise ThreadsError(f"node config threads = {setting!r} is not a whole number") \
                from None
        if value < 1:
            raise ThreadsError(f"node config threads = {value} must be >= 1 (or 0: automatic)")
        return value
    cores = cores or usable_cores()
    nodes = nodes or supernodes_running()
    return max(1, cores // nodes)


def apply_threads(threads: int) -> None:
    """torch's intra-op threads in this process, OMP/MKL for any process it starts."""
    import torch

    torch.set_num_threads(threads)
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
