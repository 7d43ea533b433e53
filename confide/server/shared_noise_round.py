"""Shared-noise example-level DP on the server: the size exchange and the run's one sampling
rate and noise multiplier.

Before the first secure round (and for a node that joins later) the server asks each
connected node for its record count and sampling rate (a `train.secagg` exchange), then fixes
the run's parameters once: one Poisson rate q = batch-size / (all partners' records) for
every partner, so that the secure sum is central DP-SGD's step on the union, and sigma by
the mode's rule (`confide.privacy.mode_rules`' `SharedNoise.noise_multiplier`: the run's one
calibration rule, one step per round). A node re-checks its own epsilon for that rate and
sigma before each round and refuses when over budget.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message
from flwr.common.logger import log

from confide import wire as W
from confide.config import ConfigError
from confide.privacy.mode_rules import rules_of
from confide.privacy.sampling import poisson_rate
from confide.privacy.secagg import SecAggConfig, SecAggError
from confide.privacy.secagg.shared_noise import SharedNoiseConfig
from confide.server.recovery import EveryPartnerFailed

if TYPE_CHECKING:
    from confide.server.aggregation import RoundHost

# (server round, config, node -> its part of the secagg record) -> replies
Exchange = Callable[[int, ConfigRecord, dict[int, dict[str, Any]]], list[Message]]


class SharedNoiseRound:
    """The partners' (rows, rate) and the run's (rate, sigma), fixed once per run."""

    def __init__(self, host: RoundHost, exchange: Exchange, nodes: Callable[[], list[int]],
                 vector_length: int) -> None:
        self.host = host
        self.exchange = exchange
        self.nodes = nodes  # the connected nodes
        self.vector_length = vector_length
        self.sigma: float | None = None
        self.rate = 0.0  # the run's common sampling rate (set with sigma)
        self.partner_info: dict[int, tuple[int, float]] = {}  # node -> (rows, rate)

    def name(self, node: int) -> str:
        return self.host.book.node_name(node)

    def ask_sizes(self, config: ConfigRecord, server_round: int) -> None:
        """Ask connected nodes whose rows and rate are unknown (at the start of a run or
        for a newcomer), and fix the run's rate and sigma once."""
        missing = [n for n in self.nodes() if n not in self.partner_info]
        if missing:
            parts: dict[int, dict[str, Any]] = {n: {W.SHARED_INFO: True} for n in missing}
            for reply in self.exchange(server_round, config, parts):
                self._read_size(reply)
        if self.sigma is None and self.partner_info:
            self._fix_parameters()
        if self.rate:
            # newcomers sample at the run's rate too
            self.partner_info = {n: (rows, self.rate)
                                 for n, (rows, _) in self.partner_info.items()}

    def _read_size(self, reply: Message) -> None:
        up = None if reply.has_error() else reply.content.config_records.get(W.SECAGG_UP)
        if up is None or W.SHARED_INFO not in up:
            return
        try:
            info = json.loads(str(up[W.SHARED_INFO]))
            rows, rate = int(info["examples"]), float(info["sample_rate"])
            if rows < 1 or not 0 < rate <= 1:
                raise ValueError(f"rows {rows}, rate {rate}")
        except (ValueError, KeyError, TypeError) as exc:
            log(WARNING, "%s: unusable shared-noise info: %s",
                self.name(reply.metadata.src_node_id), exc)
            return
        self.partner_info[reply.metadata.src_node_id] = (rows, rate)

    def _fix_parameters(self) -> None:
        cfg = self.host.cfg
        # One Poisson rate for every partner: batch-size is the expected batch of the whole
        # federation per round, so the sum is central DP-SGD's step on the union.
        total = sum(rows for rows, _ in self.partner_info.values())
        self.rate = poisson_rate(cfg.batch_size, total)
        self.sigma = rules_of(cfg.privacy_mode).example.noise_multiplier(
            cfg, self.rate, steps_per_round=1)
        log(INFO, "shared noise: sigma %.4f, sampling rate %.4g for every partner "
            "(expected batch %d of %d records), %d rounds, target epsilon %g",
            self.sigma, self.rate, cfg.batch_size, total, cfg.rounds, cfg.target_epsilon)
        # deployed, the first moment the server knows N (nothing is trained yet)
        self.host.partner_rows_known([rows for rows, _ in self.partner_info.values()])

    def round_config(self, server_round: int, session: SecAggConfig, config: ConfigRecord,
                     train: set[int]) -> tuple[SharedNoiseConfig, set[int]]:
        """The round's shared-noise parameters for the nodes asked to train, and those of
        them that never reported their record count (they are left out of the round like a
        dropout: the ring is sized from the reported counts only)."""
        if self.sigma is None or any(n not in self.partner_info for n in train):
            self.ask_sizes(config, server_round)
        if self.sigma is None:
            raise EveryPartnerFailed(
                f"round {server_round}: shared noise: no sampled partner reported its number "
                "of records (every one failed or refused the app), so the run's noise cannot "
                "be set; nothing was trained")
        silent = {n for n in train if n not in self.partner_info}
        if silent:
            log(WARNING, "round %d: shared noise: %s did not report their records; left out "
                "of this round", server_round,
                ", ".join(self.name(n) for n in sorted(silent)))
        cfg = self.host.cfg
        min_survivors = session.min_survivors
        assert min_survivors is not None  # SecAggConfig resolves it when built
        try:
            return SharedNoiseConfig(
                clip=cfg.max_grad_norm, noise_multiplier=self.sigma,
                num_clients=session.num_clients, min_survivors=int(min_survivors),
                colluders=cfg.dp_colluders,
                max_examples=max(1, sum(self.partner_info[n][0] for n in train - silent)),
                vector_length=self.vector_length, bits=session.bits,
                sample_rate=self.rate), silent
        except SecAggError as exc:
            raise ConfigError(f"example-dp-noise = 'shared': {exc}") from None

    def expected_batch(self, survivors: list[int]) -> float:
        """sum_i q_i n_i over the survivors (public: their reported rows and the rate)."""
        return sum(self.partner_info[n][0] * self.partner_info[n][1] for n in survivors)
