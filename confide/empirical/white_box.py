"""White-box one-run audit with gradient canaries (Steinke, Nasr and Jagielski 2023, "Privacy
Auditing with One (1) Training Run", the white-box setting: Dirac canary gradients).

Input-space canaries must be memorised by the model before a guess can be right, so a
black-box audit of a leaky run still makes wrong guesses, and its bound stays far below
what its canary count could certify. A white-box auditor instead inserts canary
*gradients* and reads the model delta: canary j is a record whose gradient is C * e_j (a
Dirac vector on its own coordinate, exactly the clip norm after clipping), and its score is
the inner product of the delta with e_j. Without noise an included canary moves its
coordinate and an excluded one leaves it at exactly 0, so every guess is right and the
bound reaches the most the canary count can certify; with the claimed noise it cannot pass
the claim.

The training is the partners' own DP-SGD: `confide.clients.dp_training.train_dp` (Opacus:
Poisson sampling, per-example clipping of the whole trainable gradient, Gaussian noise,
optimizer step) on one partner's data with the run's model, optimizer, clip norm, batch
size, epochs and rounds, the noise multiplier calibrated by the node's rule (over all
rounds, by the PLD accountant) and the claim computed from the mechanism that ran. The
canaries sit on a table of m extra coordinates (one `nn.Embedding(m, 1)` next to the model,
zero at the start); the natural rows never touch it.

Every one of the m canaries is a row of the partner's data, so the row count, the sampling
rate and the divisor never depend on which canaries are included: an excluded canary is a
row whose gradient is zero (it changes nothing, so it is as good as absent), an included one
has the Dirac gradient. Guesses are fixed before training from public mechanism facts:
- sampling rate 1 (every row in every step): every canary is guessed, "in" when its score
  passes half of what an included canary adds over all steps (SGD; any increase for Adam),
  r = m guesses;
- sampling rate q < 1: an included canary that was never sampled cannot be told from an
  excluded one, so only "in" guesses are made, for the r highest scores, r four standard
  deviations below the expected number of included canaries sampled at least once
  (1 - (1 - q)^T of them).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from confide.config import ConfigError, RunConfig
from confide.privacy.sampling import plan_round
from confide.tasks.base import Objective

INCLUDED, EXCLUDED = -1, -2  # canary rows' labels: natural labels are >= 0
CANARY_GAIN = 1e6  # raw canary gradient norm in units of C: clipping leaves exactly C e_j


@dataclass(frozen=True)
class GuessPlan:
    """How guesses are made, fixed before training from the mechanism's public facts."""

    rule: str  # "threshold": every canary guessed; "top": the r highest scores guessed "in"
    guesses: int
    sampled_fraction: float  # P[an included canary is sampled at least once]


def guess_plan(canaries: int, sample_rate: float, total_steps: int) -> GuessPlan:
    if canaries < 2:
        raise ConfigError(f"canaries = {canaries}; allowed: >= 2")
    if sample_rate >= 1.0:
        return GuessPlan("threshold", canaries, 1.0)
    p = 1.0 - (1.0 - sample_rate) ** total_steps
    mean = canaries * p / 2
    sd = math.sqrt(canaries * (p / 2) * (1 - p / 2))
    return GuessPlan("top", max(1, math.floor(mean - 4 * sd)), p)


def guesses_for_plan(sample_rate: float, total_steps: int) -> Callable[[int], int]:
    """canaries -> guesses under `guess_plan`: what canaries_needed scans."""
    return lambda m: guess_plan(m, sample_rate, total_steps).guesses


class WithCanaries(nn.Module):
    """The run's model and the auditor's canary table (m coordinates, zero at the start)."""

    def __init__(self, base: nn.Module, canaries: int) -> None:
        super().__init__()
        self.base = base
        self.canaries = nn.Embedding(canaries, 1)
        nn.init.zeros_(self.canaries.weight)


