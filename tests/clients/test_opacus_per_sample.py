"""Opacus per-sample gradients against the ground truth: one backward pass per example.

Each example goes alone through the model at its own length (no padding at all), so the
comparison also shows that padding in the batch changes nothing. The embeddings in `full`
mode are where a gradient summed over the batch would hide (BERT's [1, L] position_ids
buffer); the LoRA checks guard against upstream's silent LoRA corruption (opacus #820).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from confide.clients.opacus_compat import (
    OpacusCompatError,
    check_grad_samples,
    has_opacus_state,
    make_opacus_ready,
    strip_opacus_state,
)
from confide.model import ModelSpec
from confide.tasks import build_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LENGTHS = [10, 6, 3, 8]  # different true lengths: rows 1-3 carry padding in the batch
REL_TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_batch(lengths: list[int], vocab: int = 30522, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b, length = len(lengths), max(lengths)
    ids = torch.randint(1000, vocab, (b, length), generator=gen)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0  # [PAD]
    return ids, mask, torch.randint(0, 2, (b,), generator=gen)


def perturb_lora_b(model: nn.Module) -> None:
    # peft initialises lora_B to zero, which makes every lora_A gradient exactly zero: a
    # comparison of zeros with zeros would prove nothing about lora_A.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def per_example_grads(wrapper: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                      labels: torch.Tensor, lengths: list[int]) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in wrapper.named_parameters() if p.requires_grad}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i, n in enumerate(lengths):
        wrapper.zero_grad(set_to_none=True)
        logits = wrapper(ids[i:i + 1, :n], mask[i:i + 1, :n])
        F.cross_entropy(logits, labels[i:i + 1], reduction="sum").backward()
        for name, p in params.items():
            rows[name].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    wrapper.zero_grad(set_to_none=True)
    return {n: torch.stack(r) for n, r in rows.items()}


def opacus_grad_samples(wrapper: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                        labels: torch.Tensor, mode: str = "hooks") -> dict[str, torch.Tensor]:
    from opacus.grad_sample import GradSampleModule

    gsm = GradSampleModule(wrapper, batch_first=True, loss_reduction="sum",
                           force_functorch=mode == "functorch")
    try:
        F.cross_entropy(gsm(ids, mask), labels, reduction="sum").backward()
        params = [p for p in wrapper.parameters() if p.requires_grad]
        check_grad_samples(params, len(labels))
        return {n: p.grad_sample.clone() for n, p in wrapper.named_parameters()
                if p.requires_grad}
    finally:
        gsm.to_standard_module()
        strip_opacus_state(wrapper)


def assert_close_per_sample(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
                            ) -> None:
    assert got.keys() == ref.keys()
    # Scale = the largest per-example gradient entry: some gradients are exactly zero in
    # exact arithmetic (attention key biases cancel in softmax) and only float noise remains.
    scale = max(float(r.abs().max()) for r in ref.values())
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, f"{name}: grad_sample {tuple(g.shape)} vs {tuple(r.shape)}"
        err = float((g - r).abs().max())
        assert err <= REL_TOL * scale + 1e-4 * float(r.abs().max()), (
            f"{name}: per-sample gradient off by {err:.3g} (scale {scale:.3g})")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("fine_tune", ["full", "lora", "head", "bitfit"])
def test_tiny_per_sample_grads_match_per_example_backward(fine_tune: str, pooling: str) -> None:
    model = build_model(ModelSpec("tiny", 2, fine_tune=fine_tune, pooling=pooling))
    perturb_lora_b(model)
    wrapper = make_opacus_ready(model)
    ids, mask, labels = make_batch(LENGTHS)
    ref = per_example_grads(wrapper, ids, mask, labels, LENGTHS)
    got = opacus_grad_samples(wrapper, ids, mask, labels)
    assert_close_per_sample(got, ref)
    if fine_tune == "full":
        prefix = "model.encoder" if pooling == "mean" else "model.bert"
        pos = got[f"{prefix}.embeddings.position_embeddings.weight"]
        assert pos.shape[0] == len(LENGTHS)
        # Examples of different lengths touch different position rows: not one shared sum.
        assert float(pos[2, 3:].abs().max()) == 0.0 and float(pos[0, 3:].abs().max()) > 0
    if fine_tune == "bitfit":  # biases of Linear and LayerNorm layers, and the head
        assert any("LayerNorm.bias" in n for n in got) and any("query.bias" in n for n in got)
        assert all(n.endswith(".bias") or "classifier." in n or "pooler." in n for n in got)
    if fine_tune == "lora":
        names = set(got)
        assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
        assert all(float(got[n].abs().max()) > 0 for n in names if "lora_" in n)
    assert not has_opacus_state(model)


def test_functorch_mode_matches_too() -> None:
    model = build_model(ModelSpec("tiny", 2, fine_tune="lora"))
    perturb_lora_b(model)
    wrapper = make_opacus_ready(model)
    ids, mask, labels = make_batch(LENGTHS)
    ref = per_example_grads(wrapper, ids, mask, labels, LENGTHS)
    assert_close_per_sample(opacus_grad_samples(wrapper, ids, mask, labels, "functorch"), ref)


def test_without_the_fix_position_grads_are_summed_over_the_batch() -> None:
    """Documents the cause: HF's implicit [1, L] position_ids give a [1, V, H] grad_sample."""
    from opacus.grad_sample import GradSampleModule

    model = build_model(ModelSpec("tiny", 2, fine_tune="full", pooling="cls")).train()
    ids, mask, labels = make_batch(LENGTHS)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        F.cross_entropy(gsm(input_ids=ids, attention_mask=mask).logits, labels,
                        reduction="sum").backward()
        pos = model.bert.embeddings.position_embeddings.weight
        assert pos.grad_sample.shape[0] == 1  # the bug: one row for the whole batch
        with pytest.raises(OpacusCompatError, match="sum over examples"):
            check_grad_samples([p for p in model.parameters() if p.requires_grad],
                               len(labels))
    finally:
        gsm.to_standard_module()
        strip_opacus_state(model)


