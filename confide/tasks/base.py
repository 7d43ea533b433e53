"""The task interface: what differs between classification and causal-LM fine-tuning.

A task builds the model (and LoRA), reads and encodes a partner's data, gives the DP
trainer its forward pass and per-example loss (the `Objective`), evaluates centrally and
exports. The DP trainer, federation, secure aggregation and ledger only ever talk to these
interfaces; none of them asks which task runs.
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
from confide.model import ModelSpec


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
    """One kind of fine-tuning; one instance per run configuration."""

    name: str = ""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

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
