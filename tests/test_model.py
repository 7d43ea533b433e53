import numpy as np
import pytest

from confide.model import (
    ModelError,
    ModelSpec,
    apply_delta,
    compute_delta,
    count_trainable,
    frozen_digest,
    load_trainable_state,
    resolve_model_path,
    trainable_state,
)
from confide.tasks import build_model


@pytest.mark.parametrize("fine_tune", ["lora", "full", "head"])
def test_same_spec_builds_identical_models(fine_tune: str) -> None:
    a = build_model(ModelSpec("tiny", 3, fine_tune=fine_tune, seed=1))
    b = build_model(ModelSpec("tiny", 3, fine_tune=fine_tune, seed=1))
    sa, sb = trainable_state(a), trainable_state(b)
    assert list(sa) == list(sb)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert frozen_digest(a) == frozen_digest(b)
    c = build_model(ModelSpec("tiny", 3, fine_tune=fine_tune, seed=2))
    assert frozen_digest(c) != frozen_digest(a) or fine_tune == "full"


def test_only_the_modes_parameters_train() -> None:
    lora = build_model(ModelSpec("tiny", 2, fine_tune="lora"))
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier" in n for n in names)
    head = build_model(ModelSpec("tiny", 2, fine_tune="head"))
    assert all("classifier" in n for n, p in head.named_parameters() if p.requires_grad)
    full = build_model(ModelSpec("tiny", 2, fine_tune="full"))
    assert count_trainable(full) > 10 * count_trainable(lora) > 10 * count_trainable(head)


def test_delta_roundtrip_is_exact_for_the_trainable_state() -> None:
    model = build_model(ModelSpec("tiny", 2, fine_tune="lora"))
    old = trainable_state(model)
    new = {k: v + np.float32(0.25) for k, v in old.items()}
    delta = compute_delta(new, old)
    assert set(delta) == set(old) and all(d.dtype == np.float32 for d in delta.values())
    again = apply_delta(old, delta)
    assert all(np.allclose(again[k], new[k], atol=1e-6) for k in new)
    load_trainable_state(model, again)
    assert all(np.allclose(trainable_state(model)[k], new[k], atol=1e-6) for k in new)


def test_loading_mismatched_weights_names_the_problem() -> None:
    model = build_model(ModelSpec("tiny", 2, fine_tune="lora"))
    state = trainable_state(model)
    key = next(iter(state))
    bad_shape = dict(state)
    bad_shape[key] = np.zeros((1, 1), np.float32)
    with pytest.raises(ModelError, match=f"{key} has shape"):
        load_trainable_state(model, bad_shape)
    with pytest.raises(ModelError, match="missing"):
        load_trainable_state(model, {k: v for k, v in state.items() if k != key})


def test_unknown_model_path_is_refused_without_download(tmp_path) -> None:
    with pytest.raises(ModelError, match="never downloads"):
        resolve_model_path(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelError, match="never downloads"):
        resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")


def test_real_packaged_minilm_builds_offline_with_mean_pooling() -> None:
    model = build_model(ModelSpec("minilm", 2, fine_tune="lora"))
    names = list(trainable_state(model))
    assert any("lora_A" in n for n in names) and names[-1].endswith("classifier.bias")
    assert count_trainable(model) < 100_000  # adapters + head, not the 22.7M base


def test_each_task_builds_its_own_model_through_confide_tasks() -> None:
    from torch import nn

    from confide.tasks.classification import ClassificationTask

    causal = build_model(ModelSpec("tiny", 2, fine_tune="full", task="causal-lm"))
    assert hasattr(causal, "generate") and not hasattr(causal, "classifier")
    with pytest.raises(ModelError, match=r"confide\.tasks\.build_model"):
        ClassificationTask.build_model(ModelSpec("tiny", 2, task="causal-lm"))
    with pytest.raises(ValueError, match="allowed: classification, causal-lm"):
        build_model(ModelSpec("tiny", 2, task="translation"))
    assert isinstance(build_model(ModelSpec("tiny", 2)), nn.Module)
