"""An exported classifier is a folder anyone can load: its tokenizer with
AutoTokenizer.from_pretrained(folder) and no trust_remote_code prompt, its files world-
readable (0644). The mean-pooling model still asks for trust_remote_code rather than being
built quietly as a CLS-pooled BERT from its weights."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from confide.cli import main
from confide.config import build_config
from confide.model import trainable_state
from confide.server.run_folder import RunFolder
from confide.tasks import build_model, get_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TEXTS = ["the film was wonderful", "a dull and tedious plot"]


@pytest.fixture
def prompts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every trust_remote_code question transformers asks (answered 'no')."""
    import transformers.dynamic_module_utils as dynamic

    asked: list[str] = []
    monkeypatch.setattr(dynamic, "TIME_OUT_REMOTE_CODE", 15)  # the prompt's default
    monkeypatch.setattr("builtins.input", lambda text="": asked.append(text) or "n")
    return asked


def export(tmp_path: Path, model_name: str, pooling: str) -> tuple[Path, torch.Tensor]:
    """A run folder holding an (untrained) model, exported with `confide export`; the
    model's logits on TEXTS."""
    torch.set_num_threads(1)
    cfg = build_config({"model": model_name, "pooling": pooling, "num-labels": 2,
                        "out": str(tmp_path / "run")})
    task = get_task(cfg)
    model = build_model(task.model_spec(2)).eval()
    folder = RunFolder(tmp_path / "run")
    folder.create(cfg)
    folder.save_model(dict(trainable_state(model)), cfg, {})
    dest = tmp_path / "export"
    assert main(["export", str(folder.root), str(dest)]) == 0
    enc = task.tokenizer()(TEXTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        logits = task.objective.forward(model, enc["input_ids"], enc["attention_mask"])
    return dest, logits


def modes(dest: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir() if p.is_file()}


def check_folder(dest: Path, want: torch.Tensor, asked: list[str], *, remote: bool) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert "model.safetensors" in modes(dest)
    assert set(modes(dest).values()) == {0o644}, modes(dest)
    tokenizer = AutoTokenizer.from_pretrained(str(dest))
    assert asked == []  # no trust_remote_code question
    enc = tokenizer(TEXTS, padding="longest", return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(dest), trust_remote_code=remote).eval()
    with torch.no_grad():
        got = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mean_pooling_export_loads_its_tokenizer_without_a_prompt(
        tmp_path: Path, prompts: list[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    dest, want = export(tmp_path, "tiny", "mean")
    check_folder(dest, want, prompts, remote=True)
    # without trust_remote_code the model is refused, never a BERT of another pooling
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForSequenceClassification.from_pretrained(str(dest))


def test_cls_pooling_export_is_standard_and_world_readable(
        tmp_path: Path, prompts: list[str]) -> None:
    dest, want = export(tmp_path, "tiny", "cls")
    check_folder(dest, want, prompts, remote=False)


def test_the_packaged_default_model_exports_a_folder_that_loads_without_prompts(
        tmp_path: Path, prompts: list[str]) -> None:
    # 'minilm' (sentence-transformers all-MiniLM-L6-v2): pooling 'auto' means mean pooling
    dest, want = export(tmp_path, "minilm", "auto")
    check_folder(dest, want, prompts, remote=True)
