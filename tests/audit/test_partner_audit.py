"""`confide audit partner`: a partner checks the operator's published run folder against its
own record (its node_state.json), and catches what a server holding the ledger key can hide
from `confide audit verify`: an omitted round with a restated epsilon, a receipt moved from
another run, a forked chain.

Two real runs (tiny model, real ClientApp through the in-process grid) on the same three
partners, whose states live on disk as deployed partners' do; the malicious server is
scripted in tests/audit/malicious_server.py."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.audit.partner import audit_partner
from confide.audit.verify import verify_run
from confide.cli import main
from confide.clients.node_state import STATE_FILE, NodeState
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.privacy.receipts import sign_receipt
from confide.server.federation import Federation
from tests.audit import malicious_server as evil
from tests.inprocess import InProcessGrid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NODES, ROUNDS = 3, 3
BASE = {"model": "tiny", "rounds": ROUNDS, "clients": NODES, "max-length": 16,
        "num-labels": 2, "batch-size": 16, "physical-batch-size": 16,
        "max-eval-examples": 32, "preflight": "off", "seed": 5, "noise-multiplier": 1.1,
        "local-epochs": 0.04}


@dataclass(frozen=True)
class Runs:
    a: Path  # the first run
    b: Path  # a second run of the same partners
    states: Path  # states/node-i: each partner's own state folder

    def state_dir(self, node: int) -> Path:
        return self.states / f"node-{node}"

    def pseudonym(self, node: int) -> str:
        cfg = build_config(BASE)
        return NodeState.from_json((self.state_dir(node) / STATE_FILE).read_text(),
                                   cfg.delta, cfg.max_epsilon).pseudonym


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("partner-audit")
    states = root / "nodes"
    grid = InProcessGrid(NODES, state_root=states)
    for name in ("a", "b"):
        cfg = build_config({**BASE, "out": str(root / name)})
        assert Federation.open(grid, cfg, root / name).run()["rounds_completed"] == ROUNDS
    return Runs(root / "a", root / "b", states)


def published(runs: Runs, tmp_path: Path, name: str = "b") -> Path:
    """A copy of a run folder for the attacker to rewrite."""
    return Path(shutil.copytree(getattr(runs, name), tmp_path / name))


def verify_problems(run_dir: Path) -> list[str]:
    return [str(p) for p in verify_run(run_dir, pld=False).problems]


def partner_audit(runs: Runs, node: int, run_dir: Path,
                  capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`confide audit partner` of node `node`'s own state against `run_dir`: exit, output."""
    capsys.readouterr()
    status = main(["audit", "partner", str(runs.state_dir(node)), str(run_dir)])
    return status, capsys.readouterr().out


