"""Client-level DP as a wrapper around an inner delta strategy (central, trusted server).

Fixed clipping (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): each node's delta is clipped to L2 norm C, the clipped deltas are averaged with
equal weights (so one client changes the mean by at most C / n), and Gaussian noise with
standard deviation sigma * C / n is added. Accounting uses Flower's RDP accountant
(`flwr.supercore.privacy_accounting`) without sampling amplification, the conservative
choice when the server samples a fixed number of clients. The trust in the server that
this needs is removed by distributed DP inside secure aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from confide.strategies.delta_fedavg import DeltaFedAvg

MECHANISM = "gaussian_fixed_clipping"


def clip_l2(delta: dict[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in delta.values())))
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in delta.items()}, norm


class ClientLevelDp(Strategy):
    """Wraps a DeltaFedAvg: clip, equal-weight mean, Gaussian noise, account."""

    def __init__(self, strategy: DeltaFedAvg, *, noise_multiplier: float, clipping_norm: float,
                 population: int, delta: float, seed: int | None = None) -> None:
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.population = population
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=delta, population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        self.rng = np.random.default_rng(seed)
        self.last_event: dict[str, float | int | str] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = self.strategy.valid_updates(replies)
        self.last_event = None
        if not updates:
            return None, None
        n = len(updates)
        clipped = [clip_l2(d, self.clipping_norm)[0] for _, d, _ in updates]
        std = self.noise_multiplier * self.clipping_norm / n
        mean = {k: sum(c[k].astype(np.float64) for c in clipped) / n
                + self.rng.normal(0.0, std, size=ref.shape)
                for k, ref in self.strategy.global_state.items()}
        self.accountant.compose(GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier, sample_size=n,
            population_size=self.population))
        self.last_event = {"mechanism": MECHANISM, "noise_multiplier": self.noise_multiplier,
                           "clipping_norm": self.clipping_norm, "population": self.population,
                           "sampled": n, "sample_rate": 1.0}
        metrics = MetricRecord({"num-aggregated": n})
        return self.strategy.apply(mean), metrics

    def epsilon(self) -> float:
        return float(self.accountant.get_privacy_spent().epsilon)

    def state_dict(self) -> dict[str, object]:
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.accountant.load_state_dict(state)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        self.strategy.summary()
