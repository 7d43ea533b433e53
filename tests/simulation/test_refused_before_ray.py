"""Configuration errors found before the simulation engine starts: one line, exit 2, and no
run folder left behind. A model folder of the wrong kind for the task (it used to be
PEFT's 'Target modules not found', or two minutes of Ray tracebacks and a half-written run
folder), a model path that is missing, and a delta no partner's row count supports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import confide.simulation.runner as runner
from confide.cli import main


def model_folder(root: Path, architectures: list[str], model_type: str) -> Path:
    """A local Hugging Face folder as far as Confide looks before loading anything."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"architectures": architectures,
                                                  "model_type": model_type}))
    (root / "model.safetensors").write_bytes(b"not read before the kind is checked")
    return root


@pytest.fixture(autouse=True)
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine must never start for these inputs."""
    import flwr.simulation

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the simulation engine was started")
    monkeypatch.setattr(flwr.simulation, "run_simulation", refuse)
    monkeypatch.setattr(runner, "preflight", lambda *_a: refuse())


def simulate(tmp_path: Path, *args: str) -> int:
    return main(["simulate", "--rounds", "1", "--clients", "2", "--out",
                 str(tmp_path / "run"), *args])


@pytest.mark.parametrize("extra", [[], ["--set", "lora-targets=q_proj,v_proj"]])
def test_a_causal_lm_folder_for_classification_is_one_line_before_ray(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    model = model_folder(tmp_path / "smol", ["LlamaForCausalLM"], "llama")
    assert simulate(tmp_path, "--model", str(model), *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "is a causal language model (LlamaForCausalLM): it fits task = 'causal-lm'" in err
    assert not (tmp_path / "run").exists()


def test_an_encoder_folder_for_causal_lm_is_one_line_before_ray(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = model_folder(tmp_path / "bert", ["BertModel"], "bert")
    assert simulate(tmp_path, "--model", str(model), "--set", "task=causal-lm") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "it fits task = 'classification'" in err, err
    assert not (tmp_path / "run").exists()


def test_a_missing_model_path_is_called_missing(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate(tmp_path, "--model", str(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere'} is missing (no such folder)" in err
    assert "config.json" not in err and not (tmp_path / "run").exists()


def test_delta_above_one_over_the_smallest_partner_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(250)))
    assert simulate(tmp_path, "--model", "tiny", "--data", str(data), "--delta", "0.5") == 2
    err = capsys.readouterr().err
    assert "delta = 0.5 is >= 1/(rows of the smallest partner) = 1/100" in err, err
    assert "allow-large-delta" in err and not (tmp_path / "run").exists()
