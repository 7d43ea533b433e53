"""The contract between the federation's round loop and the two ways of aggregating a round.

`Federation` (federation.py) sequences rounds, checkpoints and records; one aggregation
runs each round's exchanges: `PlainRounds` (plain_round.py: updates reach the server in the
clear) or `SecureRounds` (secure_round.py: the server only learns their masked sum). Each
takes the round's instructions from the host and returns one `RoundOutcome`; the host
appends the outcome's privacy events to the ledger and adopts its aggregate. What must be in
the ledger before the round ends (the round's sample, the partners' receipts: a crash mid-
aggregation must find them) is handed to the host's `record` as it happens; only the host
holds the `Ledger`. Typing the host with a protocol keeps the aggregations from importing
the federation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from confide.server.run_record import RunRecord

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    import numpy as np
    from flwr.app import ConfigRecord, Message
    from flwr.serverapp import Grid

    from confide.config import RunConfig
    from confide.privacy.ledger_events import LedgerEvent
    from confide.server.partners import PartnerBook


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


class RoundHost(RunRecord, Protocol):
    """What an aggregation reads from the federation that runs it (all read-only: the
    host adopts the outcome), and the two things it may ask of it."""

    @property
    def cfg(self) -> RunConfig: ...

    @property
    def grid(self) -> Grid: ...

    @property
    def timeout(self) -> float: ...

    @property
    def run_dir(self) -> Path:
        """The run folder (fault injection's crash points are armed per run)."""
        ...

    @property
    def global_state(self) -> Mapping[str, np.ndarray]: ...

    @property
    def book(self) -> PartnerBook: ...

    @property
    def first_round(self) -> bool:
        """No round of this run is complete yet (a resumed run's first round is not)."""
        ...

    def server_step(self, mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global weights after one server-optimizer step along `mean_delta` (the
        host's global weights are unchanged until it adopts the round's outcome)."""
        ...

    def partner_rows_known(self, rows: list[int]) -> None:
        """Every partner's training rows, learnt before round 1 (shared noise's size
        exchange): the federation's pre-flight can run then."""
        ...

    def exchange(self, messages: list[Message], what: str) -> list[Message]:
        """Send `messages`, return the replies within the run's timeout (exchange.py);
        `what` names the exchange in the operator's progress line."""
        ...


class RoundAggregation(Protocol):
    def run_round(self, server_round: int, config: ConfigRecord) -> RoundOutcome: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
