"""`confide audit partner`: a partner checks the operator's published run folder against its
own record (its node_state.json), and catches what a server holding the ledger key can hide
from `confide audit verify`: an omitted round with a restated epsilon, a receipt moved from
another run, a forked chain.

Two real runs (tiny model, real ClientApp through the in-process grid) on the same three
partners, whose states live on disk as deployed partners' do; the malicious server is
scripted in tests/audit/malicious_server.py."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from confide.audit.verify import verify_run
from confide.clients.node_state import STATE_FILE, NodeState
from confide.config import build_config
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


def test_omitted_last_round_with_restated_epsilon_passes_audit_verify(
        runs: Runs, tmp_path: Path) -> None:
    run_dir = published(runs, tmp_path)
    victim = runs.pseudonym(1)
    evil.omit_round(run_dir, victim, ROUNDS)
    assert verify_problems(run_dir) == []


def test_receipt_moved_from_another_run(runs: Runs, tmp_path: Path) -> None:
    run_dir = published(runs, tmp_path)
    evil.move_receipt(run_dir, runs.a, runs.pseudonym(2), 2)
    assert verify_problems(run_dir) == []


def test_forked_chain_passes_audit_verify(runs: Runs, tmp_path: Path) -> None:
    run_dir = published(runs, tmp_path)
    evil.fork(run_dir, 1)
    assert verify_problems(run_dir) == []