class CanaryObjective(Objective):
    """The task's objective for natural rows; for canary rows (first input id -(j+1)) the
    loss CANARY_GAIN * C * table[j] (included) or 0 (excluded), so a canary's whole
    per-example gradient lies on its own coordinate and the natural rows' on the model."""

    def __init__(self, base: Objective, pad_id: int, max_grad_norm: float) -> None:
        self.base = base
        self.pad_id = pad_id
        self.gain = CANARY_GAIN * max_grad_norm

    def forward(self, model: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(model, WithCanaries):
            raise TypeError("the canary objective trains a WithCanaries model")
        is_canary = input_ids[:, 0] < 0
        index = (-input_ids[:, 0] - 1).clamp(min=0)
        ids = torch.where(is_canary[:, None], torch.full_like(input_ids, self.pad_id),
                          input_ids)
        logits = self.base.forward(model.base, ids, attention_mask).float()
        value = model.canaries(index[:, None])[:, 0, :].float()  # [B, 1]
        return torch.cat([logits, value * is_canary[:, None].float()], dim=1)

    def per_example_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        natural = self.base.per_example_loss(logits[:, :-1], labels.clamp(min=0))
        canary = logits[:, -1] * torch.where(labels == INCLUDED, self.gain, 0.0)
        return torch.where(labels < 0, canary, natural)


def canary_rows(included: np.ndarray, width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One row per canary: first id -(j+1), one attended position, label INCLUDED or
    EXCLUDED."""
    m = len(included)
    input_ids = torch.full((m, width), pad_id, dtype=torch.long)
    input_ids[:, 0] = -torch.arange(1, m + 1)
    attention_mask = torch.zeros((m, width), dtype=torch.long)
    attention_mask[:, 0] = 1
    labels = torch.where(torch.as_tensor(included), INCLUDED, EXCLUDED).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class WhiteBoxRun:
    """What the white-box training produced: the canaries' scores and the mechanism."""

    scores: np.ndarray  # per canary; larger = more likely included
    threshold: float  # the "threshold" rule's cut (scores above it are guessed "in")
    plan: GuessPlan
    noise_multiplier: float
    sample_rate: float
    steps: int  # per round
    rounds: int
    claimed_epsilon: float  # of the mechanism that ran, by the node's accountant
    rows: int  # natural rows + canary rows


def train_with_canaries(cfg: RunConfig, included: np.ndarray, *, partner: int = 0
                        ) -> WhiteBoxRun:
    """Train partner `partner`'s data plus one row per canary through train_dp for all of
    the run's rounds; score each canary by the delta of its coordinate."""
    from confide.clients.dp_training import train_dp
    from confide.clients.opacus_compat import resolve_grad_sample_mode
    from confide.privacy.accountant import PLD, epsilon_of
    from confide.privacy.calibration import run_noise_multiplier
    from confide.privacy.mechanisms import SampledGaussian
    from confide.tasks import CLASSIFICATION, build_model, get_task
    from confide.tasks.inputs import federated_data, model_spec

    if cfg.task != CLASSIFICATION:
        raise ConfigError(f"--white-box audits classification runs (task = {cfg.task!r}); "
                          "causal-lm runs get the canary exposure audit")
    if not cfg.privacy_mode.example_dp:
        raise ConfigError("--white-box audits example-level DP and the run has none "
                          "(example-dp = false): there is no claim to test")
    if cfg.privacy_mode.shared_noise:
        raise ConfigError("--white-box audits the partners' local DP-SGD; example-dp-noise "
                          "= 'shared' adds the noise inside the secure sum instead (set "
                          "example-dp-noise = 'local' to audit that mechanism)")
    fed = federated_data(cfg)
    if not 0 <= partner < len(fed.partitions):
        raise ConfigError(f"canary partner = {partner}; allowed: 0..{len(fed.partitions) - 1}")
    num_labels = cfg.num_labels or fed.num_labels
    cfg = cfg.replace(num_labels=num_labels)
    task = get_task(cfg)
    natural = task.encode(fed.partitions[partner])
    pad_id = int(task.tokenizer().pad_token_id or 0)
    canary = canary_rows(included, int(natural["input_ids"].shape[1]), pad_id)
    data = {k: torch.cat([torch.as_tensor(natural[k]).long(), canary[k]]) for k in canary}
    rows = len(data["labels"])

    # The node's mechanism (confide.clients.local_round): rate, steps, and one noise
    # multiplier calibrated over all planned rounds with the PLD accountant.
    sampling = plan_round(cfg.batch_size, rows, cfg.local_epochs)
    sample_rate, steps = sampling.sample_rate, sampling.steps
    sigma = run_noise_multiplier(cfg, sample_rate, steps, accountant=PLD)
    plan = guess_plan(len(included), sample_rate, steps * cfg.rounds)

    model = WithCanaries(build_model(model_spec(cfg, num_labels)), len(included))
    objective = CanaryObjective(task.objective, pad_id, cfg.max_grad_norm)
    mode = resolve_grad_sample_mode(cfg.grad_sample_mode, cfg.fine_tune, model)
    spent = []
    for r in range(1, cfg.rounds + 1):
        result = train_dp(
            model, data, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
            batch_size=cfg.batch_size, physical_batch_size=cfg.physical_batch_size,
            epochs=cfg.local_epochs, optimizer=cfg.optimizer,
            learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
            device=_device(cfg), head_learning_rate=cfg.head_learning_rate or None,
            dp=True, round_id=r, grad_sample_mode=mode, objective=objective)
        spent.append(SampledGaussian(result.noise_multiplier, result.sample_rate,
                                     result.steps))
    delta_table = -model.canaries.weight.detach().double().cpu().numpy()[:, 0]
    if cfg.optimizer == "sgd":  # in units of one clipped canary step: lr C / (q n)
        scores = delta_table * sample_rate * rows / (cfg.learning_rate * cfg.max_grad_norm)
        threshold = steps * cfg.rounds / 2  # rate 1: an included canary scores one a step
    else:  # Adam's step has no such unit; only its sign is comparable across canaries
        scores, threshold = delta_table / cfg.learning_rate, 0.0
    return WhiteBoxRun(scores=scores, threshold=threshold, plan=plan, noise_multiplier=sigma,
                       sample_rate=sample_rate, steps=steps, rounds=cfg.rounds,
                       claimed_epsilon=epsilon_of(spent, cfg.delta, PLD), rows=rows)


def count_correct(run: WhiteBoxRun, included: np.ndarray) -> tuple[int, int]:
    """(guesses, correct) under the run's plan."""
    if run.plan.rule == "threshold":
        return len(included), int(np.sum((run.scores > run.threshold) == included))
    top = np.argsort(run.scores, kind="stable")[len(run.scores) - run.plan.guesses:]
    return run.plan.guesses, int(included[top].sum())


def draw_inclusion(canaries: int, seed: int | None) -> np.ndarray:
    """Each canary included with probability 1/2: fresh entropy unless a test pins a seed
    (the bits are the audit's secret)."""
    rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
    return rng.random(canaries) < 0.5


def _device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)
