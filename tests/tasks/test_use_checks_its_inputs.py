"""Commands that read a finished run's output check it first, and never overwrite: predict,
export and generate refuse weights that are not the ones the run recorded (model_info.json's
weights-digest, the ledger's last model_digest), naming the file; predict's --out and
export's destination replace an existing file only with --force, and never an input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load_file, save_file

from confide.cli import main
from confide.config import build_config
from confide.model import trainable_state
from confide.privacy import ledger_events as ev
from confide.privacy.ledger import Ledger
from confide.server.run_folder import RunFolder
from confide.tasks import build_model, get_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TEXTS = ["the film was wonderful", "a dull and tedious plot"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished classification run's model/ (with its weights-digest) and a ledger whose
    last model_digest is that of the same weights."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("use") / "run"
    cfg = build_config({"model": "tiny", "num-labels": 2, "out": str(root)})
    model = build_model(get_task(cfg).model_spec(2))
    state = {k: np.asarray(v) for k, v in trainable_state(model).items()}
    folder = RunFolder(root)
    folder.create(cfg)
    folder.save_model(state, cfg, {"weights-digest": ev.weights_digest(state)})
    with Ledger.create(folder.ledger, Ed25519PrivateKey.generate()) as ledger:
        ledger.append(ev.RunStarted(config=cfg.to_dict(), config_digest=cfg.digest(),
                                    code_version="test", ledger_public_key=ledger.public_key_hex,
                                    delta=cfg.delta))
        ledger.append(ev.RoundConfigured(round=1, sampled=["node-1"]))
        ledger.append(ev.ModelDigest(round=1, sha256=ev.weights_digest(state)))
    return root


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(template, tmp_path / "run")
    data = tmp_path / "new.csv"
    data.write_text("text\n" + "\n".join(TEXTS) + "\n")
    return tmp_path / "run"


def swap_weights(run: Path) -> Path:
    """Weights altered after the run: every value a little larger."""
    path = run / "model" / "weights.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(str(path)).items()}, str(path))
    return path


@pytest.mark.parametrize("command", [["predict", "--data", "DATA"], ["export", "DEST"],
                                     ["generate", "--prompt", "x"]])
def test_weights_that_are_not_the_runs_are_refused_by_name(
        run: Path, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    weights = swap_weights(run)
    args = [str(run.parent / "new.csv") if a == "DATA" else str(run.parent / "export")
            if a == "DEST" else a for a in command]
    assert main([command[0], str(run), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is not the model this run recorded" in err, err
    assert "model/model_info.json's weights-digest" in err
    assert not (run / "predictions.csv").exists() and not (run.parent / "export").exists()


def test_weights_matching_an_edited_model_info_still_fail_against_the_ledger(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    weights = swap_weights(run)
    info_path = run / "model" / "model_info.json"
    info = json.loads(info_path.read_text())
    info["weights-digest"] = ev.file_digest(weights)  # the edit covers its tracks here
    info_path.write_text(json.dumps(info))
    assert main(["predict", str(run), "--data", str(run.parent / "new.csv")]) == 2
    assert "differs from the ledger's last model_digest (round 1)" in capsys.readouterr().err


def test_predict_never_overwrites_without_force_and_never_the_input(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = run.parent / "new.csv"
    before = data.read_text()
    for force in ([], ["--force"]):
        assert main(["predict", str(run), "--data", str(data), "--out", str(data),
                     *force]) == 2
        assert "is the input file" in capsys.readouterr().err
        assert data.read_text() == before
    # the run's own record is an input too
    ledger = run / "ledger.jsonl"
    record = ledger.read_bytes()
    assert main(["predict", str(run), "--data", str(data), "--out", str(ledger),
                 "--force"]) == 2
    assert ledger.read_bytes() == record
    capsys.readouterr()
    mine = run.parent / "mine.csv"
    mine.write_text("keep me")
    assert main(["predict", str(run), "--data", str(data), "--out", str(mine)]) == 2
    assert "already exists; give --force to replace it" in capsys.readouterr().err
    assert mine.read_text() == "keep me"
    assert main(["predict", str(run), "--data", str(data), "--out", str(mine), "--force"]) == 0
    assert mine.read_text().startswith("text,prediction,probability")
    # the default output too: written once, then only with --force
    assert main(["predict", str(run), "--data", str(data)]) == 0
    assert main(["predict", str(run), "--data", str(data)]) == 2
    assert "predictions.csv already exists" in capsys.readouterr().err
    assert main(["predict", str(run), "--data", str(data), "--force"]) == 0


def test_export_replaces_a_folders_files_only_with_force_and_never_the_run(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = run.parent / "export"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    assert main(["export", str(run), str(dest)]) == 2
    assert "give --force" in capsys.readouterr().err
    assert (dest / "config.json").read_text() == "old"
    assert main(["export", str(run), str(dest), "--force"]) == 0
    assert (dest / "config.json").read_text() != "old" and (dest / "tokenizer.json").is_file()
    for inside in (run, run / "model", run.parent):
        assert main(["export", str(run), str(inside), "--force"]) == 2
        assert "the run folder" in capsys.readouterr().err
    assert load_file(str(run / "model" / "weights.safetensors"))  # untouched, still loads
