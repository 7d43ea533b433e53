import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from confide.clients.node_state import (
    MAX_RECORD_RUNS,
    STATE_FILE,
    load_node_state,
    save_node_state,
)
from confide.clients.state_location import node_state_dir
from confide.privacy.accountant import Spend
from confide.privacy.mechanisms import SampledGaussian
from confide.privacy.receipts import CountersignedHead, verify_head


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


def _receipt(signature: str) -> str:
    return json.dumps({"payload": {"round": 1}, "public_key": "k", "signature": signature})


def test_receipts_are_kept_per_run_until_a_countersigned_head_covers_them(
        tmp_path: Path) -> None:
    ctx = context({"state-dir": str(tmp_path)})
    state = load_node_state(ctx, delta=1e-5, max_epsilon=5.0, state_dir=tmp_path)
    a1, a2, b1 = _receipt("aa" * 64), _receipt("ab" * 64), _receipt("bb" * 64)
    state.remember_receipt("run-a", a1)
    state.remember_receipt("run-a", a2)
    state.remember_receipt("run-b", b1)
    save_node_state(ctx, state, tmp_path)
    again = load_node_state(context({"state-dir": str(tmp_path)}), delta=1e-5,
                            max_epsilon=5.0, state_dir=tmp_path)
    # no acknowledgement (the server does not know this node yet): everything is re-sent
    assert again.unrecorded_receipts("run-a", None) == [a1, a2]
    # the server's bare word (a list of names, as earlier versions sent) forgets nothing
    assert again.unrecorded_receipts("run-a", {"aa" * 8, "ab" * 8}) == [a1, a2]
    # acknowledged at ledger entries 5 and 9; without a countersigned head: still kept
    acked = {"aa" * 8: 5, "ab" * 8: 9}
    assert again.unrecorded_receipts("run-a", acked) == [a1, a2]
    # the node countersigns head 7: entry 5 is inside it, entry 9 is not yet
    assert again.unrecorded_receipts("run-a", acked, 7) == [a2]
    assert again.unrecorded_receipts("run-a", acked, 9) == []
    # another run's receipts are untouched (that run may still be resumed)
    assert again.unrecorded_receipts("run-b", None) == [b1]
    # forgetting a pending receipt keeps it in the node's record of its run
    assert [r["signature"] for r in again.records["run-a"].receipts] == ["aa" * 64,
                                                                        "ab" * 64]


def test_the_record_of_a_run_keeps_receipts_and_countersigned_heads(
        tmp_path: Path) -> None:
    ctx = context({"state-dir": str(tmp_path)})
    state = load_node_state(ctx, delta=1e-5, max_epsilon=5.0, state_dir=tmp_path)
    run, head = "ab" * 32, "cd" * 32
    signed = state.countersign(run, 4, head, 2)
    assert verify_head(signed).payload == {"kind": "ledger_head", "run": run, "index": 4,
                                           "hash": head, "round": 2,
                                           "partner": state.pseudonym}
    state.countersign(run, 4, head, 2)  # a re-sent round: recorded once
    save_node_state(ctx, state, tmp_path)
    again = load_node_state(ctx, delta=1e-5, max_epsilon=5.0, state_dir=tmp_path)
    assert again.records[run].heads == [CountersignedHead(4, head, 2)]
    # a node keeps the record of its most recent runs only
    for i in range(MAX_RECORD_RUNS + 2):
        again.countersign(f"{i:064x}", 0, head, 1)
    assert len(again.records) == MAX_RECORD_RUNS and run not in again.records
    assert f"{MAX_RECORD_RUNS + 1:064x}" in again.records


def test_receipts_of_an_earlier_version_state_file_are_kept(tmp_path: Path) -> None:
    """Earlier versions kept the receipts of the last round trained ("run/round")."""
    ctx = context({"state-dir": str(tmp_path)})
    state = load_node_state(ctx, delta=1e-5, max_epsilon=5.0, state_dir=tmp_path)
    data = json.loads(state.to_json())
    del data["pending_receipts"], data["run_records"]
    data.update({"attempt_round": "run-a/3", "attempt_receipts": [_receipt("cc" * 64)]})
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    again = load_node_state(ctx, delta=1e-5, max_epsilon=5.0, state_dir=tmp_path)
    assert again.unrecorded_receipts("run-a", None) == [_receipt("cc" * 64)]
