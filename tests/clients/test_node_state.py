import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from confide.clients.node_state import (
    STATE_FILE,
    load_node_state,
    node_state_dir,
    save_node_state,
)
from confide.privacy.accountant import Spend
from confide.privacy.mechanisms import SampledGaussian


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_state_survives_a_restart_on_disk(tmp_path: Path) -> None:
    ctx = context({"state-dir": str(tmp_path)})
    sdir = node_state_dir(ctx)
    state = load_node_state(ctx, delta=1e-5, max_epsilon=5.0, state_dir=sdir)
    eps = state.accountant.record(Spend(SampledGaussian(1.0, 0.1, 10), 1, "run-a"))
    state.mark_handled("m1")
    save_node_state(ctx, state, sdir)
    assert oct((tmp_path / STATE_FILE).stat().st_mode & 0o777) == "0o600"
    # a new process: fresh Context, same disk
    again = load_node_state(context({"state-dir": str(tmp_path)}), delta=1e-5, max_epsilon=5.0,
                            state_dir=sdir)
    assert again.accountant.epsilon() == pytest.approx(eps)
    assert again.pseudonym == state.pseudonym and again.seen("m1")


def test_simulated_partner_state_lives_in_the_run_folder(tmp_path: Path) -> None:
    ctx = context({"partition-id": 2, "num-partitions": 3})
    assert node_state_dir(ctx, str(tmp_path)) == tmp_path / "partners" / "partition-2"
    assert node_state_dir(ctx, "") is None


def test_unreadable_state_is_refused_not_reset(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    ctx = context({"state-dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match="refusing to train with an unknown privacy history"):
        load_node_state(ctx, delta=1e-5, max_epsilon=5.0, state_dir=tmp_path)


def test_a_lower_node_cap_applies_but_history_stays(tmp_path: Path) -> None:
    ctx = context({"state-dir": str(tmp_path)})
    state = load_node_state(ctx, delta=1e-5, max_epsilon=5.0, state_dir=tmp_path)
    state.accountant.record(Spend(SampledGaussian(1.0, 0.1, 10), 1, "r"))
    save_node_state(ctx, state, tmp_path)
    lower = load_node_state(ctx, delta=1e-5, max_epsilon=0.5, state_dir=tmp_path)
    assert lower.accountant.max_epsilon == 0.5 and len(lower.accountant.history) == 1
    data = json.loads((tmp_path / STATE_FILE).read_text())
    assert data["accountant"]["history"][0]["run"] == "r"
    with pytest.raises(RuntimeError, match="saved accountant used delta=1e-05"):
        load_node_state(ctx, delta=1e-6, max_epsilon=5.0, state_dir=tmp_path)
