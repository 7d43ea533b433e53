"""The contract between the federation's round loop and the two ways of aggregating a round.

`Federation` (federation.py) sequences rounds, checkpoints and records; one aggregation
runs each round's exchanges: `PlainRounds` (plain_round.py: updates reach the server in the
clear) or `SecureRounds` (secure_round.py: the server only learns their masked sum). Each
takes the round's instructions from the host and returns one `RoundOutcome`; the host
appends the outcome's privacy events to the ledger and adopts its aggregate. Typing the
host with a protocol keeps the aggregations from importing the federation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    from flwr.app import ConfigRecord
    from flwr.serverapp import Grid

    from confide.config import RunConfig
    from confide.privacy.ledger import Ledger
    from confide.privacy.ledger_events import LedgerEvent
    from confide.server.partners import PartnerBook
    from confide.server.run_folder import RunFolder
    from confide.strategies.delta_fedavg import DeltaFedAvg


@dataclass
class RoundOutcome:
    """What one round's aggregation produced."""

    sampled: list[int]  # Flower node ids asked to train
    aggregate: dict[str, np.ndarray] | None  # the new global weights; None: unchanged
    aggregated: list[str]  # partners whose update is in the aggregate
    replied: list[str]  # partners that answered the training request
    dropped: list[str]  # partners (or node-N) that took no part
    uploaded: int  # bytes received from the nodes
    # privacy facts of the aggregation itself (client-level DP, secure aggregation), in the
    # order the ledger records them; the partners' own receipts are recorded as they arrive
    events: list[LedgerEvent] = field(default_factory=list)
    client_level_epsilon: float | None = None  # the run's cumulative claim, when one applies
    metrics: dict[str, Any] = field(default_factory=dict)  # extra metrics.jsonl fields


class RoundHost(Protocol):
    """What an aggregation reads from the federation that runs it."""

    cfg: RunConfig
    grid: Grid
    timeout: float
    folder: RunFolder
    ledger: Ledger | None
    global_state: dict[str, np.ndarray]
    inner: DeltaFedAvg  # the server optimizer that turns an aggregate update into weights
    book: PartnerBook
    rounds_completed: int

    def partner_rows_known(self, rows: list[int]) -> None:
        """Every partner's training rows, learnt before round 1 (shared noise's size
        exchange): the federation's pre-flight can run then."""
        ...


class RoundAggregation(Protocol):
    def run_round(self, server_round: int, config: ConfigRecord) -> RoundOutcome: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
