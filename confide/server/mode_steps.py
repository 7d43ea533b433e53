"""What the server does with a released secure sum: each privacy mode decodes it its own way
and moves the global weights by one step of the federation's server optimizer
(`RoundHost.server_step`). The secure round (secure_round.py) only schedules the protocol
that releases the sum; `mode_step` picks the decoding once, from the run's privacy mode:

  weighted mean   (example noise local or off) sum_i w_i x_i / sum_i w_i, each update
                  weighted by its rows (capped at secagg-max-weight), as the plaintext
                  mean; the total weight is decoded from the sum's weight coordinate
  count mean      (distributed DP) each survivor counts once; their number is public
  shared gradient (shared example noise) the noisy clipped-gradient sum over the expected
                  total batch sum_i q_i n_i, and one step along minus that gradient
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from confide import wire as W
from confide.config import RunConfig
from confide.privacy.secagg import SecAggConfig, SecAggResult, UpdateEncoder
from confide.privacy.secagg.masking import reduce_mod
from confide.privacy.secagg.shared_noise import SharedNoiseConfig, decode_sum

if TYPE_CHECKING:
    from confide.server.aggregation import RoundHost


@dataclass
class Released:
    """A round's released secure sum and what decoding it needs."""

    config: SecAggConfig  # the round's session
    result: SecAggResult
    survivors: list[int]  # Flower node ids of the clients in the sum
    shared: SharedNoiseConfig | None = None  # shared noise: the round's parameters
    # simulation only (verify-secagg): each survivor's plaintext encoded input, by client id
    verify: dict[int, np.ndarray] = field(default_factory=dict)


class ModeStep(Protocol):
    def step(self, host: RoundHost, released: Released
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The new global weights, and the round's metrics of the decoding."""
        ...


@dataclass
class MeanStep:
    """The survivors' mean update (weighted by rows, or each counting once), then one
    server-optimizer step along it."""

    reference: Mapping[str, np.ndarray]  # names and shapes of the flattened vector
    weighted: bool

    def step(self, host: RoundHost, released: Released
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        result, cfg = released.result, released.config
        mean = result.weighted_sum / (result.total_weight if self.weighted
                                      else len(released.survivors))
        aggregate = host.server_step(W.unflatten(mean, self.reference))
        metrics: dict[str, Any] = {
            "secagg_quantization_step": UpdateEncoder(cfg).step * cfg.max_weight}
        if released.verify:
            metrics.update(verify_sum(cfg, result, released.verify))
        return aggregate, metrics


@dataclass
class SharedGradientStep:
    """Shared noise: the noisy clipped-gradient sum over the expected total batch (public:
    the partners' rows and rates), then one server-optimizer step along minus that
    gradient (post-processing)."""

    reference: Mapping[str, np.ndarray]
    expected_batch: Callable[[list[int]], float]  # survivors -> sum of q_i n_i

    def step(self, host: RoundHost, released: Released
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        shared = released.shared
        if shared is None:
            raise ValueError("a shared-noise round released a sum without its shared-noise "
                             "parameters")
        expected = self.expected_batch(released.survivors)
        gradient = decode_sum(released.result.ring_sum, shared) / expected
        aggregate = host.server_step(W.unflatten(-gradient, self.reference))
        mechanism = shared.mechanism(shared.sample_rate)  # the partners' receipts
        return aggregate, {"shared_noise_multiplier": mechanism.noise_multiplier,
                           "shared_noise_shares": mechanism.noise_shares,
                           "shared_expected_batch": expected,
                           "secagg_quantization_step": 1.0 / shared.scale}


def mode_step(cfg: RunConfig, reference: Mapping[str, np.ndarray],
              expected_batch: Callable[[list[int]], float]) -> ModeStep:
    """The decoding and server step of the run's privacy mode (secure aggregation)."""
    mode = cfg.privacy_mode
    if mode.shared_noise:
        return SharedGradientStep(reference, expected_batch)
    return MeanStep(reference, weighted=mode.weighted_sum)


def verify_sum(cfg: SecAggConfig, result: SecAggResult, encoded: dict[int, np.ndarray]
               ) -> dict[str, Any]:
    """Simulation only: the plaintext ring sum of the survivors' (noised, quantized)
    inputs, decoded, against the secure result."""
    missing = [c for c in result.survivors if c not in encoded]
    if missing:
        return {"secagg_max_abs_error": None, "secagg_verify_missing": missing}
    total = np.zeros(cfg.encoded_length, dtype=cfg.dtype)
    for c in result.survivors:
        np.add(total, encoded[c].astype(cfg.dtype), out=total)
    reduce_mod(total, cfg)
    plain, _ = UpdateEncoder(cfg).decode(total)
    error = float(np.max(np.abs(plain - result.weighted_sum), initial=0.0))
    return {"secagg_max_abs_error": error,
            "secagg_ring_sum_equal": bool(np.array_equal(total, result.ring_sum))}
