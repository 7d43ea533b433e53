"""Fine-tune variants for the DP recipe search: FFA-LoRA, LoRA on all linear layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from confide.config import build_config
from confide.model import ModelSpec, count_trainable, frozen_digest, trainable_state
from confide.tasks import build_model
from confide.tasks.inputs import model_spec


def lora_modules(model: torch.nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.").split(".lora_A")[0]
            for n, _ in model.named_parameters() if ".lora_A." in n}


def test_ffa_lora_trains_only_b_and_the_head() -> None:
    plain = build_model(ModelSpec("tiny", 2, fine_tune="lora"))
    ffa = build_model(ModelSpec("tiny", 2, fine_tune="lora", lora_freeze_a=True))
    names = list(trainable_state(ffa))
    assert names and not any("lora_A" in n for n in names)
    assert any("lora_B" in n for n in names) and any("classifier" in n for n in names)
    a_count = sum(p.numel() for n, p in plain.named_parameters() if "lora_A" in n)
    assert count_trainable(ffa) == count_trainable(plain) - a_count


def test_ffa_lora_a_is_seeded_identical_and_covered_by_the_frozen_digest() -> None:
    a = build_model(ModelSpec("tiny", 2, fine_tune="lora", lora_freeze_a=True, seed=3))
    b = build_model(ModelSpec("tiny", 2, fine_tune="lora", lora_freeze_a=True, seed=3))
    a_mats = {n: p for n, p in a.named_parameters() if "lora_A" in n}
    b_mats = {n: p for n, p in b.named_parameters() if "lora_A" in n}
    assert a_mats and a_mats.keys() == b_mats.keys()
    assert all(torch.equal(a_mats[n], b_mats[n]) for n in a_mats)
    assert all(bool(p.abs().sum() > 0) for p in a_mats.values())  # random, not zero
    assert frozen_digest(a) == frozen_digest(b)
    # a node holding another A cannot pass the server's frozen-digest check
    with torch.no_grad():
        next(iter(b_mats.values()))[0, 0] += 1e-3
    assert frozen_digest(a) != frozen_digest(b)
    # and the digest of FFA-LoRA names the A matrices: it differs from plain LoRA's
    plain = build_model(ModelSpec("tiny", 2, fine_tune="lora", seed=3))
    assert frozen_digest(plain) != frozen_digest(a)


def test_ffa_lora_dp_step_changes_b_and_leaves_a() -> None:
    from confide.clients.dp_training import train_dp
    from tests.clients.test_dp_training import easy_task

    torch.set_num_threads(1)
    model = build_model(ModelSpec("tiny", 2, fine_tune="lora", lora_freeze_a=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_dp(model, easy_task(n=32), noise_multiplier=0.5, max_grad_norm=1.0,
                      batch_size=16, physical_batch_size=8, epochs=1.0, optimizer="sgd",
                      learning_rate=0.5, seed=0, private_randomness=False)
    assert result.steps == 2
    after = dict(model.named_parameters())
    a_names = [n for n in before if "lora_A" in n]
    b_names = [n for n in before if "lora_B" in n]
    assert a_names and b_names
    assert all(torch.equal(before[n], after[n]) for n in a_names)
    assert all(not torch.equal(before[n], after[n]) for n in b_names)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_all_linear_targets_every_encoder_linear_but_not_the_head(pooling: str) -> None:
    model = build_model(ModelSpec("tiny", 2, fine_tune="lora", lora_targets="all-linear",
                                  pooling=pooling))
    targeted = lora_modules(model)
    kinds = {n.rsplit(".", 1)[-1] for n in targeted}
    assert kinds == {"query", "key", "value", "dense"}
    # 2 layers x (query, key, value, attention output, intermediate, output)
    assert len(targeted) == 2 * 6
    assert not any("classifier" in n or "pooler" in n for n in targeted)
    trainable = list(trainable_state(model))
    assert any(n.endswith("classifier.weight") for n in trainable)


def test_all_linear_on_the_default_minilm_and_through_the_config() -> None:
    cfg = build_config({"lora-targets": "all-linear", "lora-freeze-a": True})
    spec = model_spec(cfg, 2)
    assert spec.lora_freeze_a and spec.lora_targets == "all-linear"
    model = build_model(spec)
    targeted = lora_modules(model)
    assert len(targeted) == 6 * 6  # MiniLM-L6: 6 layers x 6 Linear layers
    assert {n.rsplit(".", 1)[-1] for n in targeted} == {"query", "key", "value", "dense"}
    rank, hidden, inter = cfg.lora_rank, 384, 1536
    # B only: q, k, v, attention-output (hidden x r); intermediate (inter x r); output
    # (hidden x r); head 384 x 2 + 2
    b_per_layer = rank * (4 * hidden + inter + hidden)
    assert count_trainable(model) == 6 * b_per_layer + hidden * 2 + 2
    assert not np.isnan(next(iter(trainable_state(model).values()))).any()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_bitfit_trains_exactly_the_biases_and_the_head(pooling: str) -> None:
    model = build_model(ModelSpec("tiny", 2, fine_tune="bitfit", pooling=pooling))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n, _ in model.named_parameters()
            if n.startswith(("classifier.", "bert.pooler."))}
    expected = {n for n, _ in model.named_parameters() if n.endswith(".bias")} | head
    assert trainable == expected
    assert head and head <= trainable  # the head's weight matrix trains, not only its bias
    assert not any("embeddings.word_embeddings" in n for n in trainable)
    assert any("LayerNorm.bias" in n for n in trainable)
    full = build_model(ModelSpec("tiny", 2, fine_tune="full", pooling=pooling))
    assert count_trainable(model) < count_trainable(full) / 20
