"""One round of local DP-SGD (Opacus) on tokenized tensors.

(Evaluation lives with the task, `confide.tasks.classification.evaluate`: the server runs it.)

`train_dp` is a pure function of (model, data, mechanism settings): it trains the model's
trainable parameters in place and returns the mechanism facts the caller needs for its own
privacy accountant (noise multiplier, the sampling probability actually used, the number of
noisy steps actually taken). Opacus' own accountant is not used: the node keeps one
cumulative accountant across rounds, and a per-call PrivacyEngine would forget history.

Mechanism per step: Poisson sampling with rate q = min(1, batch_size / n) (Opacus
`UniformWithReplacementSampler`), per-example clipping to `max_grad_norm`, Gaussian noise of
std `noise_multiplier * max_grad_norm` added to the sum, divided by the expected batch q*n
(Opacus `DPOptimizer`, loss_reduction="mean"). Logical batches are split into physical
batches of at most `physical_batch_size` by Opacus' `BatchMemoryManager`; the noise is
added once per logical batch, including empty ones (an empty Poisson batch must still
produce a noisy step, otherwise "no update" would reveal that it was empty).

`grad_sample_mode="ghost"` (ghost clipping, Li et al. 2022; Opacus' fast gradient clipping)
computes the per-example norms without materialising per-example gradients, then a second
backward of the loss reweighted by the clip factors gives the sum of clipped gradients. The
mechanism is the same: same clip factor min(1, C / (norm + 1e-6)), same noise on the sum,
same divisor, same sampler and steps; only the way the clipped sum is computed differs.
`grad_sample_mode="bookkeeping"` (`confide.clients.book_keeping`) computes the same clipped
sum in one backward pass without weight gradients; the noise is added by the same optimizer.
Each gradient mode is one `Clipper` (`confide.clients.clippers`); the training loop is the
same for all of them.

`public_rows`: the data set size the rate q and the divisor q * n are computed from. Under
DP the node passes its public row count (`confide.clients.disclosure`: n rounded up), so
neither the rate in its receipts nor the scale of its update reveals its exact n; the
mechanism is the same (Poisson sampling at a public rate, a public divisor).

Shared-noise mode (`clipped_example_gradients`, one clipped per-example gradient sum per
round, no step) pads the round to a fixed physical budget: with `slots` it processes exactly
that many example slots, its Poisson sample first and then padding rows whose clipped
gradients are multiplied by zero, every physical batch at the data set's full token width
(no per-batch trimming: the longest sampled row would set it). A sample larger than `slots`
is truncated to a uniformly random subset. So the round's computation, hence its time,
depends on `slots` and the data set's shape, never on the sample; the truncation
probability is accounted by the caller (`confide.privacy.secagg.shared_noise.padded_slots`
picks `slots` and returns it; it is added to the round's TV slack, hence to delta).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from confide.clients.clippers import PhysicalBatch, SharedRowsClipper, dp_sgd_clipper
from confide.clients.opacus_compat import (
    DEFAULT_GRAD_SAMPLE_MODE,
    SUPPORTED_GRAD_SAMPLE_MODES,
    ExplicitInputsClassifier,
    OpacusCompatError,
    make_opacus_ready,
    strip_opacus_state,
    trainable_parameters,
)
from confide.logs import KNOWN_USER_WARNINGS
from confide.model import HEAD_MARKER
from confide.privacy.sampling import plan_round
from confide.tasks.base import Objective
from confide.tasks.batches import (
    DPTrainingError,
    check_dataset,
    to_batch,
)

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class TrainResult:
    steps: int  # noisy optimizer steps actually taken (logical batches)
    sample_rate: float  # Poisson sampling probability actually used
    noise_multiplier: float  # 0.0 when dp=False
    mean_loss: float  # mean per-example training loss over all examples processed
    num_examples: int  # size of the local dataset
    seconds: float


def train_dp(model: nn.Module, dataset: Mapping[str, torch.Tensor], *,
             noise_multiplier: float, max_grad_norm: float, batch_size: int,
             physical_batch_size: int, epochs: float, optimizer: str = "sgd",
             learning_rate: float, weight_decay: float = 0.0,
             device: str | torch.device = "cpu", seed: int = 0, dp: bool = True,
             private_randomness: bool | None = None,
             grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE,
             round_id: int | None = None,
             head_learning_rate: float | None = None,
             objective: Objective | None = None,
             public_rows: int | None = None,
             on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train `model`'s trainable parameters in place for `epochs` passes (in expectation).

    steps = max(1, round(epochs / q)) with q = min(1, batch_size / N), N = `public_rows`
    (default: the data set's n; it must not be smaller), the divisor q * N. With dp=False the
    same Poisson batches (same seed) train without clipping or noise, each logical batch
    averaged over its actual size: the non-DP baseline.

    `private_randomness` (default: True when dp) draws the Poisson sampling and the noise
    from OS entropy instead of `seed`. The seed comes from the run configuration, which the
    server knows; noise derived from it could be regenerated and subtracted, and a known
    batch selection voids the amplification by subsampling that the accountant assumes.
    Pass False only for tests and baselines that need bit-for-bit repeatable runs.

    `objective` (the task's forward pass and per-example loss; default: classification)
    is what is clipped: each example's gradient is that of its own loss alone. `on_step`:
    called with the count after each of the planned steps (`confide.clients.progress`).
    """
    start = time.perf_counter()
    obj = objective or _default_objective()
    where = f"round {round_id}" if round_id is not None else "this round"
    tensors = check_dataset(dataset, "train")
    n = len(tensors[2])
    _check_settings(noise_multiplier, max_grad_norm, batch_size, physical_batch_size, epochs,
                    optimizer, learning_rate, dp, grad_sample_mode)
    rows = n if public_rows is None else public_rows
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < n:
        raise DPTrainingError(f"public_rows = {public_rows!r} must be an integer >= the {n} "
                              "rows trained on")
    plan = plan_round(batch_size, rows, epochs)
    sample_rate, steps = plan.sample_rate, plan.steps
    private = dp if private_randomness is None else private_randomness
    sampling_seed = secrets.randbits(63) if private else seed
    noise_seed = secrets.randbits(63) if private else seed + 1

    dev = torch.device(device)
    # Move before any optimizer or hook exists: moving afterwards is the ordering hazard
    # behind upstream's silent LoRA corruption (opacus #820, peft #3409).
    model.to(dev)
    strip_opacus_state(model)  # a crashed earlier call may have left hooks behind
    was_training = model.training
    wrapper = make_opacus_ready(model, None if objective is None else objective.forward)
    params = trainable_parameters(model)
    base = _make_optimizer(optimizer, _param_groups(model, learning_rate, head_learning_rate),
                           learning_rate, weight_decay)
    loader = _poisson_loader(tensors, sample_rate, steps, sampling_seed)
    try:
        with _known_warnings_ignored():
            if dp:
                taken, loss_sum, seen = _train_private(
                    wrapper, base, loader, params, noise_multiplier=noise_multiplier,
                    max_grad_norm=max_grad_norm, expected_batch=sample_rate * rows,
                    physical=physical_batch_size, mode=grad_sample_mode,
                    noise_seed=noise_seed, device=dev, where=where, objective=obj,
                    on_step=on_step or _no_progress)
            else:
                taken, loss_sum, seen = _train_plain(wrapper, base, loader, params,
                                                     physical_batch_size, dev, where, obj,
                                                     on_step or _no_progress)
    finally:
        strip_opacus_state(model)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if taken != steps:
        raise DPTrainingError(f"{where}: took {taken} optimizer steps, planned {steps}")
    return TrainResult(steps=taken, sample_rate=sample_rate,
                       noise_multiplier=float(noise_multiplier) if dp else 0.0,
                       mean_loss=loss_sum / seen if seen else float("nan"), num_examples=n,
                       seconds=time.perf_counter() - start)


