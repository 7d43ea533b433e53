"""Tokenising partner texts into the tensors the model and the DP trainer consume."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from confide.data import TextDataset


def encode(data: TextDataset, tokenizer: PreTrainedTokenizerBase, max_length: int
           ) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (padded to the longest row, capped at max_length), labels."""
    batch = tokenizer(data.texts, truncation=True, max_length=max_length, padding="longest",
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.as_tensor(data.labels, dtype=torch.long)}
