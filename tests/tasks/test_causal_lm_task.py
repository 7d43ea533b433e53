"""The causal-lm task without Flower: data files and column mapping, evaluation metrics,
and a run folder's model through `confide generate` / `confide export` (a standard
Hugging Face folder with LoRA merged, same logits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from confide.cli import main
from confide.config import build_config
from confide.data import DataError
from confide.model import trainable_state
from confide.server.run_folder import RunFolder
from confide.tasks import get_task
from confide.tasks.causal_lm import PromptDataset, corpus_scores, read_prompt_file
from confide.tasks.inputs import federated_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROWS = [("name[Aromi], food[Chinese]", "Aromi serves Chinese food."),
        ("name[Aromi], food[Chinese]", "Chinese food is served at Aromi."),
        ("name[Cotto], area[riverside]", "Cotto is by the riverside."),
        ("name[Zizzi], priceRange[cheap]", "Zizzi is cheap."),
        ("name[Loch Fyne], eatType[restaurant]", "Loch Fyne is a restaurant."),
        ("name[Wildwood], near[Ranch]", "Wildwood is near Ranch.")]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def write_csv(path: Path, header: tuple[str, str] = ("mr", "ref"), rows=ROWS) -> Path:
    import csv

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def cfg_for(tmp_path: Path, **extra: object):
    data = write_csv(tmp_path / "train.csv")
    return build_config({"task": "causal-lm", "model": "tiny", "data": str(data),
                         "eval-data": str(data), "prompt-column": "mr",
                         "completion-column": "ref", "clients": 2, "rounds": 1,
                         "max-length": 32, "generate-prompts": 3, "max-new-tokens": 6,
                         **extra})


def test_prompt_files_map_columns_and_name_bad_rows(tmp_path: Path) -> None:
    data = read_prompt_file(write_csv(tmp_path / "a.csv"), prompt_column="mr",
                            completion_column="ref")
    assert isinstance(data, PromptDataset) and len(data) == len(ROWS)
    assert data.subset([2]).completions == [ROWS[2][1]]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "completion": c}) for p, c in ROWS))
    assert read_prompt_file(jsonl).texts[0] == ROWS[0][0]
    with pytest.raises(DataError, match=r"missing column.*prompt-column"):
        read_prompt_file(tmp_path / "a.csv")
    bad = write_csv(tmp_path / "c.csv", rows=[("x", "y"), ("z", " ")])
    with pytest.raises(DataError, match="row 2: ref is empty"):
        read_prompt_file(bad, prompt_column="mr", completion_column="ref")


def test_federated_split_uses_the_task_reader(tmp_path: Path) -> None:
    fed = federated_data(cfg_for(tmp_path))
    assert all(isinstance(p, PromptDataset) for p in fed.partitions)
    assert sum(len(p) for p in fed.partitions) == len(ROWS)
    assert isinstance(fed.evaluation, PromptDataset)


def test_causal_lm_data_says_nothing_of_classes(tmp_path: Path) -> None:
    # its rows carry zero labels for the plumbing: no "num-labels = 2 inferred" line
    assert federated_data(cfg_for(tmp_path)).labels_note == ""
    assert federated_data(cfg_for(tmp_path, **{"num-labels": 3})).labels_note == ""


def test_bleu_uses_every_reference_and_rouge_l() -> None:
    refs = [["Aromi serves Chinese food.", "Chinese food is served at Aromi."],
            ["Cotto is by the riverside."]]
    perfect = corpus_scores(["Chinese food is served at Aromi.", "Cotto is by the riverside."],
                            refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rouge_l"] == pytest.approx(100)
    worse = corpus_scores(["Aromi food.", "Cotto river."], refs)
    assert 0 <= worse["bleu"] < 50 and 0 < worse["rouge_l"] < 100


def test_evaluator_generation_run_folder_generate_and_export(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    from confide.clients.dp_training import train_dp
    from confide.tasks import build_model

    cfg = cfg_for(tmp_path, out=str(tmp_path / "run"))
    task = get_task(cfg)
    fed = federated_data(cfg)
    model = build_model(task.model_spec(2))
    train_dp(model, task.encode(fed.partitions[0]), noise_multiplier=0.0, max_grad_norm=1.0,
             batch_size=2, physical_batch_size=2, epochs=1.0, learning_rate=0.05,
             optimizer="adam", dp=False, private_randomness=False, objective=task.objective)
    evaluator = task.evaluator(fed.evaluation)
    device = torch.device("cpu")
    early = evaluator(model, device, round_=1, final=False)
    assert set(early.metrics) == {"accuracy", "loss", "perplexity"} and not early.examples
    final = evaluator(model, device, round_=1, final=True)
    assert {"bleu", "rouge_l", "perplexity"} <= set(final.metrics)
    assert len(final.examples) == 3  # distinct prompts, capped by generate-prompts
    assert final.examples[0]["references"] == [ROWS[0][1], ROWS[1][1]]

    folder = RunFolder(tmp_path / "run")
    folder.create(cfg)
    folder.save_model(dict(trainable_state(model)), cfg.replace(num_labels=2), {})
    assert main(["generate", str(folder.root), "--prompt", ROWS[2][0],
                 "--max-new-tokens", "4"]) == 0
    assert f"prompt: {ROWS[2][0]}" in capsys.readouterr().out
    dest = tmp_path / "export"
    assert main(["export", str(folder.root), str(dest)]) == 0
    assert {(p.stat().st_mode & 0o777) for p in dest.iterdir()} == {0o644}  # to share
    exported = AutoModelForCausalLM.from_pretrained(str(dest)).eval()
    assert not any("lora" in n for n, _ in exported.named_parameters())
    tensors = task.encode(fed.evaluation)
    model.eval()
    with torch.no_grad():
        want = task.objective.forward(model, tensors["input_ids"], tensors["attention_mask"])
        got = task.objective.forward(exported, tensors["input_ids"],
                                     tensors["attention_mask"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert main(["predict", str(folder.root), "--data", str(tmp_path / "train.csv")]) == 2