# -- the two training loops ---------------------------------------------------------------

def _train_private(wrapper: ExplicitInputsClassifier, base: torch.optim.Optimizer,
                   loader: DataLoader, params: list[nn.Parameter], *, noise_multiplier: float,
                   max_grad_norm: float, expected_batch: float, physical: int, mode: str,
                   noise_seed: int, device: torch.device, where: str,
                   objective: Objective, on_step: Callable[[int], None]
                   ) -> tuple[int, float, int]:
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    clipper = dp_sgd_clipper(
        mode, wrapper, base, params, objective=objective, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, expected_batch=expected_batch, where=where,
        generator=torch.Generator(device=device).manual_seed(noise_seed))
    dp_opt = clipper.optimizer
    _check_optimizer_params(dp_opt.params, params)
    taken, loss_sum, seen, phys = 0, 0.0, 0, 0
    try:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                                optimizer=dp_opt) as physical_loader:
            for input_ids, attention_mask, labels in physical_loader:
                phys += 1
                if len(labels) == 0:
                    clipper.clip_empty()  # no backward; the step still adds its noise
                else:
                    batch = PhysicalBatch(to_batch(input_ids, attention_mask, labels, device))
                    loss_sum += clipper.clip(batch, _finite_check(where, taken + 1, phys))
                    seen += batch.rows
                dp_opt.step()
                if not dp_opt._is_last_step_skipped:
                    taken += 1
                    on_step(taken)
                dp_opt.zero_grad(set_to_none=True)
    finally:
        clipper.close()
    return taken, loss_sum, seen


