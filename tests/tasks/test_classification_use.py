"""Classification runs through the task interface: export to a standard Hugging Face folder
(AutoModelForSequenceClassification, same logits) and `confide predict`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from confide.cli import main
from confide.config import build_config
from confide.model import trainable_state
from confide.server.run_folder import RunFolder
from confide.tasks import build_model, get_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TEXTS = ["the film was wonderful", "a dull and tedious plot", "brilliant acting overall"]


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_export_loads_with_auto_class_and_predict_writes_csv(tmp_path: Path,
                                                             pooling: str) -> None:
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(1)
    cfg = build_config({"model": "tiny", "pooling": pooling, "num-labels": 2,
                        "out": str(tmp_path / "run")})
    task = get_task(cfg)
    model = build_model(task.model_spec(2))
    with torch.no_grad():  # move LoRA B off zero so the merge is visible in the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    folder = RunFolder(tmp_path / "run")
    folder.create(cfg)
    folder.save_model(dict(trainable_state(model)), cfg, {})
    dest = tmp_path / "export"
    assert main(["export", str(folder.root), str(dest)]) == 0
    exported = AutoModelForSequenceClassification.from_pretrained(
        str(dest), trust_remote_code=pooling == "mean").eval()
    enc = task.tokenizer()(TEXTS, padding="longest", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        want = task.objective.forward(model, enc["input_ids"], enc["attention_mask"])
        got = exported(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    data = tmp_path / "new.csv"
    data.write_text("text\n" + "\n".join(TEXTS) + "\n")
    assert main(["predict", str(folder.root), "--data", str(data)]) == 0
    with (folder.root / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["text"] for r in rows] == TEXTS
    assert [int(r["prediction"]) for r in rows] == want.argmax(-1).tolist()
    assert main(["generate", str(folder.root), "--prompt", "x"]) == 2  # not a causal-lm run
