"""The task interface: what differs between classification and causal-LM fine-tuning.

A task builds the model (and LoRA), or counts its trainable parameters from the model's
configuration alone (on the meta device, for the pre-flight check); it reads and encodes a
partner's data, gives the DP trainer its forward pass and per-example loss (the
`Objective`), evaluates centrally and exports. The DP trainer, federation, secure
aggregation and ledger only ever talk to these interfaces; none of them asks which task
runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from confide.config import RunConfig
from confide.data import TextDataset
from confide.model import ModelError, ModelSpec, count_trainable, disable_dropout


class Objective(ABC):
    """What the DP trainer needs: logits of a batch, and one loss per example.

    The per-example loss must depend on that example alone (its own tokens, its own
    normalisation), so that Opacus' per-sample gradients are the gradients of exactly the
    quantity that is clipped."""

    @abstractmethod
    def forward(self, model: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of `model` for a right-padded batch."""

    @abstractmethod
    def per_example_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of each example, shape [B]."""


class PerExampleCriterion(nn.Module):
    """An objective's per-example loss as a criterion with a `reduction` attribute, the
    form Opacus' ghost-clipping loss wrapper (DPLossFastGradientClipping) expects: it sets
    reduction = 'none' to get the [B] losses, and the same function gives the mean."""

    def __init__(self, objective: Objective, reduction: str = "mean") -> None:
        super().__init__()
        self.objective = objective
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per = self.objective.per_example_loss(logits, labels)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()


@dataclass
class Evaluation:
    """Central evaluation of one round: scalar metrics (metrics.jsonl always has `accuracy`
    and `loss`; a task adds its own, e.g. `perplexity`, `bleu`) and optional example rows
    (e.g. generations) for the run folder and the report."""

    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)


class Evaluator(ABC):
    """Evaluates the global model on the central evaluation set (built once per run)."""

    @abstractmethod
    def __call__(self, model: nn.Module, device: torch.device, *, round_: int,
                 final: bool) -> Evaluation:
        ...


class Task(ABC):
    """One kind of fine-tuning; one instance per run configuration.

    The model is the task's too; it depends on the spec alone (every node builds it from
    the same spec), so it is built by class methods: `confide.tasks.build_model(spec)` asks
    the spec's task."""

    name: str = ""
    fine_tunes: tuple[str, ...] = ()  # the fine-tune modes the task's model supports

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @classmethod
    def build_model(cls, spec: ModelSpec) -> nn.Module:
        """The model of `spec` with its checkpoint's weights and exactly the spec's
        parameters trainable; seeded, so that its random parts (head, LoRA A matrices,
        the tiny models) agree on every node."""
        cls._check_spec(spec)
        torch.manual_seed(spec.seed)
        return cls._assemble(spec, weights=True)

    @classmethod
    def count_trainable_parameters(cls, spec: ModelSpec) -> int:
        """The number of parameters `build_model(spec)` trains, from the model's
        configuration alone: the same architecture, head and LoRA wrapping are built on the
        meta device, so no weight file is read and no parameter memory is allocated."""
        cls._check_spec(spec)
        with torch.device("meta"):
            return count_trainable(cls._assemble(spec, weights=False))

    @classmethod
    def _check_spec(cls, spec: ModelSpec) -> None:
        # before anything is loaded: a wrong spec is refused in well under a second
        if spec.task != cls.name:
            raise ModelError(f"{cls.__name__} got a {spec.task!r} spec; "
                             "confide.tasks.build_model builds the model of any task")
        if spec.fine_tune not in cls.fine_tunes:
            raise ModelError(f"fine-tune = {spec.fine_tune!r} is not available for "
                             f"{cls.name}; allowed: {', '.join(cls.fine_tunes)}")

    @classmethod
    def _assemble(cls, spec: ModelSpec, *, weights: bool) -> nn.Module:
        model = cls.base_model(spec, weights=weights)
        disable_dropout(model)
        return cls.make_trainable(model, spec)

    @classmethod
    @abstractmethod
    def base_model(cls, spec: ModelSpec, *, weights: bool) -> nn.Module:
        """The architecture of `spec.model` with the task's head, everything trainable:
        with the checkpoint's weights when `weights`, else from its configuration alone
        (no weight file read). Randomly initialised models ignore `weights`."""

    @classmethod
    @abstractmethod
    def make_trainable(cls, model: nn.Module, spec: ModelSpec) -> nn.Module:
        """`model` with exactly the spec's fine-tune parameters trainable (LoRA wrapped
        where the spec asks for it)."""

    @property
    @abstractmethod
    def objective(self) -> Objective:
        ...

    @abstractmethod
    def read(self, path: str | Path, *, num_labels: int = 0, max_rows: int = 0
             ) -> TextDataset:
        """Read and validate one partner/evaluation file (errors name file, row, problem)."""

    @abstractmethod
    def model_spec(self, num_labels: int) -> ModelSpec:
        ...

    @abstractmethod
    def tokenizer(self) -> Any:
        ...

    @abstractmethod
    def encode(self, data: TextDataset) -> Mapping[str, torch.Tensor]:
        """input_ids, attention_mask (right-padded) and labels for the DP trainer."""

    @abstractmethod
    def evaluator(self, evaluation: TextDataset) -> Evaluator:
        ...

    @abstractmethod
    def export(self, model: nn.Module, dest: Path) -> Path:
        """Write a standard Hugging Face folder (LoRA merged) loadable by transformers."""
