"""Exporting a trained model as a standard Hugging Face folder (LoRA merged in)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn


def merged(model: nn.Module) -> nn.Module:
    """The plain transformers model with any LoRA adapters merged into its weights."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model


def check_destination(dest: Path, run_dir: Path, *, force: bool) -> None:
    """Export never writes into the run folder it reads (nor a folder holding it), and
    into an existing, non-empty folder only with `force`."""
    dest, run = Path(dest).resolve(), Path(run_dir).resolve()
    record = [p for p in run.iterdir() if p.is_dir()] if run.is_dir() else []
    if dest == run or run.is_relative_to(dest) or any(dest.is_relative_to(p) for p in record):
        raise FileExistsError(f"{dest} is (or holds, or lies in) the run folder {run_dir} "
                              "that export reads; choose a new folder outside its record")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} is an existing file; export needs a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise FileExistsError(f"{dest} is not empty; export needs a new or empty folder "
                              "(give --force to replace the files in it)")


def _prepare(dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; export needs a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _publish(dest: Path) -> None:
    """Exported files are for sharing: 0644 (safetensors writes its file through a private
    temporary one, 0600)."""
    for path in dest.rglob("*"):
        if path.is_file():
            path.chmod(0o644)


def export_causal_lm(model: nn.Module, tokenizer: Any, dest: Path) -> Path:
    """AutoModelForCausalLM.from_pretrained(dest) loads the result."""
    dest = _prepare(dest)
    plain = merged(model)
    plain.config.use_cache = True  # training switched the KV cache off; generation wants it
    plain.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    _publish(dest)
    return dest


# config.json's model_type for mean pooling: a configuration transformers knows, so that
# AutoConfig and AutoTokenizer read the folder without its code (no trust_remote_code
# prompt), of a family without a sequence-classification class, so that
# AutoModelForSequenceClassification cannot quietly build a CLS-pooled BERT from these
# weights but asks for trust_remote_code. BertGeneration's configuration is BERT's encoder's.
MEAN_POOL_MODEL_TYPE = "bert-generation"

MEAN_POOL_CODE = '''"""Confide's mean-pooling sequence classifier (encoder, masked mean, head)."""
import torch
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class ConfideMeanPoolConfig(BertConfig):
    model_type = "''' + MEAN_POOL_MODEL_TYPE + '''"


class ConfideMeanPoolClassifier(PreTrainedModel):
    config_class = ConfideMeanPoolConfig
    base_model_prefix = "encoder"

    def __init__(self, config):
        super().__init__(config)
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                position_ids=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids,
                              position_ids=position_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        logits = self.classifier((states * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
'''


def export_classifier(model: nn.Module, tokenizer: Any, dest: Path) -> Path:
    """AutoModelForSequenceClassification.from_pretrained(dest) loads the result (with
    trust_remote_code=True for mean pooling, whose head transformers has no class for)."""
    import torch
    from safetensors.torch import save_file

    from confide.tasks.classifier_model import MeanPoolClassifier

    dest = _prepare(dest)
    plain = merged(model)
    if not isinstance(plain, MeanPoolClassifier):
        plain.save_pretrained(str(dest))
        tokenizer.save_pretrained(str(dest))
        _publish(dest)
        return dest
    if plain.encoder.config.model_type != "bert":
        raise ValueError(f"export of a mean-pooling {plain.encoder.config.model_type} "
                         "classifier is not supported (BERT-family encoders only)")
    config = plain.encoder.config.to_dict()
    config.update({"model_type": MEAN_POOL_MODEL_TYPE,
                   "architectures": ["ConfideMeanPoolClassifier"],
                   "num_labels": plain.num_labels,
                   "auto_map": {
                       "AutoConfig": "modeling_confide.ConfideMeanPoolConfig",
                       "AutoModelForSequenceClassification":
                           "modeling_confide.ConfideMeanPoolClassifier"}})
    config.pop("id2label", None)
    config.pop("label2id", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    (dest / "modeling_confide.py").write_text(MEAN_POOL_CODE)
    state = {k: v.detach().contiguous().to(torch.float32) for k, v in plain.state_dict().items()}
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(dest))
    _publish(dest)
    return dest
