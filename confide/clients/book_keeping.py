"""Book-keeping clipping: the sum of clipped per-example gradients from one backward pass.

Bu, Wang, Zha and Karypis, "Differentially Private Optimization on Large Model at Small
Cost" (ICML 2023). Ghost clipping (Opacus' fast gradient clipping) needs two full backward
passes: one for the per-example norms, a second of the loss reweighted by the clip factors.
Book-keeping needs one, and only half of it:

* During the forward pass every trainable layer keeps its input `a`. The trainable weights'
  `requires_grad` is off while the pass runs, so autograd computes only the gradients that
  flow down through the network (what a frozen model's backward computes) and never the
  weight gradients, and every trainable layer keeps the gradient `g` of its output.
* Per example and layer the gradient norm comes from the ghost-norm identity
  ||sum_t g_t a_t^T||^2 = <a a^T, g g^T> (cost T^2 per example, T tokens) or, where that is
  cheaper (T (d + p) >= d p), from the per-example gradient itself.
* The clip factor min(1, C / (norm + 1e-6)) (Opacus' formula) of each example scales its
  output gradients, and one matrix product per layer, sum_i c_i a_i^T g_i, is the clipped sum:
  the product an ordinary backward would have computed for the unclipped gradient.

So a DP step costs one forward, the downward half of a backward, the norms and the weight
products: about a plain step. The mechanism is unchanged (same clip formula, same noise and
divisor, added by Opacus' `DPOptimizerFastGradientClipping` exactly as for ghost clipping).

Layers it clips: `nn.Linear` (any number of leading token axes), `nn.Embedding` (rows of
`padding_idx` get no gradient, as in torch) and `nn.LayerNorm`. A layer called several times
in one forward pass is handled (its uses are concatenated along the token axis, which is what
its gradient sums over). Anything else holding a trainable parameter, and weights shared by
two layers (tied embeddings), are refused with their names: `unsupported_parameters` lets a
caller choose another method first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

SUPPORTED_LAYERS = (nn.Linear, nn.Embedding, nn.LayerNorm)


class BookKeepingError(RuntimeError):
    """The model holds trainable weights book-keeping cannot clip, or a pass went wrong."""


def shared_trainable_parameters(model: nn.Module) -> list[list[str]]:
    """Trainable parameters that more than one module holds (tied weights, e.g. a causal
    LM's input embedding and output head): the names of each, in module order."""
    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                holders.setdefault(id(param), []).append(f"{module_name}.{name}".lstrip("."))
    return [names for names in holders.values() if len(names) > 1]


def unsupported_parameters(model: nn.Module) -> list[str]:
    """Trainable parameters book-keeping cannot clip: held by a layer type it does not know
    (or one with an option that changes its gradient), or by more than one layer."""
    problems = []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            why = _unsupported_reason(module, name) if param.requires_grad else ""
            if why:
                problems.append(f"{module_name}.{name}".lstrip(".") + f" ({why})")
    problems += [f"{names[0]} (shared with {', '.join(names[1:])})"
                 for names in shared_trainable_parameters(model)]
    return sorted(problems)


def summarise(problems: list[str], shown: int) -> str:
    """The first `shown` problems, and how many more."""
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f" and {more} more" if more > 0 else "")


def _unsupported_reason(module: nn.Module, name: str) -> str:
    if not isinstance(module, SUPPORTED_LAYERS):
        return f"a {type(module).__name__} layer"
    if name not in ("weight", "bias"):
        return f"parameter {name!r} of a {type(module).__name__}"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None
                                             or module.scale_grad_by_freq):
        return "an embedding with max_norm or scale_grad_by_freq"
    return ""


@dataclass
class _Layer:
    module: nn.Module
    params: dict[str, nn.Parameter]
    inputs: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor | None] = field(default_factory=list)
    # LayerNorm: per-example gradients ([B, d]) summed over its uses, made during the
    # backward pass so that neither its input nor its output gradient is kept
    per_example: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.inputs.clear()
        self.grads.clear()
        self.per_example.clear()


