"""Sequence classification (`text,label` files) behind the task interface: its model
(`confide.tasks.classifier_model`), data, objective, evaluation and export."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from confide.data import TextDataset, read_text_file
from confide.encoding import encode
from confide.model import ModelSpec, explicit_position_inputs, load_tokenizer
from confide.tasks.base import Evaluation, Evaluator, Objective, Task
from confide.tasks.batches import check_dataset, to_batch
from confide.tasks.classifier_model import FINE_TUNES, classifier_base, classifier_trainable

CLASSIFICATION = "classification"


class ClassificationObjective(Objective):
    def forward(self, model: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        # Explicit [B, L] ids: BERT's implicit [1, L] position buffer would give Opacus a
        # gradient summed over the batch (see confide.clients.opacus_compat).
        position_ids, token_type_ids = explicit_position_inputs(input_ids)
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids, token_type_ids=token_type_ids)
        return out.logits if hasattr(out, "logits") else out[0]

    def per_example_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, reduction="none")


CLASSIFICATION_OBJECTIVE = ClassificationObjective()


def evaluate(model: nn.Module, dataset: Mapping[str, torch.Tensor], batch_size: int,
             device: str | torch.device = "cpu") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `dataset`, in eval mode, no gradients."""
    input_ids, attention_mask, labels = check_dataset(dataset, "evaluate")
    dev = torch.device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        with torch.no_grad():
            for s in range(0, len(labels), max(1, batch_size)):
                batch = to_batch(input_ids[s:s + batch_size], attention_mask[s:s + batch_size],
                                 labels[s:s + batch_size], dev)
                logits = CLASSIFICATION_OBJECTIVE.forward(model, batch["input_ids"],
                                                          batch["attention_mask"])
                loss_sum += F.cross_entropy(logits.float(), batch["labels"],
                                            reduction="sum").item()
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
    finally:
        model.train(was_training)
    return correct / len(labels), loss_sum / len(labels)


class _ClassificationEvaluator(Evaluator):
    def __init__(self, tensors: Mapping[str, torch.Tensor], batch_size: int) -> None:
        self.tensors = tensors
        self.batch_size = batch_size

    def __call__(self, model: nn.Module, device: torch.device, *, round_: int,
                 final: bool) -> Evaluation:
        accuracy, loss = evaluate(model, self.tensors, self.batch_size, device)
        return Evaluation({"accuracy": float(accuracy), "loss": float(loss)})


class ClassificationTask(Task):
    name = CLASSIFICATION
    fine_tunes = FINE_TUNES

    @classmethod
    def base_model(cls, spec: ModelSpec, *, weights: bool) -> nn.Module:
        return classifier_base(spec, weights=weights)

    @classmethod
    def make_trainable(cls, model: nn.Module, spec: ModelSpec) -> nn.Module:
        return classifier_trainable(model, spec)

    @property
    def objective(self) -> Objective:
        return CLASSIFICATION_OBJECTIVE

    def read(self, path: str | Path, *, num_labels: int = 0, max_rows: int = 0
             ) -> TextDataset:
        return read_text_file(path, num_labels=num_labels, max_rows=max_rows)

    def model_spec(self, num_labels: int) -> ModelSpec:
        return ModelSpec.from_config(self.cfg, num_labels)

    def tokenizer(self) -> Any:
        return load_tokenizer(self.cfg.model)

    def encode(self, data: TextDataset) -> Mapping[str, torch.Tensor]:
        return encode(data, self.tokenizer(), self.cfg.max_length)

    def evaluator(self, evaluation: TextDataset) -> Evaluator:
        return _ClassificationEvaluator(self.encode(evaluation), self.cfg.eval_batch_size)

    def export(self, model: nn.Module, dest: Path) -> Path:
        from confide.tasks.export import export_classifier

        return export_classifier(model, self.tokenizer(), dest)
