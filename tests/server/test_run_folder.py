from pathlib import Path

import numpy as np
import pytest

from confide.config import build_config
from confide.server.run_folder import CheckpointError, RunFolder
from confide.simulation.runner import simulate


def test_checkpoint_roundtrip_and_corruption_is_named(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.create(build_config({}))
    state = {"w": np.arange(4, dtype=np.float32)}
    folder.save_checkpoint(2, state, {"partners": {}})
    round_, weights, server_state = folder.load_checkpoint()
    assert server_state["round"] == 2 and server_state["partners"] == {}
    assert round_ == 2 and np.array_equal(weights["w"], state["w"])
    folder.save_checkpoint(3, state, {"partners": {}})
    assert len(list(folder.checkpoint_dir.glob("global_round*.safetensors"))) == 1
    (folder.checkpoint_dir / "global_round3.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        folder.load_checkpoint()
    (folder.checkpoint_dir / "server_state.json").write_text("{half")
    with pytest.raises(CheckpointError, match="corrupted"):
        folder.load_checkpoint()


def test_ledger_key_is_private_and_reused(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.create(build_config({}))
    key = folder.ledger_signing_key()
    assert oct(folder.ledger_key.stat().st_mode & 0o777) == "0o600"
    again = folder.ledger_signing_key()
    assert key.public_key().public_bytes_raw() == again.public_key().public_bytes_raw()
    assert folder.ledger_public_key.exists()


def test_a_finished_run_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ledger.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="not empty"):
        simulate(build_config({"model": "tiny", "out": str(tmp_path / "run")}))
    assert (tmp_path / "run" / "ledger.jsonl").read_text() == "{}\n"