class BookKeepingClipper:
    """Per-example clipping to `max_grad_norm` of every trainable parameter of `model`.

        with clipper.recording():
            losses = per_example_loss(model(batch))   # one loss per example
            losses.sum().backward()
        norms = clipper.clip_into_grads()             # p.grad = sum of clipped gradients

    Each example's gradient is that of its own loss: sum the per-example losses (a mean
    would scale every gradient by 1/B). `clip_into_grads` returns the per-example norms
    before clipping and frees what the pass kept.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        problems = unsupported_parameters(model)
        if problems:
            raise BookKeepingError(
                f"book-keeping clipping cannot clip {summarise(problems, 5)}")
        self.max_grad_norm = float(max_grad_norm)
        self.layers = [
            _Layer(m, {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad})
            for m in model.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]
        if not self.layers:
            raise BookKeepingError("the model has no trainable parameters")

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.params.values()]

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Forward and backward inside: keeps inputs and output gradients, computes no
        weight gradient. Parameters are trainable again on exit, whatever happened."""
        handles = [layer.module.register_forward_hook(self._forward_hook(layer))
                   for layer in self.layers]
        for layer in self.layers:
            layer.clear()
        params = self.parameters
        try:
            for p in params:
                p.requires_grad_(False)
            yield
        finally:
            for p in params:
                p.requires_grad_(True)
            for h in handles:
                h.remove()

    def _forward_hook(self, layer: _Layer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
                 ) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None
            replaced = None
            if not output.requires_grad:
                # Nothing below this layer trains, so no gradient needs to flow past it:
                # a leaf that requires grad gives the backward pass a start here.
                replaced = output = output.detach().requires_grad_(True)
            use = len(layer.inputs)
            layer.inputs.append(args[0].detach())
            layer.grads.append(None)

            def keep(grad: torch.Tensor) -> None:
                if isinstance(module, nn.LayerNorm):
                    x = layer.inputs[use]
                    _add_layer_norm_grads(module, layer, x, grad.detach())
                    layer.inputs[use] = x.new_empty((x.shape[0], 0))  # rows only
                else:
                    layer.grads[use] = grad.detach()
            output.register_hook(keep)
            return replaced
        return hook

    def clip_into_grads(self) -> torch.Tensor:
        """Set every trainable parameter's `.grad` to the sum over examples of its clipped
        per-example gradients; return the per-example norms (before clipping)."""
        try:
            used = [layer for layer in self.layers if layer.inputs]
            if not used:
                raise BookKeepingError("no trainable layer ran in the recorded forward pass")
            rows = used[0].inputs[0].shape[0]
            parts = [_LayerPass(layer, rows) for layer in used]
            device = used[0].inputs[0].device
            norm_sq = torch.zeros(rows, dtype=torch.float64, device=device)
            # Layers fed the same tensor (an attention block's query, key and value) share
            # its Gram matrix and its clip-weighted copy.
            shared: dict[tuple[Any, ...], torch.Tensor] = {}
            for part in parts:
                part.keep_only_own(shared)
                norm_sq += part.norm_sq(shared)
            norms = norm_sq.sqrt()
            factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            shared.clear()
            for layer in self.layers:  # before `release` below clears what ran
                if not layer.inputs:  # did not run: its gradient is zero for every example
                    for p in layer.params.values():
                        p.grad = torch.zeros_like(p)
            # Last layer first, each layer's kept input and output gradient freed once its
            # sum is written: the embeddings' large gradients are made when little else is
            # kept (peak memory of a full fine-tuning step, benchmarks/dp_overhead.py).
            for part in reversed(parts):
                part.keep_only_own(shared)
                part.write_clipped_sum(factor, shared)
                part.release()
            return norms
        finally:
            for layer in self.layers:
                layer.clear()


def _add_layer_norm_grads(module: nn.LayerNorm, layer: _Layer, x: torch.Tensor,
                          grad: torch.Tensor) -> None:
    rows, shape = x.shape[0], tuple(module.normalized_shape)
    g = grad.reshape(rows, -1, *shape)
    for name in layer.params:
        if name == "weight":
            normed = F.layer_norm(x, shape, eps=module.eps).reshape(rows, -1, *shape)
            per = (g * normed).sum(1)
        else:
            per = g.sum(1)
        if name in layer.per_example:
            layer.per_example[name] = layer.per_example[name] + per
        else:
            layer.per_example[name] = per


