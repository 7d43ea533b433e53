"""Per-example clipping, one implementation per gradient mode, behind one interface.

A `Clipper` turns one physical batch into its clipped per-example gradients, left where
the step that follows reads them:

* `HooksClipper` (modes "hooks", "functorch"): Opacus' `GradSampleModule` puts each
  example's gradient in `p.grad_sample`; Opacus' `DPOptimizer` clips them with
  min(1, C / (norm + 1e-6)), sums, noises and steps.
* `GhostClipper` ("ghost", Li et al. 2022; Opacus' fast gradient clipping): per-example
  norms without per-example gradients, then a second backward of the loss reweighted by
  the clip factors leaves the clipped sum in `p.grad`.
* `BookKeepingSumClipper` ("bookkeeping", `confide.clients.book_keeping`): the same clipped
  sum in `p.grad` from one backward pass without weight gradients.
* `SharedRowsClipper` (shared-noise rounds): every example's gradient clipped and handed
  over as a row (float64, the trainable parameters flattened in sorted-name order), padding
  rows multiplied by zero; no optimizer (the secure sum adds the noise, the server steps).

The first three come with the optimizer that adds the noise to their clipped sum and
steps (`optimizer`): Opacus' `DPOptimizer` for per-example rows, its
`DPOptimizerFastGradientClipping` for sums already clipped. The clip formula, the noise and
the divisor are the same in every mode; only the way the clipped sum is computed differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from confide.clients import book_keeping
from confide.clients.opacus_compat import (
    ExplicitInputsClassifier,
    OpacusCompatError,
    check_grad_samples,
)
from confide.tasks.base import Objective, PerExampleCriterion

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

# called with the batch's loss (a mean or a sum, as the mode computes it): raises when it
# is not finite, naming the step and physical batch
LossCheck = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class PhysicalBatch:
    """Tensors of one physical batch on the device (`input_ids`, `attention_mask`,
    `labels`); `live`: which rows are sampled examples (None: all; the rest is padding)."""

    tensors: dict[str, torch.Tensor]
    live: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return len(self.tensors["labels"])


class Clipper(Protocol):
    where: str  # "round r" in error messages

    def clip(self, batch: PhysicalBatch, check: LossCheck) -> float:
        """Forward and backward of `batch` (at least one row); its clipped per-example
        gradients where the step reads them. Returns the summed loss of its live rows."""
        ...

    def clip_empty(self) -> None:
        """An empty Poisson batch: zero clipped gradients, so the step still adds its noise
        (an empty batch must still make a noisy step)."""
        ...

    def close(self) -> None:
        """Unwrap the model (Opacus' hooks off)."""
        ...


class _OptimizerClipper:
    """A clipper whose clipped sum a DP optimizer noises and steps (`optimizer`)."""

    optimizer: DPOptimizer

    def __init__(self, params: list[nn.Parameter], where: str) -> None:
        self.params = params
        self.where = where

    def clip_empty(self) -> None:
        # p.grad accumulates the clipped sum: here 0
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def close(self) -> None:
        """Nothing wraps the model."""


class HooksClipper(_OptimizerClipper):
    """Opacus' per-example gradients (module hooks, or functorch), clipped by its
    `DPOptimizer`."""

    def __init__(self, wrapper: ExplicitInputsClassifier, base: torch.optim.Optimizer,
                 params: list[nn.Parameter], *, objective: Objective, functorch: bool,
                 noise_multiplier: float, max_grad_norm: float, expected_batch: float,
                 generator: torch.Generator, where: str) -> None:
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer

        super().__init__(params, where)
        self.objective = objective
        self.gsm = GradSampleModule(wrapper, batch_first=True, loss_reduction="mean",
                                    strict=True, force_functorch=functorch)
        self.optimizer = DPOptimizer(
            base, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch, loss_reduction="mean", generator=generator)

    def clip(self, batch: PhysicalBatch, check: LossCheck) -> float:
        t = batch.tensors
        logits = self.gsm(t["input_ids"], t["attention_mask"])
        # mean of per-example losses: Opacus (loss_reduction="mean") rescales by the batch
        # size, so each grad_sample is one example's gradient
        loss = self.objective.per_example_loss(logits, t["labels"]).mean()
        check(loss)
        loss.backward()
        check_grad_samples(self.params, batch.rows)
        return loss.item() * batch.rows

    def clip_empty(self) -> None:
        # zero per-example rows: the optimizer clips nothing, adds noise and steps (Opacus
        # would raise without them)
        for p in self.params:
            p.grad_sample = torch.zeros(  # type: ignore[attr-defined]  # Opacus' attribute
                (0, *p.shape), dtype=p.dtype, device=p.device)

    def close(self) -> None:
        self.gsm.to_standard_module()


def _sum_optimizer(base: torch.optim.Optimizer, *, noise_multiplier: float,
                   max_grad_norm: float, expected_batch: float, generator: torch.Generator
                   ) -> DPOptimizer:
    """The optimizer of clipped sums left in p.grad: it adds the noise and divides by the
    expected batch."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    return DPOptimizerFastGradientClipping(
        base, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch, loss_reduction="mean", generator=generator)


class GhostClipper(_OptimizerClipper):
    """Opacus' ghost clipping: norms in a first backward, the clipped sum in a second."""

    def __init__(self, wrapper: ExplicitInputsClassifier, base: torch.optim.Optimizer,
                 params: list[nn.Parameter], *, objective: Objective,
                 noise_multiplier: float, max_grad_norm: float, expected_batch: float,
                 generator: torch.Generator, where: str) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        super().__init__(params, where)
        self.optimizer = _sum_optimizer(base, noise_multiplier=noise_multiplier,
                                        max_grad_norm=max_grad_norm,
                                        expected_batch=expected_batch, generator=generator)
        self.gsm = GradSampleModuleFastGradientClipping(
            wrapper, batch_first=True, max_grad_norm=max_grad_norm, use_ghost_clipping=True,
            loss_reduction="mean", strict=True)
        self.criterion = DPLossFastGradientClipping(self.gsm, self.optimizer,
                                                    PerExampleCriterion(objective), "mean")

    def clip(self, batch: PhysicalBatch, check: LossCheck) -> float:
        t = batch.tensors
        logits = self.gsm(t["input_ids"], t["attention_mask"])
        dp_loss = self.criterion(logits.float(), t["labels"])
        mean_loss = dp_loss.detach()
        check(mean_loss)
        self.gsm.per_sample_gradient_norms = None  # never check a stale batch's
        dp_loss.backward()  # norms, clip factors, reweighted second backward
        norms = getattr(self.gsm, "_per_sample_gradient_norms", None)
        if norms is None or tuple(norms.shape) != (batch.rows,):
            raise OpacusCompatError(
                f"{self.where}: ghost clipping gave per-example norms of shape "
                f"{None if norms is None else tuple(norms.shape)} for {batch.rows} rows: it "
                "would clip a sum over examples, not one example")
        return mean_loss.item() * batch.rows

    def close(self) -> None:
        self.gsm.to_standard_module()


class BookKeepingSumClipper(_OptimizerClipper):
    """Book-keeping: the clipped sum from one backward pass without weight gradients."""

    def __init__(self, wrapper: ExplicitInputsClassifier, base: torch.optim.Optimizer,
                 params: list[nn.Parameter], *, objective: Objective,
                 noise_multiplier: float, max_grad_norm: float, expected_batch: float,
                 generator: torch.Generator, where: str) -> None:
        super().__init__(params, where)
        self.wrapper = wrapper
        self.objective = objective
        self.optimizer = _sum_optimizer(base, noise_multiplier=noise_multiplier,
                                        max_grad_norm=max_grad_norm,
                                        expected_batch=expected_batch, generator=generator)
        self.book = book_keeping.BookKeepingClipper(wrapper, max_grad_norm)

    def clip(self, batch: PhysicalBatch, check: LossCheck) -> float:
        t = batch.tensors
        with self.book.recording():
            losses = self.objective.per_example_loss(
                self.wrapper(t["input_ids"], t["attention_mask"]), t["labels"])
            check(losses.detach().mean())
            losses.sum().backward()  # each example's own gradient, unscaled
        example_norms = self.book.clip_into_grads()
        if tuple(example_norms.shape) != (batch.rows,):
            raise OpacusCompatError(
                f"{self.where}: book-keeping gave per-example norms of shape "
                f"{tuple(example_norms.shape)} for {batch.rows} rows")
        return losses.detach().sum().item()


def dp_sgd_clipper(mode: str, wrapper: ExplicitInputsClassifier,
                   base: torch.optim.Optimizer, params: list[nn.Parameter], *,
                   objective: Objective, noise_multiplier: float, max_grad_norm: float,
                   expected_batch: float, generator: torch.Generator, where: str
                   ) -> HooksClipper | GhostClipper | BookKeepingSumClipper:
    """The clipper (and its DP optimizer over `base`) of a DP-SGD `grad_sample_mode`."""
    settings: dict[str, Any] = dict(
        objective=objective, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch=expected_batch, generator=generator, where=where)
    if mode == "ghost":
        return GhostClipper(wrapper, base, params, **settings)
    if mode == "bookkeeping":
        return BookKeepingSumClipper(wrapper, base, params, **settings)
    return HooksClipper(wrapper, base, params, functorch=mode == "functorch", **settings)


class SharedRowsClipper:
    """Shared-noise rounds: each example's gradient (Opacus' `GradSampleModule`, hooks),
    clipped with Opacus' formula min(1, C / (norm + 1e-6)), padding rows multiplied by
    zero, handed to `on_rows` as a float64 numpy array [rows, d] per physical batch, the
    trainable parameters flattened in sorted-name order (the order of
    `confide.wire.flatten`, so the server can unflatten the sum)."""

    def __init__(self, wrapper: ExplicitInputsClassifier, model: nn.Module,
                 params: list[nn.Parameter], *, objective: Objective, max_grad_norm: float,
                 on_rows: Callable[[Any], None], where: str) -> None:
        from opacus.grad_sample import GradSampleModule

        self.params = params
        self.ordered = [p for _, p in sorted(
            ((name, p) for name, p in model.named_parameters() if p.requires_grad),
            key=lambda item: item[0])]
        self.objective = objective
        self.max_grad_norm = max_grad_norm
        self.on_rows = on_rows
        self.where = where
        self.gsm = GradSampleModule(wrapper, batch_first=True, loss_reduction="sum",
                                    strict=True)

    def clip(self, batch: PhysicalBatch, check: LossCheck) -> float:
        t = batch.tensors
        live = batch.live if batch.live is not None else \
            torch.ones(batch.rows, dtype=torch.bool)
        logits = self.gsm(t["input_ids"], t["attention_mask"])
        losses = self.objective.per_example_loss(logits, t["labels"])
        loss = losses.sum()
        check(loss)
        loss.backward()
        self.on_rows(self._clipped_rows(live))
        return losses.detach()[live.to(losses.device)].sum().item()

    def clip_empty(self) -> None:
        """Nothing to hand over: an empty sample adds no row (the noise share is the
        encoder's)."""

    def _clipped_rows(self, live: torch.Tensor) -> Any:
        """The physical batch's per-example gradients (Opacus' grad_sample, flattened in
        sorted-name order, float64 numpy [rows, d]), clipped; rows not `live` (padding)
        multiplied by zero. Clears them."""
        rows = len(live)
        check_grad_samples(self.params, rows)
        # grad_sample: Opacus' attribute on parameters, which torch's stubs lack
        samples = [p.grad_sample for p in self.ordered]  # type: ignore[attr-defined]  # Opacus'
        flat = torch.cat([g.reshape(rows, -1).double() for g in samples], dim=1)
        factor = (self.max_grad_norm / (flat.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
        factor = factor * live.to(factor.device, factor.dtype)
        for p in self.params:
            p.grad_sample = None  # type: ignore[attr-defined]  # Opacus' attribute
            p.grad = None
        return (flat * factor[:, None]).cpu().numpy()

    def close(self) -> None:
        self.gsm.to_standard_module()
