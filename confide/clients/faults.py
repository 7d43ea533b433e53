"""Fault injection for simulations: which virtual partner drops out, at which stage.

Decisions are a pure function of (seed, round, node), so a simulation is reproducible and the
server, a test or a re-run can tell in advance who will drop. Used by the secure-aggregation
client adapter (`dropout-rate`, `dropout-stage`); the server refuses these keys outside the
simulation engine.
"""

from __future__ import annotations

import numpy as np

STAGES = ("share-keys", "masked-input", "unmask")
_DOMAIN = 0x5EC_A66  # separates this stream from every other use of the run seed


def drops_out(seed: int, server_round: int, node: int, rate: float) -> bool:
    """True if `node` (its partition id in simulation) drops in `server_round`."""
    if rate <= 0:
        return False
    rng = np.random.default_rng([_DOMAIN, int(seed), int(server_round), int(node)])
    return bool(rng.random() < rate)


def planned_dropouts(seed: int, server_round: int, nodes: range | list[int], rate: float
                     ) -> list[int]:
    """The nodes that drop in a round (for tests and for choosing seeds)."""
    return [n for n in nodes if drops_out(seed, server_round, n, rate)]