def test_ghost_clipping_norms_match_per_example_norms() -> None:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    model = build_model(ModelSpec("tiny", 2, fine_tune="full"))
    wrapper = make_opacus_ready(model)
    ids, mask, labels = make_batch(LENGTHS)
    ref = per_example_grads(wrapper, ids, mask, labels, LENGTHS)
    ref_norms = torch.stack([torch.sqrt(sum((r[i] ** 2).sum() for r in ref.values()))
                             for i in range(len(LENGTHS))])
    gsm = GradSampleModuleFastGradientClipping(wrapper, max_grad_norm=1.0,
                                               use_ghost_clipping=True, loss_reduction="sum")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            F.cross_entropy(gsm(ids, mask), labels, reduction="sum").backward()
        torch.testing.assert_close(gsm.get_norm_sample(), ref_norms, rtol=1e-4, atol=1e-6)
    finally:
        gsm.to_standard_module()
        strip_opacus_state(model)


def test_lora_dp_step_updates_exactly_the_trainable_parameters() -> None:
    """Upstream #820: DP training looks healthy while the LoRA weights never change."""
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = build_model(ModelSpec("tiny", 2, fine_tune="lora"))
    perturb_lora_b(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(("lora_" in n) or ("classifier" in n) or ("pooler" in n)
                         for n in names)
    assert not any("modules_to_save" in n or "original_module" in n
                   for n, _ in model.named_parameters())

    wrapper = make_opacus_ready(model)
    gsm = GradSampleModule(wrapper, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(trainable, lr=0.5), noise_multiplier=0.0,
                      max_grad_norm=1e6, expected_batch_size=len(LENGTHS))
    assert {id(p) for p in opt.params} == {id(p) for p in trainable}
    ids, mask, labels = make_batch(LENGTHS)
    F.cross_entropy(gsm(ids, mask), labels).backward()
    opt.step()
    gsm.to_standard_module()
    strip_opacus_state(model)
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == p.requires_grad, f"{name}: moved={moved}, trainable={p.requires_grad}"

    # The same step without DP (noise 0, no clipping) from the same start: same weights.
    reference = build_model(ModelSpec("tiny", 2, fine_tune="lora"))
    perturb_lora_b(reference)
    ref_wrapper = make_opacus_ready(reference)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    F.cross_entropy(ref_wrapper(ids, mask), labels).backward()
    ref_opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_real_minilm_lora_per_sample_grads() -> None:
    model = build_model(ModelSpec("minilm", 2, fine_tune="lora"))
    perturb_lora_b(model)
    wrapper = make_opacus_ready(model)
    for seed, lengths in enumerate([[12, 5, 9], [7, 16, 3]]):
        ids, mask, labels = make_batch(lengths, seed=seed)
        ids[:, 0] = 101  # [CLS]
        ref = per_example_grads(wrapper, ids, mask, labels, lengths)
        assert_close_per_sample(opacus_grad_samples(wrapper, ids, mask, labels), ref)
    assert not has_opacus_state(model)
