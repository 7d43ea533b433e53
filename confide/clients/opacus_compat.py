"""Making a Hugging Face sequence classifier (plain or peft-wrapped) safe for Opacus.

The bug this module exists for (opacus 1.6.0, transformers 5.x, BERT-style embeddings):
when a batch carries no `position_ids` / `token_type_ids`, `BertEmbeddings.forward` takes

* `position_ids = self.position_ids[:, :L]`, a registered buffer of shape **[1, L]**. The
  position embedding output is then [1, L, H] and is *broadcast* over the batch when added
  to the word embeddings, so autograd hands its module a backprop that is already **summed
  over the batch**. Opacus' per-sample gradient for `position_embeddings.weight` comes out
  as [1, V, H]: the sum of all examples' gradients. In `hooks`/`functorch` mode that only
  fails loudly (the optimizer's `torch.stack` of per-parameter norms: "[32] ... and [1]")
  when the batch has more than one row; with ghost clipping it would be broadcast into
  every example's norm. Either way it is a privacy bug, not a crash to work around.
* `token_type_ids = buffer.expand(B, L)`, a stride-0 view. Its values are right, but
  Opacus' ghost-clipping norm sampler calls `.view(-1, 1)` on the indices ("view size is not
  compatible with input tensor's size and stride").

The fix: never let the model fall back on those buffers. `ExplicitInputsClassifier` wraps
the classifier and always feeds explicit, contiguous [B, L] `position_ids` (0..L-1 per row,
what BERT uses for right-padded input) and all-zero `token_type_ids`. Every embedding then
sees one row of indices per example, so per-sample gradients are exact in every mode
(checked against per-example backward passes in tests/clients/test_opacus_per_sample.py).

Grad-sample mode: `hooks` is the default. Measured on CPU (benchmarks/dp_overhead.py, LoRA
on MiniLM, batch 32, seq len 64, 1 thread; DP step / plain step): hooks 1.00-1.17x,
functorch 1.03x, ghost 1.6-2.8x. `ghost` needs a second backward pass through the whole
frozen encoder, which is most of the cost in LoRA mode, and `functorch` re-runs each hooked
layer under vmap; `hooks` only adds per-sample outer products for the few small trainable
layers (LoRA A/B, pooler, classifier). Opacus hooks only modules that hold trainable
parameters, so the frozen encoder pays nothing beyond ordinary backward. In `full` mode
ghost is faster (2.1x vs 4.4x): hooks materialise a [B, 30522, 384] word-embedding
grad_sample. Book-keeping (`confide.clients.book_keeping`: one backward pass without weight
gradients, the clipped sum from one product per layer) is faster still for `full`, so `auto`
(the config default) picks book-keeping for `full` where it can clip every trainable layer,
ghost where not, and hooks otherwise; train_dp runs ghost through Opacus' fast-gradient-
clipping module, optimizer and loss, and book-keeping through the same optimizer, with the
same mechanism (same clip formula, noise std and divisor) as hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from confide.clients.book_keeping import (
    shared_trainable_parameters,
    summarise,
    unsupported_parameters,
)
from confide.model import explicit_position_inputs

DEFAULT_GRAD_SAMPLE_MODE = "hooks"
SUPPORTED_GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost", "bookkeeping")

# Attributes Opacus monkey-patches onto parameters/modules; all must be gone after a round so
# the next round can wrap the same model again (or a checkpoint does not carry them).
_PARAM_ATTRS = ("grad_sample", "_current_grad_sample", "summed_grad", "_forward_counter",
                "_processed", "_norm_sample")
_MODULE_ATTRS = ("autograd_grad_sample_hooks", "activations", "max_batch_len",
                 "ft_compute_sample_grad")


class OpacusCompatError(RuntimeError):
    """The model or its per-sample gradients are not safe for DP-SGD."""


def tied_trainable_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters that more than one module holds (tied weights, e.g. a
    causal LM's input embedding and output head), which Opacus' ghost clipping refuses."""
    return sorted(names[0] for names in shared_trainable_parameters(model))


