"""A partner that refuses because of budget spent in an *earlier* run.

Two runs with the same (deployment-style) partner nodes, in process: run A spends, run B
has one partner refuse round 1 for its lifetime spend. The refusal is signed by the
partner and states that lifetime spend; `audit verify` passes run B, and fails it when the
server alters the signed numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.audit.verify import verify_run
from confide.config import build_config
from confide.privacy.ledger import Ledger
from confide.privacy.ledger_events import parse_payload
from confide.run_layout import LEDGER_FILE
from confide.server.federation import Federation
from confide.server.run_folder import RunFolder
from tests.inprocess import InProcessGrid

TINY = {"model": "tiny", "clients": 2, "rounds": 1, "max-length": 16, "num-labels": 2,
        "noise-multiplier": 1.1, "batch-size": 16, "physical-batch-size": 16,
        "local-epochs": 0.04, "preflight": "off"}


SHARED = {**TINY, "clients": 3, "secure-aggregation": True, "example-dp-noise": "shared",
          "local-epochs": 1.0, "noise-multiplier": 3.0}


def run(out: Path, nodes: Path, settings: dict | None = None, **node_caps: float) -> dict:
    cfg = settings or TINY
    grid = InProcessGrid(int(cfg["clients"]), state_root=nodes)  # type: ignore[call-overload]
    for node, cap in node_caps.items():
        grid.contexts[int(node[1:])].node_config["max-epsilon"] = cap
    return Federation.open(grid, build_config({**cfg, "out": str(out)}), out).run()


def entries(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / LEDGER_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("multirun")
    first = run(root / "a", root / "nodes")
    spent = max(first["privacy"]["example_level"].values())
    # partner 1 lowers its own cap below what a second round would cost: it refuses in
    # run B although run B's ledger records no spend of it at all
    run(root / "b", root / "nodes", n1=spent * 1.05)
    return root / "a", root / "b"


def test_refusal_for_an_earlier_runs_spend_verifies(two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    refusals = [e for e in entries(b) if e["type"] == "budget_refusal"]
    assert len(refusals) == 1
    payload = refusals[0]["payload"]
    signed = payload["receipt"]["payload"]
    run_a_key = entries(a)[0]["payload"]["ledger_public_key"]
    assert payload["spent_epsilon"] > 0 and [e["run"] for e in signed["lifetime_events"]] \
        == [run_a_key], "the partner states run A's spend as its lifetime spend"
    result = verify_run(b)
    assert result.ok, [str(p) for p in result.problems]
    assert verify_run(a).ok


def _resign(out: Path, edit) -> None:
    """Rewrite the ledger with the run's own key (what a dishonest server could do). The
    partners' countersignatures of the chain they saw no longer fit the rewritten one, and
    the server cannot re-sign them: it leaves them out."""
    old = entries(out)
    key = RunFolder(out).ledger_signing_key()
    (out / LEDGER_FILE).unlink()
    ledger = Ledger.create(out / LEDGER_FILE, key)
    for e in old:
        if e["type"] != "head_countersigned":
            ledger.append(parse_payload(e["type"], edit(e)))
    ledger.close()


def test_server_altering_the_signed_refusal_fails_the_audit(two_runs, tmp_path) -> None:
    import shutil

    _, b = two_runs
    copy = tmp_path / "b"
    shutil.copytree(b, copy)

    def lower_spend(e: dict) -> dict:
        if e["type"] == "budget_refusal":
            return {**e["payload"], "spent_epsilon": 0.0}
        return e["payload"]

    _resign(copy, lower_spend)
    result = verify_run(copy)
    assert not result.ok
    assert "signed refusal" in str(result.first_problem)


# a large sigma: the audit's PRV replay must not pass Opacus' notice on to the auditor
@pytest.mark.filterwarnings("error:Optimal order is the:UserWarning")
def test_shared_noise_refusal_is_signed_and_verifies(tmp_path: Path) -> None:
    """The shared-noise round refuses like the local one: signed, lifetime spend stated."""
    first = run(tmp_path / "a", tmp_path / "nodes", SHARED)
    spent = max(first["privacy"]["example_level"].values())
    run(tmp_path / "b", tmp_path / "nodes", SHARED, n1=spent * 1.05)
    refusals = [e for e in entries(tmp_path / "b") if e["type"] == "budget_refusal"]
    assert len(refusals) == 1 and refusals[0]["payload"]["receipt"] is not None
    result = verify_run(tmp_path / "b")
    assert result.ok, [str(p) for p in result.problems]


def test_refusal_compared_with_the_earlier_run_folder(two_runs: tuple[Path, Path],
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """With run A's folder the auditor compares the lifetime spend partner 1 signed in
    run B with what run A's ledger records of it: equal here, so both verify."""
    import shutil

    from confide.cli import main

    a, b = two_runs
    result = verify_run(b, earlier=[a])
    cross = result.check("earlier-runs")
    assert result.ok and cross.status == "PASS", [str(p) for p in result.problems]
    assert cross.detail.startswith("1 signed refusal(s) compared with 1 earlier run(s)")
    # a single-run audit has no such row
    assert "earlier-runs" not in [c.name for c in verify_run(b).checks]
    assert main(["audit", "verify", str(b), "--earlier-run", str(a)]) == 0
    assert "earlier-runs" in capsys.readouterr().out
    assert main(["audit", "verify", str(b), "--earlier-run", str(tmp_path / "none")]) == 2
    assert "--earlier-run" in capsys.readouterr().err

    # run A's server records partner 1 as having run one more step than the partner
    # states (re-signed with run A's own key, so run A's chain holds): the comparison
    # names both sides of the difference
    partner = next(e for e in entries(b) if e["type"] == "budget_refusal")["payload"]["partner"]
    altered = tmp_path / "a"
    shutil.copytree(a, altered)

    def one_more_step(e: dict) -> dict:
        if e["type"] == "example_dp" and e["payload"]["partner"] == partner:
            return {**e["payload"], "steps": e["payload"]["steps"] + 1}
        return e["payload"]

    _resign(altered, one_more_step)
    cross = verify_run(b, earlier=[altered]).check("earlier-runs")
    reasons = [p.reason for p in cross.problems]
    assert any("leaves out round 1 of the earlier run" in r for r in reasons), reasons
    assert any("that the run's ledger does not record" in r for r in reasons), reasons
    # the run itself given as its own earlier run is named, not compared
    assert "is this run itself" in str(verify_run(b, earlier=[b]).check("earlier-runs")
                                       .problems[0])
