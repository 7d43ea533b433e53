"""What a secure round needs from the federation that runs it.

`Federation` (federation.py) builds `SecureRounds` (secure_round.py) and hands it itself;
typing that argument with this protocol instead of the class keeps the two modules from
importing each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    from flwr.app import Message
    from flwr.serverapp import Grid

    from confide.config import RunConfig
    from confide.privacy.ledger import Ledger
    from confide.strategies.delta_fedavg import DeltaFedAvg


class RoundHost(Protocol):
    cfg: RunConfig
    grid: Grid
    timeout: float
    global_state: dict[str, np.ndarray]
    inner: DeltaFedAvg
    ledger: Ledger | None
    client_dp_epsilon: float | None
    # set by _sort_replies for the round being sorted
    _dropped: list[str]
    _reply_partner: dict[int, str]

    def _sort_replies(self, server_round: int, replies: Iterable[Message],
                      expected: set[int] | None = None) -> tuple[list[Message], int]: ...

    def check_budget_left(self, server_round: int, trained: list[Message]) -> None: ...