def resolve_grad_sample_mode(mode: str, fine_tune: str, model: nn.Module | None = None) -> str:
    """'auto' -> for full fine-tuning, book-keeping when it can clip every trainable layer of
    `model` (one backward pass), else ghost clipping (two), else hooks (tied trainable
    weights, which both refuse); hooks would materialise a per-sample copy of every weight,
    the word embeddings first. For the small trainable sets (LoRA, head, BitFit) hooks: the
    per-sample products of a few small layers cost less than anything else
    (benchmarks/results/dp_overhead.md). Without a model 'auto' cannot check book-keeping's
    layers and keeps ghost for full. An explicit mode the model cannot use is a clear error."""
    tied = tied_trainable_parameters(model) if model is not None else []
    if mode == "auto":
        if fine_tune != "full":
            return "hooks"
        if model is not None and not unsupported_parameters(model):
            return "bookkeeping"
        return "ghost" if not tied else "hooks"
    if mode == "ghost" and tied:
        raise OpacusCompatError(
            f"grad-sample-mode = 'ghost' cannot clip this model: its trainable weights "
            f"{', '.join(tied)} are tied (shared by two layers), which Opacus' ghost clipping "
            "does not support; use grad-sample-mode = 'auto' or 'hooks'")
    if mode == "bookkeeping" and model is not None:
        problems = unsupported_parameters(model)
        if problems:
            raise OpacusCompatError(
                "grad-sample-mode = 'bookkeeping' cannot clip this model's trainable "
                f"weights {summarise(problems, 3)}: it knows Linear, Embedding and LayerNorm "
                "layers with unshared weights; use grad-sample-mode = 'auto', 'ghost' or 'hooks'")
    return mode


class ExplicitInputsClassifier(nn.Module):
    """`forward(input_ids, attention_mask) -> logits`, always with explicit [B, L] ids.

    Holds the original model as `.model`, so its parameters are the very same tensors:
    training through the wrapper trains the caller's model in place. `forward_fn` (a task
    objective's forward, e.g. a causal LM's, which takes no token_type_ids) replaces the
    classifier call; it must pass explicit [B, L] ids for the same reason.
    """

    def __init__(self, model: nn.Module,
                 forward_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
                 | None = None) -> None:
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.forward_fn is not None:
            return self.forward_fn(self.model, input_ids, attention_mask)
        position_ids, token_type_ids = explicit_position_inputs(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, token_type_ids=token_type_ids)
        return out.logits if hasattr(out, "logits") else out[0]


def make_opacus_ready(model: nn.Module,
                      forward_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor],
                                           torch.Tensor] | None = None
                      ) -> ExplicitInputsClassifier:
    """Wrap `model` for Opacus: explicit ids, train mode, and a check that it has something
    to train and nothing Opacus cannot give per-sample gradients for."""
    from opacus.validators import ModuleValidator

    model.train()  # Opacus refuses (and hooks misbehave on) a model in eval mode.
    if not any(p.requires_grad for p in model.parameters()):
        raise OpacusCompatError("the model has no trainable parameters")
    wrapper = ExplicitInputsClassifier(model, forward_fn)
    errors = ModuleValidator.validate(wrapper, strict=False)
    if errors:
        raise OpacusCompatError(f"model is not Opacus-compatible: {errors[:3]}")
    return wrapper


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def check_grad_samples(params: Iterable[nn.Parameter], batch_size: int) -> None:
    """Every trainable parameter has per-sample gradients with exactly one row per example.

    Defence in depth against the summed-over-batch bug above: a [1, ...] grad_sample for a
    batch of B > 1 is the batch's summed gradient and must never reach clipping.
    """
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise OpacusCompatError(
                f"a trainable parameter of shape {tuple(p.shape)} got no per-sample gradient "
                "(unused in forward, or a layer Opacus does not hook)")
        rows = sum(len(g) for g in gs) if isinstance(gs, list) else len(gs)
        if rows != batch_size or (not isinstance(gs, list) and gs.shape[1:] != p.shape):
            raise OpacusCompatError(
                f"per-sample gradient of a parameter of shape {tuple(p.shape)} has "
                f"{rows} rows for a batch of {batch_size}: it would clip a sum over "
                "examples, not one example")


def strip_opacus_state(model: nn.Module) -> None:
    """Remove every Opacus hook and attribute from `model`, so it is a plain module again."""
    for module in model.modules():
        for attr in _MODULE_ATTRS:
            if attr in module.__dict__:
                if attr == "autograd_grad_sample_hooks":
                    for handle in module.__dict__[attr]:
                        handle.remove()
                delattr(module, attr)
    for p in model.parameters():
        for attr in _PARAM_ATTRS:
            if attr in p.__dict__:
                delattr(p, attr)
        p.grad = None


def has_opacus_state(model: nn.Module) -> bool:
    """True when any Opacus hook or per-sample attribute is still attached to `model`."""
    for module in model.modules():
        if any(attr in module.__dict__ for attr in _MODULE_ATTRS):
            return True
        if module._forward_hooks or module._backward_hooks:
            return True
    return any(attr in p.__dict__ for p in model.parameters() for attr in _PARAM_ATTRS)
