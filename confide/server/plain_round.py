"""Plain aggregation: one exchange per round; every sampled node's update reaches the server in
the clear and is averaged (weighted by rows, `DeltaFedAvg`), with client-level DP noise
added by the server when `client-dp` is on (`ClientLevelDp`). The secure counterpart is
secure_round.py; both return a `RoundOutcome` (aggregation.py).
"""

from __future__ import annotations

from logging import INFO
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord
from flwr.common.logger import log

from confide import wire as W
from confide.privacy import ledger_events as E
from confide.privacy.accountant import PLD
from confide.server.aggregation import RoundOutcome
from confide.server.cohort import connected_nodes, sample_cohort
from confide.server.faults import crash_point
from confide.server.partners import check_any_trained, check_budget_left
from confide.strategies.client_level_dp import ClientLevelDp
from confide.strategies.delta_fedavg import DeltaFedAvg, arrays_to_numpy

if TYPE_CHECKING:
    from confide.server.aggregation import RoundHost


class PlainRounds:
    def __init__(self, host: RoundHost, strategy: DeltaFedAvg | ClientLevelDp) -> None:
        self.host = host
        self.strategy = strategy  # the federation's DeltaFedAvg, or ClientLevelDp around it
        self.inner = strategy.strategy if isinstance(strategy, ClientLevelDp) else strategy

    def run_round(self, server_round: int, config: ConfigRecord) -> RoundOutcome:
        host = self.host
        nodes = connected_nodes(host.grid, host.cfg.min_clients, host.timeout)
        sampled = sample_cohort(nodes, host.cfg)
        log(INFO, "round %d: sampled %d of %d connected nodes", server_round, len(sampled),
            len(nodes))
        messages = list(self.strategy.configure_train(
            server_round, W.to_array_record(host.global_state), config, host.grid, sampled))
        for message in messages:
            host.book.prepare_train(message, server_round)
        host.record(E.RoundConfigured(round=server_round, sampled=[str(n) for n in sampled]))
        replies = host.exchange(messages, "train")
        crash_point("after-replies", server_round, run_dir=host.run_dir)
        recorded = host.book.record_replies(host, server_round, replies, set(sampled))
        first = host.first_round
        check_budget_left(server_round, recorded, first_round=first,
                          target_epsilon=host.cfg.target_epsilon)
        check_any_trained(server_round, recorded, len(sampled), first_round=first)
        arrays, _ = self.strategy.aggregate_train(server_round, recorded.trained)
        crash_point("mid-aggregation", server_round, run_dir=host.run_dir)
        rejected = {node for node, _ in self.inner.rejected}
        aggregate = None if arrays is None else arrays_to_numpy(arrays)
        aggregated = [] if arrays is None else [
            recorded.partner_of[m.metadata.src_node_id] for m in recorded.trained
            if m.metadata.src_node_id not in rejected]
        outcome = RoundOutcome(
            sampled=sampled, aggregate=aggregate, aggregated=aggregated,
            replied=sorted(recorded.partner_of.values()), dropped=sorted(recorded.dropped),
            uploaded=recorded.uploaded)
        self._client_level_dp(server_round, outcome)
        return outcome

    def _client_level_dp(self, server_round: int, outcome: RoundOutcome) -> None:
        """The server's own Gaussian noise on the clipped mean (client-level DP)."""
        strategy = self.strategy
        if not isinstance(strategy, ClientLevelDp) or strategy.last_release is None:
            return
        outcome.client_level_epsilon = strategy.epsilon()
        outcome.events.append(E.ClientDpEvent(
            round=server_round, mechanism=strategy.last_release, delta=self.host.cfg.delta,
            epsilon_claimed=outcome.client_level_epsilon, accountant=PLD))

    def state_dict(self) -> dict[str, Any]:
        if isinstance(self.strategy, ClientLevelDp):
            return {"client_dp_accountant": self.strategy.state_dict()}
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.strategy, ClientLevelDp) and "client_dp_accountant" in state:
            self.strategy.load_state_dict(state["client_dp_accountant"])