def test_every_partner_of_honest_runs_passes(runs: Runs,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for run_dir in (runs.a, runs.b):
        for node in range(1, NODES + 1):
            status, out = partner_audit(runs, node, run_dir, capsys)
            assert status == 0, out
            assert "VERDICT: PASS" in out
            assert f"{ROUNDS} receipt(s) you signed in this run are in the ledger (rounds " \
                   "1, 2, 3)" in out
            # every round's message named the head as the round started (round 1:
            # run_started), and the node countersigned it
            assert f"{ROUNDS} chain head(s) you countersigned" in out
            assert "2 round(s) trained from the model the ledger published" in out
    result = audit_partner(runs.state_dir(1), runs.b)
    assert {c.name: c.status for c in result.checks} == {
        "chain": "PASS", "receipts": "PASS", "epsilon": "PASS", "heads": "PASS",
        "models": "PASS"}
    # what the nodes countersigned is in the ledger too, for anyone to check
    assert "chain heads countersigned by partners" in verify_run(runs.b, pld=False).check(
        "chain").detail


def test_omitted_last_round_with_restated_epsilon_fails_the_partners_audit(
        runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = published(runs, tmp_path)
    victim = runs.pseudonym(1)
    evil.omit_round(run_dir, victim, ROUNDS)
    # the server re-signed a consistent record: the run folder verifies on its own
    assert verify_problems(run_dir) == []
    status, out = partner_audit(runs, 1, run_dir, capsys)
    assert status == 1
    assert f"round {ROUNDS}: omitted: your signed receipt of round {ROUNDS}" in out
    assert f"which lists you as dropped in round {ROUNDS}" in out
    assert "restated epsilon: the ledger's last claim states" in out
    assert "restated epsilon: summary.json states" in out
    assert "VERDICT: FAIL, round 3: omitted" in out
    # the other partners' records agree with it: their audits pass
    assert partner_audit(runs, 2, run_dir, capsys)[0] == 0


def test_receipt_moved_from_another_run_fails_both_audits(
        runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = published(runs, tmp_path)
    evil.move_receipt(run_dir, runs.a, runs.pseudonym(2), 2)
    # the receipt binds its run: audit verify sees it too
    assert any("it is signed for another run" in p for p in verify_problems(run_dir))
    status, out = partner_audit(runs, 2, run_dir, capsys)
    assert status == 1
    assert "round 2 (ledger entry" in out and "the ledger holds your receipt of another " \
        "run" in out and "moved into this one" in out
    assert "round 2: omitted: your signed receipt of round 2" in out


def test_a_moved_receipt_of_an_earlier_version_is_caught_by_the_partner_alone(
        runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A receipt without the run binding (as earlier versions signed them) passes audit
    verify wherever it is put; the partner's record still knows which run it was."""
    run_dir = published(runs, tmp_path)
    partner = runs.pseudonym(2)
    donor = next(e for e in evil.entries(runs.a) if e["type"] == E.EXAMPLE_DP
                 and e["payload"]["partner"] == partner and e["payload"]["round"] == 2)
    state_file = runs.state_dir(2) / STATE_FILE
    saved = state_file.read_text()
    try:
        data = json.loads(saved)
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["key"]))
        old = {k: v for k, v in donor["payload"]["receipt"]["payload"].items()
               if k not in ("run", "update_sha256", "model_sha256")}
        unbound = sign_receipt(old, key).to_dict()
        # the partner's record of run a holds this unbound receipt (an earlier version)
        run_a = donor["payload"]["receipt"]["payload"]["run"]
        data["run_records"][run_a]["receipts"] = [
            unbound if r["payload"]["round"] == 2 else r
            for r in data["run_records"][run_a]["receipts"]]
        state_file.write_text(json.dumps(data))
        ledger = evil.entries(run_dir)
        at = next(i for i, e in enumerate(ledger) if e["type"] == E.EXAMPLE_DP
                  and e["payload"]["partner"] == partner and e["payload"]["round"] == 2)
        ledger[at]["payload"] = E.ExampleDpEvent.from_receipt(unbound).to_payload()
        evil.resign_from(run_dir, ledger, at)
        evil.restate_outputs(run_dir)
        assert verify_problems(run_dir) == []
        assert "1 of an earlier version, bound to no run" in verify_run(
            run_dir, pld=False).check("receipts").detail
        status, out = partner_audit(runs, 2, run_dir, capsys)
    finally:
        state_file.write_text(saved)
    assert status == 1
    assert f"the ledger holds your receipt of another run ({run_a[:16]}…), moved into " \
        "this one" in out


def test_forked_chain_fails_every_partners_audit(
        runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = published(runs, tmp_path)
    evil.fork(run_dir, 1)
    assert verify_problems(run_dir) == []
    for node in range(1, NODES + 1):
        status, out = partner_audit(runs, node, run_dir, capsys)
        assert status == 1
        assert "two different chains for one run: you countersigned entry" in out
        assert "in round 2; the published ledger's entry" in out


def test_a_countersignature_that_does_not_match_the_chain_fails_audit_verify(
        runs: Runs, tmp_path: Path) -> None:
    """A fork that keeps the partners' countersignatures of the chain they saw."""
    run_dir = published(runs, tmp_path)
    ledger = evil.entries(run_dir)
    at = next(i for i, e in enumerate(ledger) if e["type"] == E.ROUND_COMPLETED)
    ledger[at]["payload"]["accuracy"] = 1.0
    evil.resign(run_dir, ledger)
    chain = [p for p in verify_problems(run_dir) if p.startswith("[chain]")]
    # every countersignature of round 2 and 3 (heads at and after the edit) names it
    assert len(chain) == 2 * NODES, chain
    assert all("countersigned entry" in p and "with another hash than the chain's" in p
               for p in chain), chain


def test_a_run_the_partner_kept_no_record_of_fails_with_a_clear_message(
        runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    """A run folder of an earlier version (no partner records then), or another chain."""
    old = Path(__file__).parent / "data" / "run_v1_pld"
    status, out = partner_audit(runs, 1, old, capsys)
    assert status == 1
    assert "your node state has no record of run" in out


def test_missing_state_is_a_usage_error(tmp_path: Path, runs: Runs,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "partner", str(tmp_path / "nowhere"), str(runs.b)]) == 2
    assert "node_state.json" in capsys.readouterr().err
