"""Using a finished run's model: generate (causal-lm), export (both tasks), predict
(classification). The model is rebuilt from the run folder (`model/`: trained weights and
model_info.json) over the same frozen base."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from confide.config import RunConfig, build_config, load_toml


class RunUseError(ValueError):
    """The run folder cannot be used this way (wrong task, missing model)."""


def run_config(run_dir: Path) -> RunConfig:
    """The run's resolved configuration (config.toml), minus its output folder."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.toml (not a Confide run folder)")
    if not (Path(run_dir) / "model" / "model_info.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no model/ (the run did not finish)")
    values = load_toml(path)
    return build_config(values)


def _model(run_dir: Path) -> tuple[RunConfig, Any]:
    from confide.server.run_folder import load_trained_model

    return run_config(run_dir), load_trained_model(run_dir)


def generate_from_run(run_dir: Path, prompts: Sequence[str], *, max_new_tokens: int = 0,
                      device: str = "cpu") -> list[str]:
    from confide.tasks import CAUSAL_LM, get_task
    from confide.tasks.causal_lm import generate

    cfg, model = _model(run_dir)
    if cfg.task != CAUSAL_LM:
        raise RunUseError(f"{run_dir} is a {cfg.task} run; generate needs task = 'causal-lm'")
    return generate(model, get_task(cfg).tokenizer(), list(prompts),
                    max_new_tokens=max_new_tokens or cfg.max_new_tokens, batch_size=16,
                    device=torch.device(device))


def export_run(run_dir: Path, dest: Path) -> Path:
    from confide.tasks import get_task

    cfg, model = _model(run_dir)
    return get_task(cfg).export(model, Path(dest))


def predict_run(run_dir: Path, data: Path, out: Path | None = None, batch_size: int = 64
                ) -> Path:
    """Writes `text,prediction,probability` rows (CSV) for a classification run."""
    from confide.data import DataError
    from confide.tasks import CLASSIFICATION, get_task
    from confide.tasks.classification import CLASSIFICATION_OBJECTIVE

    cfg, model = _model(run_dir)
    if cfg.task != CLASSIFICATION:
        raise RunUseError(f"{run_dir} is a {cfg.task} run; predict needs task = "
                          "'classification' (use generate)")
    texts = _read_texts(Path(data))
    if not texts:
        raise DataError(f"{data}: no rows")
    tok = get_task(cfg).tokenizer()
    model.eval()
    rows: list[tuple[str, int, float]] = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            chunk = texts[s:s + batch_size]
            enc = tok(chunk, truncation=True, max_length=cfg.max_length, padding="longest",
                      return_tensors="pt")
            logits = CLASSIFICATION_OBJECTIVE.forward(model, enc["input_ids"],
                                                      enc["attention_mask"])
            probs = logits.float().softmax(-1)
            best = probs.argmax(-1)
            rows += [(t, int(b), float(p[b])) for t, b, p in zip(chunk, best, probs,
                                                                  strict=True)]
    out = out or Path(run_dir) / "predictions.csv"
    with Path(out).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "prediction", "probability"])
        writer.writerows(rows)
    return Path(out)


def _read_texts(path: Path) -> list[str]:
    """The `text` column of a CSV/JSONL file (labels, if present, are ignored)."""
    from confide.data import DataError

    if not path.is_file():
        raise DataError(f"{path}: file does not exist")
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    else:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    texts = []
    for i, row in enumerate(rows, start=1):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {i}: text is empty, missing or not a string")
        texts.append(text)
    return texts


def read_prompts(path: Path) -> list[str]:
    """One prompt per line (.txt), or the `prompt` column of a CSV/JSONL file."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".jsonl"):
        from confide.tasks.causal_lm import read_prompt_file

        with path.open(encoding="utf-8") as fh:
            header = fh.readline()
        column = "prompt" if "prompt" in header else "mr"
        data = read_prompt_file(path, prompt_column=column, completion_column=column)
        return list(dict.fromkeys(data.texts))
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
