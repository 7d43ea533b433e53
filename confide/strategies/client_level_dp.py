"""Client-level DP as a wrapper around an inner delta strategy (central, trusted server).

Fixed clipping (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): each node's delta is clipped to L2 norm C, the clipped deltas are averaged with
equal weights (so one client changes the mean by at most C / n), and Gaussian noise with
standard deviation sigma * C / n is added. Accounting is tight: the composition of the
rounds' Gaussian releases by PLD (confide.privacy.accountant), without sampling
amplification, the conservative choice when the server samples a fixed number of clients
(the audit replays it with the closed form of composed Gaussians). The trust in the server
that this needs is removed by distributed DP inside secure aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from confide.privacy.accountant import PLD, pld_epsilon
from confide.privacy.mechanisms import ClientLevelGaussian
from confide.strategies.delta_fedavg import DeltaFedAvg


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
        self.delta = delta
        self.releases: list[ClientLevelGaussian] = []  # the mechanism events, composed
        # Fresh OS entropy unless a test fixes `seed`: noise drawn from the run's `seed` (a
        # recorded, public setting) could be re-drawn by anyone holding the run folder and
        # subtracted from the released model.
        self.rng = np.random.default_rng(seed)
        self.last_release: ClientLevelGaussian | None = None  # this round's, if any

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid, cohort: Sequence[int] | None = None) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid, cohort)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = self.strategy.valid_updates(replies)
        self.last_release = None
        if not updates:
            return None, None
        n = len(updates)
        clipped = [clip_l2(d, self.clipping_norm)[0] for _, d, _ in updates]
        std = self.noise_multiplier * self.clipping_norm / n
        mean = {k: sum(c[k].astype(np.float64) for c in clipped) / n
                + self.rng.normal(0.0, std, size=ref.shape)
                for k, ref in self.strategy.global_state.items()}
        # no amplification by sampling claimed: the server samples fixed-size cohorts
        self.last_release = ClientLevelGaussian(self.noise_multiplier, self.clipping_norm,
                                                self.population, n, sample_rate=1.0)
        self.releases.append(self.last_release)
        metrics = MetricRecord({"num-aggregated": n})
        return self.strategy.apply(mean), metrics

    def epsilon(self) -> float:
        """The cumulative claim: PLD of the releases so far (the accountant of `PLD`)."""
        return pld_epsilon(self.releases, self.delta)

    def state_dict(self) -> dict[str, object]:
        return {"accountant": PLD, "released": [m.to_json() for m in self.releases]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        released = state.get("released")
        if state.get("accountant") != PLD or not isinstance(released, list):
            raise ValueError("the checkpoint's client-level accountant state is from another "
                             "version (no recorded releases); start a new run")
        self.releases = [self._release(x) for x in released]

    def _release(self, saved: object) -> ClientLevelGaussian:
        if isinstance(saved, dict):
            return ClientLevelGaussian.from_json(saved, "checkpoint client-level release")
        # Checkpoints of earlier versions kept only each release's noise multiplier. The
        # claim composes unamplified Gaussians, which the cohort size does not enter, so
        # the release is restored with the population in its place.
        if isinstance(saved, bool) or not isinstance(saved, int | float):
            raise ValueError(f"checkpoint client-level release {saved!r} is not a number")
        return ClientLevelGaussian(float(saved), self.clipping_norm, self.population,
                                   self.population, sample_rate=1.0)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        self.strategy.summary()