def _train_plain(wrapper: ExplicitInputsClassifier, opt: torch.optim.Optimizer,
                 loader: DataLoader, params: list[nn.Parameter], physical: int,
                 device: torch.device, where: str, objective: Objective,
                 on_step: Callable[[int], None]) -> tuple[int, float, int]:
    taken, loss_sum, seen = 0, 0.0, 0
    for input_ids, attention_mask, labels in loader:
        taken += 1
        rows = len(labels)
        if rows == 0:
            on_step(taken)
            continue  # nothing to learn from; no noise to add without DP
        opt.zero_grad(set_to_none=True)
        for s in range(0, rows, physical):
            batch = to_batch(input_ids[s:s + physical], attention_mask[s:s + physical],
                             labels[s:s + physical], device)
            logits = wrapper(batch["input_ids"], batch["attention_mask"])
            # Summed per chunk, divided by the logical size: the exact mean over the batch.
            loss = objective.per_example_loss(logits, batch["labels"]).sum()
            _check_finite(loss, where, taken, s // physical + 1)
            (loss / rows).backward()
            loss_sum += loss.item()
        seen += rows
        opt.step()
        on_step(taken)
    opt.zero_grad(set_to_none=True)
    return taken, loss_sum, seen


# -- helpers ------------------------------------------------------------------------------

class _Rows(Dataset):
    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> int:
        return i  # collate gathers whole rows at once: one index_select, not B small copies


def _poisson_loader(tensors: Sequence[torch.Tensor], sample_rate: float, steps: int,
                    seed: int) -> DataLoader:
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(
        num_samples=len(tensors[0]), sample_rate=sample_rate,
        generator=torch.Generator().manual_seed(seed), steps=steps)

    def collate(indices: list[int]) -> tuple[torch.Tensor, ...]:
        # Also right for an empty Poisson batch: zero rows, the same columns and dtypes.
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t.index_select(0, idx) for t in tensors)

    return DataLoader(_Rows(tensors), batch_sampler=sampler, collate_fn=collate)


def _check_settings(noise_multiplier: float, max_grad_norm: float, batch_size: int,
                    physical_batch_size: int, epochs: float, optimizer: str,
                    learning_rate: float, dp: bool, grad_sample_mode: str) -> None:
    problems = []
    if batch_size < 1 or physical_batch_size < 1:
        problems.append(f"batch sizes must be >= 1 (got {batch_size}, {physical_batch_size})")
    if not (epochs > 0 and math.isfinite(epochs)):
        problems.append(f"epochs must be > 0 (got {epochs})")
    if optimizer not in OPTIMIZERS:
        problems.append(f"optimizer {optimizer!r} not in {OPTIMIZERS}")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        problems.append(f"learning_rate must be > 0 (got {learning_rate})")
    if dp and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        problems.append(f"noise_multiplier must be >= 0 (got {noise_multiplier})")
    if dp and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        problems.append(f"max_grad_norm must be > 0 (got {max_grad_norm})")
    if dp and grad_sample_mode not in SUPPORTED_GRAD_SAMPLE_MODES:
        problems.append(f"grad_sample_mode {grad_sample_mode!r} not in "
                        f"{SUPPORTED_GRAD_SAMPLE_MODES}")
    if problems:
        raise DPTrainingError("; ".join(problems))


