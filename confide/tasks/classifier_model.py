"""The classifier: an encoder with mean or CLS pooling and a linear head, with exactly the
fine-tune mode's parameters trainable (LoRA, full, head, BitFit). Built by the
classification task (`confide.tasks.build_model` asks the spec's task), and exported as a
Hugging Face folder by `confide.tasks.export`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from confide.model import TINY, ModelError, ModelSpec, add_lora, load_tokenizer, resolve_model_path

FINE_TUNES = ("lora", "full", "head", "bitfit")
EMBEDDING_TABLES = ("embeddings.word_embeddings", "embeddings.position_embeddings",
                    "embeddings.token_type_embeddings")


class MeanPoolClassifier(nn.Module):
    """Encoder + masked mean pooling + linear head.

    Sentence-transformers models such as all-MiniLM-L6-v2 were trained so that the mean of
    their token states is the sentence representation; the CLS token + pooler that
    `BertForSequenceClassification` uses was never trained for it. Under DP this matters
    twice: good features need fewer steps, and a head of `hidden x labels` parameters
    (instead of a 148k-parameter pooler) keeps the noise dimension small.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(hidden_size, num_labels)
        self.num_labels = num_labels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def tiny_bert_config(num_labels: int, vocab_size: int) -> BertConfig:
    """A small random-init BERT for fast tests (same code path as the real model)."""
    return BertConfig(  # type: ignore[call-arg]  # num_labels: PretrainedConfig's **kwargs
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def is_sentence_transformer(path: Path) -> bool:
    pooling = path / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return False
    return bool(json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"))


def resolve_pooling(spec: ModelSpec) -> str:
    if spec.pooling != "auto":
        return spec.pooling
    if spec.model == TINY:
        return "mean"
    return "mean" if is_sentence_transformer(resolve_model_path(spec.model)) else "cls"


def classifier_base(spec: ModelSpec, *, weights: bool) -> nn.Module:
    """Encoder and head (mean pooling + linear, or CLS pooler + linear), all trainable;
    the encoder's checkpoint weights only when `weights` (else its config.json alone)."""
    pooling = resolve_pooling(spec)
    if spec.model == TINY:
        config = tiny_bert_config(spec.num_labels, load_tokenizer(TINY).vocab_size)
        if pooling == "mean":
            return MeanPoolClassifier(BertModel(config, add_pooling_layer=False),
                                      config.hidden_size, spec.num_labels)
        return BertForSequenceClassification(config)
    path = str(resolve_model_path(spec.model))
    if pooling == "mean":
        encoder = (AutoModel.from_pretrained(path, local_files_only=True,
                                             add_pooling_layer=False) if weights
                   else AutoModel.from_config(AutoConfig.from_pretrained(
                       path, local_files_only=True), add_pooling_layer=False))
        return MeanPoolClassifier(encoder, encoder.config.hidden_size, spec.num_labels)
    if weights:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=spec.num_labels, local_files_only=True)
    return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(
        path, num_labels=spec.num_labels, local_files_only=True))


def head_parameter_names(model: nn.Module) -> set[str]:
    # With CLS pooling the (pretrained) pooler belongs to the head: it adapts the CLS state.
    return {n for n, _ in model.named_parameters()
            if n.startswith(("classifier.", "bert.pooler.", "pooler."))}


def classifier_trainable(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """`model` with exactly the parameters of the spec's fine-tune mode trainable."""
    head = head_parameter_names(model)
    if spec.fine_tune == "lora":
        return add_lora(model, spec, head)
    if spec.fine_tune == "full":
        model.requires_grad_(True)
        if spec.freeze_embeddings:
            # The embedding tables are most of a small encoder (MiniLM: 11.9M of 22.7M)
            # and a DP update of a word row is mostly noise for words the batch never saw.
            for name, p in model.named_parameters():
                if name.rsplit(".", 1)[0].endswith(EMBEDDING_TABLES):
                    p.requires_grad_(False)
        return model
    if spec.fine_tune not in ("head", "bitfit"):
        raise ModelError(f"fine-tune = {spec.fine_tune!r}; allowed: {', '.join(FINE_TUNES)}")
    model.requires_grad_(False)
    # head: the head alone. BitFit (Ben Zaken et al. 2022): every bias term (attention,
    # MLP, LayerNorm) plus the head; about 0.1% of the encoder, so DP noise has few
    # coordinates to land on.
    bitfit = spec.fine_tune == "bitfit"
    for name, p in model.named_parameters():
        if name in head or (bitfit and name.endswith(".bias")):
            p.requires_grad_(True)
    return model
