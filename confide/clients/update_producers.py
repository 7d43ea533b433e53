"""What a partner's training round sends, one producer per example-level mode.

The round itself (budget, model, receipt, reply) is the same for every mode
(`confide.clients.local_round.node_round`); what differs is how the update is made:

* no example-level DP: a DP-SGD delta without clipping or noise (`PlainDelta`);
* local noise: a DP-SGD delta, each step clipped and noised by the node (`LocalNoiseDelta`);
* shared noise: one clipped per-example gradient sum plus this node's share of the noise,
  encoded for the secure sum (`SharedNoiseSum`, `confide.privacy.secagg.shared_noise`).

A producer first plans (`plan`: the mechanism the round will run, fixed from public values
before anything is loaded; its own checks of the server's parameters), then, if the node's
budget affords that mechanism, produces (`produce`: trains, returns the update and the
mechanism it ran, which the receipt states and the accountant records).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import WARNING
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.common.logger import log
from torch import nn

from confide import wire as W
from confide.clients import secure_client
from confide.clients.disclosure import reported_rows
from confide.clients.dp_training import clipped_example_gradients, padded_batches, train_dp
from confide.clients.node_state import NodeState
from confide.clients.opacus_compat import resolve_grad_sample_mode
from confide.clients.partner_data import partition_id
from confide.clients.policy import NodeConfigError, PartnerPolicy
from confide.clients.progress import counting_calls, progress_writer
from confide.clients.state_location import node_state_dir
from confide.config import RunConfig
from confide.data import TextDataset
from confide.model import compute_delta, trainable_state
from confide.modes import ExampleNoise
from confide.privacy.mechanisms import ExampleLevelMechanism, SampledGaussian
from confide.privacy.mode_rules import rules_of
from confide.privacy.sampling import plan_round, poisson_rate
from confide.privacy.secagg import SecAggRefusal
from confide.privacy.secagg.shared_noise import (
    ExampleSumEncoder,
    SharedNoiseConfig,
    padded_slots,
)
from confide.tasks import get_task


@dataclass(frozen=True)
class NodeRound:
    """One `train` message as every producer sees it: the run, the round, the node."""

    msg: Message
    cfg: RunConfig
    server_round: int
    run_key: str
    data: TextDataset
    state: NodeState
    context: Context
    policy: PartnerPolicy

    @property
    def rows(self) -> int:
        """Under DP the public (rounded) row count: the rate and divisor it computes with."""
        return reported_rows(self.cfg, len(self.data))

    def tensors(self) -> dict[str, Any]:
        """The partner's data, tokenized by the run's task (kept for the process's next
        round: the data and the run's task rarely change between rounds)."""
        key = (self.cfg.task, self.cfg.model, self.cfg.max_length, self.data.source,
               len(self.data))
        if key not in _ENCODED:
            _ENCODED.clear()
            _ENCODED[key] = dict(get_task(self.cfg).encode(self.data))
        return _ENCODED[key]


_ENCODED: dict[tuple, dict[str, Any]] = {}


@dataclass(frozen=True)
class Update:
    """What a producer made: the mechanism it ran (its receipt's and metrics' numbers) and
    the update, a plaintext delta or the encoded ring vector for the secure sum."""

    mechanism: ExampleLevelMechanism
    summary: str  # the log line's account of the round (mechanism, steps)
    delta: dict[str, np.ndarray] | None = None
    encoded: np.ndarray | None = None
    train_loss: float | None = None  # only where no DP is promised (disclosure drops them)
    train_seconds: float | None = None


class UpdateProducer(Protocol):
    def plan(self) -> ExampleLevelMechanism:
        """The mechanism this round will run (what the budget must afford)."""
        ...

    def produce(self, model: nn.Module, global_state: dict[str, np.ndarray],
                device: torch.device) -> Update:
        """Train from `global_state` (already loaded into `model`) on `device`."""
        ...


class _DeltaProducer:
    """DP-SGD (`confide.clients.dp_training.train_dp`) from the global weights: the delta
    of the trainable weights is the update."""

    dp = False

    def __init__(self, round_: NodeRound) -> None:
        self.r = round_
        self.planned = plan_round(round_.cfg.batch_size, round_.rows, round_.cfg.local_epochs)
        self.noise = 0.0

    def noise_multiplier(self) -> float:
        return 0.0

    def planned_mechanism(self) -> SampledGaussian:
        """The mechanism the round will run (the producer's own checks aside)."""
        self.noise = self.noise_multiplier()
        return SampledGaussian(self.noise, self.planned.sample_rate, self.planned.steps)

    def plan(self) -> ExampleLevelMechanism:
        return self.planned_mechanism()

    def produce(self, model: nn.Module, global_state: dict[str, np.ndarray],
                device: torch.device) -> Update:
        r, cfg = self.r, self.r.cfg
        tensors = r.tensors()
        start = time.perf_counter()
        result = train_dp(
            model, tensors, noise_multiplier=self.noise,
            max_grad_norm=cfg.max_grad_norm, batch_size=cfg.batch_size,
            physical_batch_size=cfg.physical_batch_size, epochs=cfg.local_epochs,
            optimizer=cfg.optimizer, learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay, device=device,
            head_learning_rate=cfg.head_learning_rate or None,
            seed=cfg.seed * 100_003 + r.server_round * 1009 + partition_id(r.context),
            dp=self.dp, round_id=r.server_round,
            grad_sample_mode=resolve_grad_sample_mode(cfg.grad_sample_mode, cfg.fine_tune,
                                                      model),
            objective=get_task(cfg).objective, public_rows=r.rows,
            # steps done / planned into the partner's own folder (never sent: see the module)
            on_step=progress_writer(node_state_dir(r.context, cfg.out), r.server_round,
                                    self.planned.steps))
        delta = compute_delta(trainable_state(model), global_state)
        for name, value in delta.items():
            if not np.all(np.isfinite(value)):
                raise FloatingPointError(f"local update of {name} is not finite; not sent")
        spent = SampledGaussian(result.noise_multiplier, result.sample_rate, result.steps)
        return Update(spent, f"{result.steps} steps, sigma {result.noise_multiplier:.3f}",
                      delta=delta, train_loss=result.mean_loss,
                      train_seconds=time.perf_counter() - start)


class PlainDelta(_DeltaProducer):
    """No example-level DP: the same Poisson batches, no clipping, no noise."""


class LocalNoiseDelta(_DeltaProducer):
    """Local noise: the node clips and noises every step itself."""

    dp = True

    def noise_multiplier(self) -> float:
        return local_noise_multiplier(self.r.cfg, self.r.state, self.planned.sample_rate,
                                      self.planned.steps, self.r.run_key)

    def plan(self) -> ExampleLevelMechanism:
        mechanism = self.planned_mechanism()
        self.r.policy.check_noise(mechanism.noise_multiplier)
        return mechanism


def local_noise_multiplier(cfg: RunConfig, state: NodeState, sample_rate: float, steps: int,
                           run_key: str) -> float:
    """The run's local-noise multiplier (`confide.privacy.calibration`): calibrated once
    per run with the node's own (tight, PLD) accountant, the one its claims and guard use,
    and kept in its state for the run's later rounds."""
    rule = rules_of(cfg.privacy_mode).example
    if cfg.noise_multiplier > 0:
        return rule.noise_multiplier(cfg, sample_rate, steps)
    if state.noise_multiplier is None or state.noise_run != run_key:
        state.noise_multiplier = rule.noise_multiplier(cfg, sample_rate, steps,
                                                       accountant=state.accountant.accountant)
        state.noise_run = run_key
    return state.noise_multiplier


class SharedNoiseSum:
    """Shared-noise example-level DP (confide.privacy.secagg.shared_noise): one Poisson
    sample at the run's common rate, per-example gradients clipped to max-grad-norm, each
    rounded, summed, plus this node's share of the noise. The node recomputes every
    derived parameter itself and checks the server's against its own session and run
    configuration; its budget guard uses the effective multiplier."""

    def __init__(self, round_: NodeRound) -> None:
        self.r = round_
        self.sample_rate, self.slots, self.truncation_tail = 0.0, 0, 0.0

    def plan(self) -> ExampleLevelMechanism:
        r = self.r
        down = r.msg.content.config_records.get(W.SECAGG)
        key = f"{W.SHARED}/{r.server_round}"
        if down is None or key not in down:
            raise NodeConfigError(f"round {r.server_round}: no shared-noise parameters in "
                                  "the message (server and node disagree on "
                                  "example-dp-noise)")
        shared = self.shared = SharedNoiseConfig.from_json(str(down[key]))
        session = secure_client.ClientStore(r.context).config(r.server_round)
        # colluders: at least the run's and the partner's own assumption (more is safer)
        r.policy.check_colluders(shared.colluders)
        r.policy.check_noise(shared.noise_multiplier)
        problems = [f"{name} {got} != {want}" for name, got, want in (
            ("colluders", shared.colluders, max(r.cfg.dp_colluders, shared.colluders)),
            ("clip", shared.clip, r.cfg.max_grad_norm),
            ("min_survivors", shared.min_survivors, session.min_survivors),
            ("num_clients", shared.num_clients, session.num_clients),
            ("bits", shared.bits, session.bits),
            ("vector_length", shared.vector_length, session.vector_length)) if got != want]
        if problems:
            raise SecAggRefusal(f"round {r.server_round}: shared-noise parameters differ from "
                                "this node's session and run configuration: "
                                f"{'; '.join(problems)}")
        # The run's common rate, set by the server: the node's own budget guard decides
        # whether it can afford it, whatever the server chose.
        self.sample_rate = shared.sample_rate or poisson_rate(r.cfg.batch_size, r.rows)
        # a fixed physical budget from public values, so the round's work does not depend
        # on its sample; the chance a sample exceeds it is added to the round's TV slack
        self.slots, self.truncation_tail = padded_slots(r.rows, self.sample_rate)
        self.mechanism = shared.mechanism(self.sample_rate, self.truncation_tail)
        return self.mechanism

    def produce(self, model: nn.Module, global_state: dict[str, np.ndarray],
                device: torch.device) -> Update:
        r, cfg = self.r, self.r.cfg
        encoder = ExampleSumEncoder(self.shared)
        progress = progress_writer(node_state_dir(r.context, cfg.out),  # never sent
                                   r.server_round,
                                   padded_batches(self.slots, cfg.physical_batch_size))
        result = clipped_example_gradients(
            model, r.tensors(), sample_rate=self.sample_rate, max_grad_norm=cfg.max_grad_norm,
            physical_batch_size=cfg.physical_batch_size,
            on_rows=counting_calls(encoder.add_examples, progress), device=device,
            round_id=r.server_round, objective=get_task(cfg).objective, slots=self.slots)
        if result.truncated:
            log(WARNING, "round %d: the Poisson sample exceeded the round's %d slots and was "
                "truncated (accounted: probability %.2g, in the round's TV slack)",
                r.server_round, self.slots, self.truncation_tail)
        # no loss, no time: statistics of this round's sample are not private
        return Update(self.mechanism,
                      f"shared noise sigma {self.mechanism.noise_multiplier:.3f} over "
                      f"m={self.mechanism.noise_shares} shares",
                      encoded=encoder.encode())


# the one producer of each example-level mode
PRODUCERS: dict[ExampleNoise, Callable[[NodeRound], UpdateProducer]] = {
    ExampleNoise.OFF: PlainDelta,
    ExampleNoise.LOCAL: LocalNoiseDelta,
    ExampleNoise.SHARED: SharedNoiseSum,
}
