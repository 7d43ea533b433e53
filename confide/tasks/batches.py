"""Tokenized tensors as batches: checks, padding trim, sequential iteration.

Shared by local DP training on the node (`confide.clients.dp_training`) and by the tasks'
evaluators (which the server runs), so that neither side imports the other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from confide.errors import ConfideError

KEYS = ("input_ids", "attention_mask", "labels")


class DPTrainingError(RuntimeError):
    """Local training (or evaluation) cannot run or produced an unusable result."""


class EmptyDatasetError(ConfideError, DPTrainingError, ValueError):
    """There is no example to train or evaluate on."""


def to_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             device: torch.device) -> dict[str, torch.Tensor]:
    # Drop trailing columns that are padding in every row: with right padding and an
    # attention mask they change no real token's output, and attention cost is O(L^2).
    used = attention_mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    if labels.dim() == 2:  # token labels (causal LM): same columns as the inputs
        labels = labels[:, :length].contiguous()
    return {"input_ids": input_ids[:, :length].contiguous().to(device),
            "attention_mask": attention_mask[:, :length].contiguous().to(device),
            "labels": labels.to(device)}


def check_dataset(dataset: Mapping[str, torch.Tensor], what: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    missing = [k for k in KEYS if k not in dataset]
    if missing:
        raise DPTrainingError(f"{what}: dataset lacks {missing}; expected {list(KEYS)}")
    input_ids, attention_mask, labels = (torch.as_tensor(dataset[k]) for k in KEYS)
    if len(labels) == 0 or input_ids.numel() == 0:
        raise EmptyDatasetError(f"{what}: the dataset has no examples")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise DPTrainingError(f"{what}: input_ids {tuple(input_ids.shape)} and attention_mask "
                              f"{tuple(attention_mask.shape)} must both be [N, L]")
    if len(labels) != len(input_ids):
        raise DPTrainingError(f"{what}: {len(labels)} labels for {len(input_ids)} rows")
    return input_ids.long(), attention_mask.long(), labels.long()


def iter_batches(dataset: Mapping[str, torch.Tensor], batch_size: int,
                 device: str | torch.device = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Sequential, padding-trimmed batch dicts (for callers outside the training loop)."""
    input_ids, attention_mask, labels = check_dataset(dataset, "batches")
    for s in range(0, len(labels), batch_size):
        yield to_batch(input_ids[s:s + batch_size], attention_mask[s:s + batch_size],
                       labels[s:s + batch_size], torch.device(device))