def _param_groups(model: nn.Module, lr: float, head_lr: float | None
                  ) -> list[dict[str, object]]:
    """The classifier head may take its own step size: under DP noise, adapters that reshape
    the encoder's features want small steps while a linear head on good features can take
    large ones (measured in benchmarks/utility_sst2.py)."""
    head: list[nn.Parameter] = []
    body: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if HEAD_MARKER in name else body).append(p)
    if head_lr is None or not head or not body:
        return [{"params": head + body, "lr": lr}]
    return [{"params": body, "lr": lr}, {"params": head, "lr": head_lr}]


def _make_optimizer(name: str, params: list[dict[str, object]], lr: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _check_optimizer_params(updated: Sequence[nn.Parameter], trainable: Sequence[nn.Parameter]
                            ) -> None:
    # The optimizer must update exactly the model's trainable tensors, by identity: a copy
    # (stale reference after a device move, a peft modules_to_save shadow) would train
    # weights nobody reads while the real ones stay put: upstream's silent LoRA failure.
    if {id(p) for p in updated} != {id(p) for p in trainable} or len(updated) != len(trainable):
        raise OpacusCompatError("the DP optimizer does not hold exactly the model's trainable "
                                "parameters")


@contextlib.contextmanager
def _known_warnings_ignored() -> Iterator[None]:
    # expected on every step, in every process that trains (a Ray worker, a node): torch's
    # note that Opacus' full backward hooks fire on modules whose inputs, token ids, need no
    # gradient; Opacus' secure-RNG notice (the noise seed comes from OS entropy)
    with warnings.catch_warnings():
        for notice in KNOWN_USER_WARNINGS:
            warnings.filterwarnings("ignore", message=notice, category=UserWarning)
        yield


def _no_progress(done: int) -> None:
    """No progress display (the default): nothing to report to."""


def _default_objective() -> Objective:
    from confide.tasks.classification import CLASSIFICATION_OBJECTIVE

    return CLASSIFICATION_OBJECTIVE


def _check_finite(loss: torch.Tensor, where: str, step: int, chunk: int) -> None:
    if not torch.isfinite(loss):
        raise DPTrainingError(f"{where}, step {step} (physical batch {chunk}): training loss "
                              f"is {loss.item()}; lower the learning rate or check the data")


def _finite_check(where: str, step: int, chunk: int) -> Callable[[torch.Tensor], None]:
    """`_check_finite` of one physical batch, for a clipper to call with its loss."""
    return lambda loss: _check_finite(loss, where, step, chunk)


# -- shared-noise mode: one clipped per-example gradient sum per round ----------------------

@dataclass(frozen=True)
class ExampleGradientsResult:
    sampled: int  # examples in this round's Poisson sample (stays on the node)
    sample_rate: float
    mean_loss: float  # over the examples summed (stays on the node)
    seconds: float
    slots: int = 0  # example rows processed: `slots` when padded, else `sampled`
    truncated: bool = False  # the sample exceeded `slots`: a random subset was summed


def clipped_example_gradients(model: nn.Module, dataset: Mapping[str, torch.Tensor], *,
                              sample_rate: float, max_grad_norm: float,
                              physical_batch_size: int, on_rows: Callable[[Any], None],
                              device: str | torch.device = "cpu", seed: int = 0,
                              private_randomness: bool = True,
                              round_id: int | None = None,
                              objective: Objective | None = None,
                              slots: int | None = None) -> ExampleGradientsResult:
    """One Poisson sample at rate `sample_rate` of `dataset`, and for every sampled example
    its gradient clipped to `max_grad_norm`, passed to `on_rows` as a float64 numpy array
    [rows, d] per physical batch (the trainable parameters flattened in sorted-name order,
    the order of `confide.wire.flatten`, so the server can unflatten the sum). The model is not
    updated: the caller (the secure sum) adds the noise, the server takes the step.

    `slots` (the product always passes it): the round's fixed physical budget (module
    docstring). Exactly `slots` rows go through the model and reach `on_rows`, the padding
    rows as zero vectors, and `physical_batch_size` splits them the same way every round.
    Without it the sample is processed as drawn (tests, benchmarks).

    Per-example gradients are Opacus' (`GradSampleModule`, hooks, through the same
    `make_opacus_ready` wrapper and `check_grad_samples` guard as `train_dp`), clipped with
    Opacus' formula min(1, C / (norm + 1e-6)). `private_randomness` draws the sample from OS
    entropy (the seed is known to the server; a known sample voids amplification).
    """
    start = time.perf_counter()
    where = f"round {round_id}" if round_id is not None else "this round"
    tensors = check_dataset(dataset, "train")
    if not 0 < sample_rate <= 1:
        raise DPTrainingError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise DPTrainingError(f"max_grad_norm must be > 0 (got {max_grad_norm})")
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int)
                              or slots < 1):
        raise DPTrainingError(f"slots must be an integer >= 1 (got {slots!r})")
    generator = torch.Generator().manual_seed(
        secrets.randbits(63) if private_randomness else seed)
    order, real, sampled = _slot_order(len(tensors[2]), sample_rate, slots, generator)
    dev = torch.device(device)
    model.to(dev)
    strip_opacus_state(model)
    was_training = model.training
    wrapper = make_opacus_ready(model, None if objective is None else objective.forward)
    clipper = SharedRowsClipper(wrapper, model, trainable_parameters(model),
                                objective=objective or _default_objective(),
                                max_grad_norm=max_grad_norm, on_rows=on_rows, where=where)
    physical = max(1, physical_batch_size)
    summed, loss_sum = 0, 0.0
    try:
        for s in range(0, len(order), physical):
            ids, mask, labels = (t.index_select(0, order[s:s + physical]) for t in tensors)
            if slots is None:
                batch = to_batch(ids, mask, labels, dev)
            else:  # full width: the longest sampled row must not set the work
                batch = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev),
                         "labels": labels.to(dev)}
            live = torch.arange(s, s + len(labels)) < real  # sampled rows; the rest: padding
            loss_sum += clipper.clip(PhysicalBatch(batch, live),
                                     _finite_check(where, 1, s // physical + 1))
            summed += int(live.sum())
    finally:
        clipper.close()
        strip_opacus_state(model)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return ExampleGradientsResult(sampled=sampled, sample_rate=sample_rate,
                                  mean_loss=loss_sum / summed if summed else float("nan"),
                                  seconds=time.perf_counter() - start, slots=len(order),
                                  truncated=sampled > real)


def padded_batches(slots: int, physical_batch_size: int) -> int:
    """The physical batches (`on_rows` calls) of a padded shared-noise round: a number of
    public values, its progress plan (`confide.clients.progress`)."""
    return -(-slots // max(1, physical_batch_size))


def _slot_order(n: int, sample_rate: float, slots: int | None, generator: torch.Generator
                ) -> tuple[torch.Tensor, int, int]:
    """(row indices to process, how many of them are sampled records, the sample's size):
    one Poisson sample of `n` rows (Opacus' sampler); with `slots`, truncated to a uniformly
    random subset when larger (a probability the caller accounts) and padded with rows of
    the data set up to exactly `slots` (their gradients are multiplied by zero)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate,
                                            generator=generator, steps=1)
    sample = torch.as_tensor(next(iter(sampler)), dtype=torch.long)
    sampled = len(sample)
    if slots is None:
        return sample, sampled, sampled
    if sampled > slots:
        sample = sample[torch.randperm(sampled, generator=generator)[:slots].sort().values]
    return torch.cat([sample, torch.arange(slots - len(sample)) % n]), len(sample), sampled
