"""The simulation driver's pre-flight check counts the trainable parameters from the
model's configuration: it builds no model (the ServerApp builds the one the run trains)."""

from __future__ import annotations

import shutil
from pathlib import Path

from confide.config import RunConfig
from confide.model import count_trainable, packaged_minilm_path
from confide.server.federation import resolve_evaluation
from confide.simulation.runner import preflight
from confide.tasks import build_model
from confide.tasks.inputs import model_spec


def test_driver_preflight_reads_no_weights_and_counts_what_the_server_builds(
        tmp_path: Path) -> None:
    # the packaged MiniLM with a weight file that cannot be loaded
    folder = tmp_path / "minilm"
    shutil.copytree(packaged_minilm_path(), folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = RunConfig(model=str(folder), clients=2, noise_multiplier=1.0)
    report = preflight(cfg, [400, 400])
    assert report is not None
    real = cfg.replace(model="minilm")
    _, num_labels = resolve_evaluation(real)
    assert report.trainable_parameters == count_trainable(build_model(model_spec(real,
                                                                                 num_labels)))
