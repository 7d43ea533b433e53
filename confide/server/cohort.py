"""Which nodes a round asks: one sampler for the plain and the secure round.

The draw uses Python's `random`, which the run seeds (`Federation.create`) and whose state
every checkpoint keeps, so a resumed run samples as the uninterrupted one would. The plain
round passes the nodes in the grid's order and keeps the sample's order (Flower's sampling
rule, which earlier runs followed); the secure round passes them sorted and sorts the
cohort (its SecAgg client ids follow that order)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from logging import INFO

from flwr.common.logger import log
from flwr.serverapp import Grid

from confide.config import RunConfig
from confide.errors import ConfideError

# a deployed federation whose partners are still connecting gets this long at most
MAX_WAIT_S = 600.0


class TooFewNodes(ConfideError, RuntimeError):
    """Fewer nodes are connected than the round needs, after waiting for them."""

    exit_status = 1  # the run could not go on


def connected_nodes(grid: Grid, need: int, timeout: float) -> list[int]:
    """The grid's connected nodes (in its order), once at least `need` are connected:
    waits up to min(timeout, 10 minutes) for partners still connecting."""
    deadline = time.monotonic() + min(timeout, MAX_WAIT_S)
    waited = 0.0
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= need or time.monotonic() > deadline:
            break
        if waited == 0.0 or time.monotonic() - waited >= 30.0:
            log(INFO, "waiting for nodes to connect: %d connected, %d needed", len(nodes),
                need)
            waited = time.monotonic()
        time.sleep(0.5)
    if len(nodes) < need:
        raise TooFewNodes(f"the round needs at least {need} connected nodes, {len(nodes)} "
                          f"{'is' if len(nodes) == 1 else 'are'} connected")
    return nodes


def cohort_size(connected: int, cfg: RunConfig, *, at_least: int = 1) -> int:
    """fraction-train of the connected nodes, at least `min-clients` (and `at_least`),
    at most all of them."""
    return min(connected, max(at_least, cfg.min_clients,
                              int(connected * cfg.fraction_train)))


def sample_cohort(nodes: Sequence[int], cfg: RunConfig, *, at_least: int = 1) -> list[int]:
    """A round's cohort: `cohort_size` nodes drawn from `nodes` without replacement."""
    return random.sample(list(nodes), cohort_size(len(nodes), cfg, at_least=at_least))
