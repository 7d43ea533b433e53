"""Using a finished run's model: generate (causal-lm), export (both tasks), predict
(classification). The model is rebuilt from the run folder (`model/`: trained weights and
model_info.json) over the same frozen base, after checking that the weights are the ones
the run recorded (model_info.json's weights-digest and the ledger's last model_digest).
Nothing written overwrites an existing file unless asked (`force`), and never the input."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from confide.config import RunConfig, load_toml, recorded_config
from confide.errors import ConfideError
from confide.run_layout import (
    CONFIG_FILE,
    LEDGER_FILE,
    MODEL_DIR,
    MODEL_INFO_FILE,
    WEIGHTS_FILE,
)

PREDICTIONS_FILE = "predictions.csv"  # predict's default output, in the run folder


class RunUseError(ConfideError, ValueError):
    """The run folder cannot be used this way (wrong task, missing model, weights that are
    not the run's)."""


def check_weights(run_dir: Path) -> None:
    """model/weights.safetensors must be the model the run recorded: SHA-256 equal to
    model_info.json's weights-digest and to the ledger's last model_digest (where the
    folder has them). Weights altered or replaced after the run are refused by name."""
    from confide.privacy import ledger_events as ev
    from confide.privacy.ledger import read_lines

    model_dir = Path(run_dir) / MODEL_DIR
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (the run did not finish, or its model "
                                "was removed)")
    actual = ev.file_digest(weights)
    info = json.loads((model_dir / MODEL_INFO_FILE).read_text())
    recorded = [(f"{MODEL_DIR}/{MODEL_INFO_FILE}'s weights-digest", info.get("weights-digest"))]
    ledger = Path(run_dir) / LEDGER_FILE
    if ledger.is_file():
        digests = [line.entry["payload"] for line in read_lines(ledger)
                   if line.entry is not None and line.entry.get("type") == ev.MODEL_DIGEST]
        if digests:
            recorded.append((f"the ledger's last model_digest (round "
                             f"{digests[-1].get('round')})", digests[-1].get("sha256")))
    for where, digest in recorded:
        if digest is not None and digest != actual:
            raise RunUseError(
                f"{weights} is not the model this run recorded: its SHA-256 {actual[:16]}… "
                f"differs from {where}, {str(digest)[:16]}… (altered or replaced after the "
                "run); refusing to use it")


def check_output_file(out: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """An output file never replaces an input, and an existing file only with `force`."""
    out = Path(out)
    for given in inputs:
        if out.resolve() == Path(given).resolve():
            raise FileExistsError(f"--out {out} is the input file {given}; choose another "
                                  "--out (an input is never overwritten, --force or not)")
    if out.exists() and (out.is_dir() or not force):
        raise FileExistsError(f"--out {out} already exists" + (
            " and is a folder" if out.is_dir() else "; give --force to replace it") + ", or "
            "choose another --out")


def run_config(run_dir: Path) -> RunConfig:
    """The run's resolved configuration (config.toml), minus its output folder."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.toml (not a Confide run folder)")
    if not (Path(run_dir) / MODEL_DIR / MODEL_INFO_FILE).is_file():
        raise FileNotFoundError(f"{run_dir}: no model/ (the run did not finish)")
    return recorded_config(load_toml(path))  # a folder of an earlier version reads as it meant


def load_trained_model(run_dir: str | Path) -> Any:
    """Rebuild the model of a finished run with its trained weights (`model/`), once they
    are checked to be the run's (check_weights)."""
    from safetensors.numpy import load_file

    from confide.model import ModelSpec, load_trainable_state
    from confide.tasks import build_model

    check_weights(Path(run_dir))
    model_dir = Path(run_dir) / MODEL_DIR
    info = json.loads((model_dir / MODEL_INFO_FILE).read_text())
    targets = info["lora-targets"]
    if info.get("task") == "causal-lm":  # the classification default maps per family
        from confide.tasks.causal_lm import lora_targets_for

        targets = lora_targets_for(info["model"], targets)
    spec = ModelSpec(model=info["model"], num_labels=info["num-labels"],
                     fine_tune=info["fine-tune"], lora_rank=info["lora-rank"],
                     lora_alpha=info["lora-alpha"], lora_targets=targets,
                     lora_dropout=info["lora-dropout"], seed=info["seed"],
                     pooling=info["pooling"],
                     lora_freeze_a=bool(info.get("lora-freeze-a", False)),
                     freeze_embeddings=bool(info.get("freeze-embeddings", False)),
                     task=info.get("task", "classification"))
    model = build_model(spec)
    load_trainable_state(model, load_file(str(model_dir / WEIGHTS_FILE)))
    return model


def _model(run_dir: Path) -> tuple[RunConfig, Any]:
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


def export_run(run_dir: Path, dest: Path, *, force: bool = False) -> Path:
    """`force`: write into an existing, non-empty folder (never the run folder itself)."""
    from confide.tasks import get_task
    from confide.tasks.export import check_destination

    dest = Path(dest)
    check_destination(dest, Path(run_dir), force=force)  # before the model is built
    cfg, model = _model(run_dir)
    if not (force and dest.is_dir() and any(dest.iterdir())):
        return get_task(cfg).export(model, dest)
    # --force into a non-empty folder: export next to it, then replace file by file
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        written = get_task(cfg).export(model, Path(tmp) / "export")
        for item in written.iterdir():
            target = dest / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    return dest


def predict_run(run_dir: Path, data: Path, out: Path | None = None, batch_size: int = 64,
                *, force: bool = False) -> Path:
    """Writes `text,prediction,probability` rows (CSV) for a classification run; an existing
    `out` (default RUN_DIR/predictions.csv) only with `force`, and never the input."""
    from confide.data import DataError
    from confide.tasks import CLASSIFICATION, get_task
    from confide.tasks.classification import CLASSIFICATION_OBJECTIVE

    out = Path(out) if out is not None else Path(run_dir) / PREDICTIONS_FILE
    # the data and the run's own record are inputs (the default output aside)
    record = [p for p in Path(run_dir).rglob("*") if p.is_file() and p.name != PREDICTIONS_FILE]
    check_output_file(out, [Path(data), *record], force=force)  # before any work is done
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
    with out.open("w", newline="", encoding="utf-8") as fh:
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