class _LayerPass:
    """One layer's uses in the pass, as [B, T, ...] tensors with the uses concatenated."""

    def __init__(self, layer: _Layer, rows: int) -> None:
        self.layer = layer
        module = layer.module
        inputs, grads = [], []
        for x, g in zip(layer.inputs, layer.grads, strict=True):
            if x.shape[0] != rows:
                raise BookKeepingError(
                    f"a {type(module).__name__} layer saw {x.shape[0]} rows where the batch "
                    f"has {rows}: book-keeping needs the batch on the first axis")
            if g is None:  # did not reach the loss, or a LayerNorm's (done in backward)
                continue
            if isinstance(module, nn.Embedding):
                inputs.append(x.reshape(rows, -1))
                grads.append(g.reshape(rows, -1, module.embedding_dim))
            else:
                inputs.append(x.reshape(rows, -1, x.shape[-1]))
                grads.append(g.reshape(rows, -1, g.shape[-1]))
        self.per_example: dict[str, torch.Tensor] = dict(layer.per_example)
        self.empty = not inputs and not self.per_example
        self.key: tuple[Any, ...] | None = None
        self.x = self.g = torch.empty(0)
        if inputs:
            self.x = torch.cat(inputs, dim=1) if len(inputs) > 1 else inputs[0]
            self.g = torch.cat(grads, dim=1) if len(grads) > 1 else grads[0]
            if len(inputs) == 1 and isinstance(module, nn.Linear):
                x = self.x
                self.key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)

    def _shared(self, shared: dict[tuple[Any, ...], torch.Tensor], what: str,
                make: Any) -> torch.Tensor:
        if self.key is None:
            return make()
        key = (what, *self.key)
        if key not in shared:
            shared[key] = make()
        return shared[key]

    def keep_only_own(self, shared: dict[tuple[Any, ...], torch.Tensor]) -> None:
        """Drop what earlier layers cached unless it is for this layer's input: layers that
        share an input are adjacent, and the weighted copies are activation-sized."""
        for key in list(shared):
            if self.key is None or key[1:] != self.key:
                del shared[key]

    def release(self) -> None:
        self.x = self.g = torch.empty(0)
        self.per_example.clear()
        self.layer.clear()  # the recorded tensors themselves, not only this pass's views

    def norm_sq(self, shared: dict[tuple[Any, ...], torch.Tensor]) -> torch.Tensor:
        if self.empty:
            return torch.zeros(())
        module = self.layer.module
        if isinstance(module, nn.LayerNorm):  # per-example gradients made in backward
            return sum((per.pow(2).flatten(1).sum(1).double()
                        for per in self.per_example.values()), torch.zeros(()))
        x, g = self.x, self.g
        if g.dtype in (torch.float16, torch.bfloat16):
            # the norms decide the clip factors: not in half precision
            g = g.float()
            x = x.float() if x.is_floating_point() else x
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        if isinstance(module, nn.Embedding):
            if module.padding_idx is not None:
                g = self.g = g * (x != module.padding_idx).unsqueeze(-1).to(g.dtype)
            same = (x.unsqueeze(2) == x.unsqueeze(1)).to(g.dtype)
            total += (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2)).double()
            return total
        tokens, d, p = x.shape[1], x.shape[2], g.shape[2]
        if "weight" in self.layer.params:
            if tokens * (d + p) < d * p:  # ghost norm: T x T Gram matrices
                gram_x = self._shared(shared, "gram", lambda: torch.bmm(x, x.transpose(1, 2)))
                gram_g = torch.bmm(g, g.transpose(1, 2))
                total += (gram_x * gram_g).sum((1, 2)).double()
            else:
                per = torch.bmm(g.transpose(1, 2), x)  # [B, p, d]
                self.per_example["weight"] = per
                total += per.pow(2).sum((1, 2)).double()
        if "bias" in self.layer.params:
            per = g.sum(1)
            self.per_example["bias"] = per
            total += per.pow(2).sum(1).double()
        return total

    def write_clipped_sum(self, factor: torch.Tensor,
                          shared: dict[tuple[Any, ...], torch.Tensor]) -> None:
        params = self.layer.params
        if self.empty:
            for p in params.values():
                p.grad = torch.zeros_like(p)
            return
        module, x, g = self.layer.module, self.x, self.g
        c = factor.to(g.dtype)
        for name, param in params.items():
            if name in self.per_example:
                per = self.per_example[name]
                grad = (per * c.to(per.dtype).view(-1, *([1] * (per.dim() - 1)))).sum(0)
            elif isinstance(module, nn.Embedding):
                weighted = (g * c.view(-1, 1, 1)).reshape(-1, g.shape[-1])
                grad = torch.zeros_like(param, dtype=weighted.dtype).index_add_(
                    0, x.reshape(-1), weighted)
            else:  # Linear weight through the ghost norm: one product over all tokens,
                # the clip factors folded into the narrower of input and output gradient
                d_in, d_out = x.shape[-1], g.shape[-1]
                if d_in <= d_out:
                    xc = self._shared(shared, "weighted", lambda: x * c.view(-1, 1, 1))
                    grad = g.reshape(-1, d_out).t() @ xc.reshape(-1, d_in)
                else:
                    grad = ((g * c.view(-1, 1, 1)).reshape(-1, d_out).t()
                            @ x.reshape(-1, d_in))
            param.grad = grad.to(param.dtype).reshape(param.shape)
