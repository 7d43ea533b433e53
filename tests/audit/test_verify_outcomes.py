"""The verdict's three outcomes: PASS only for a finished run whose outputs agree,
INCOMPLETE (exit 3) for a consistent record that ends before run_finished, FAIL for a
contradiction; every record the run folder holds is used (partners' node states, the
checkpoint, summary, metrics, model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.audit.verify import main, render_verdict, verify_run
from confide.privacy import ledger_events as ev
from confide.privacy.ledger import Ledger, save_public_key
from confide.run_layout import LEDGER_FILE, LEDGER_PUBLIC_KEY_FILE

from .conftest import CONFIG, DELTA, RunInfo, build_run


def _cut_back(run_dir: Path, after_round: int) -> None:
    """What a dishonest operator does to a finished run: the ledger cut after a round's
    round_completed (a valid chain prefix: nothing needs re-signing), metrics cut to
    match, summary.json and model/ deleted."""
    lines = (run_dir / LEDGER_FILE).read_text().splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines)
               if json.loads(line)["type"] == ev.ROUND_COMPLETED
               and json.loads(line)["payload"]["round"] == after_round)
    (run_dir / LEDGER_FILE).write_text("".join(lines[:end + 1]))
    rows = [r for r in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(r)["round"] <= after_round]
    (run_dir / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "model")


def test_a_finished_run_passes_with_exit_0(template_run: RunInfo,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    result = verify_run(template_run.dir, pld=False)
    assert result.verdict == "PASS" and result.finished and result.exit_status == 0
    assert main([str(template_run.dir)]) == 0
    assert "VERDICT: PASS (3 rounds" in capsys.readouterr().out


def test_a_cut_back_ledger_with_partner_records_fails(run: RunInfo,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    _cut_back(run.dir, 2)
    result = verify_run(run.dir, pld=False)
    assert result.verdict == "FAIL"
    partners = [str(p) for p in result.check("partners").problems]
    # partner 2 refused round 3: the two that trained in it remember it
    assert len(partners) == 2 and all("round(s) 3 that the ledger lacks" in p
                                      for p in partners), partners
    assert "the checkpoint is of round 3, but the ledger completes only 2" in str(
        result.check("checkpoint").problems[0])
    assert main([str(run.dir)]) == 1
    assert "VERDICT: FAIL" in capsys.readouterr().out


def test_a_cut_back_ledger_without_other_records_is_incomplete_not_pass(
        run: RunInfo, capsys: pytest.CaptureFixture[str]) -> None:
    _cut_back(run.dir, 2)
    shutil.rmtree(run.dir / "partners")
    shutil.rmtree(run.dir / "checkpoint")
    result = verify_run(run.dir, pld=False)
    assert result.ok and result.verdict == "INCOMPLETE" and result.exit_status == 3
    assert main([str(run.dir)]) == 3
    out = capsys.readouterr().out
    assert "VERDICT: INCOMPLETE (2 of 3 rounds recorded" in out
    assert "VERDICT: PASS" not in out
    assert main([str(run.dir), "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["verdict"] == "INCOMPLETE"


@pytest.mark.parametrize(("remove", "says"), [
    ("summary.json", "summary.json is missing, although the ledger records run_finished"),
    ("model", "model/weights.safetensors is missing, although the ledger records "
              "run_finished"),
    ("metrics.jsonl", "metrics.jsonl is missing, although the ledger completes 3 round(s)"),
])
def test_an_output_of_a_finished_run_deleted_fails(run: RunInfo, remove: str, says: str
                                                   ) -> None:
    path = run.dir / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    result = verify_run(run.dir, pld=False)
    assert result.verdict == "FAIL"
    assert says in [p.reason for p in result.problems], render_verdict(result)


def test_a_node_receipt_still_pending_is_not_a_cut_back(run: RunInfo) -> None:
    """A spend whose receipt the node still holds as unacknowledged (the server never
    recorded it: a lost reply) is no evidence of a cut-back ledger."""
    from .conftest import write_node_state  # noqa: F401  (the layout it writes)

    path = sorted(run.dir.glob("partners/*/node_state.json"))[0]
    state = json.loads(path.read_text())
    history = state["accountant"]["history"]
    run_key = history[-1]["run"]
    history.append({**history[-1], "round": 4})
    state["pending_receipts"] = {run_key: [json.dumps({"payload": {"round": 4}})]}
    path.write_text(json.dumps(state))
    assert verify_run(run.dir, pld=False).check("partners").status == "PASS"


def test_a_run_refused_in_round_one_states_its_rounds(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """Every partner refused round 1: no round completed, and verify says so (it said
    'rounds 1..0'); the record is consistent but not a finished run."""
    key = Ed25519PrivateKey.generate()
    led = Ledger.create(tmp_path / LEDGER_FILE, key)
    save_public_key(key, tmp_path / LEDGER_PUBLIC_KEY_FILE)
    from confide.config import config_digest

    led.append(ev.RunStarted(config=dict(CONFIG), config_digest=config_digest(CONFIG),
                             code_version="test", ledger_public_key=led.public_key_hex,
                             delta=DELTA))
    led.append(ev.RoundConfigured(round=1, sampled=["node-1", "node-2"]))
    for partner in ("p-000000000001", "p-000000000002"):
        led.append(ev.BudgetRefusal(round=1, partner=partner, spent_epsilon=0.0,
                                    max_epsilon=1.0, would_be_epsilon=2.0))
    led.close()
    result = verify_run(tmp_path, pld=False)
    detail = result.check("completeness").detail
    assert detail.startswith("no round completed; round 1 configured, not completed "
                             "(2 budget refusal(s))"), detail
    assert "1..0" not in render_verdict(result)
    assert result.verdict == "INCOMPLETE"
    assert main([str(tmp_path)]) == 3
    # the report lists the partners that only refused, with the rounds they refused
    from confide.audit.report import RunReport

    rows = RunReport(tmp_path, result)._epsilon_rows()
    assert [(r[0], r[-1]) for r in rows] == [("p-000000000001", "1"), ("p-000000000002", "1")]


def test_verify_on_a_folder_that_is_not_a_run_says_so(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not a Confide run folder (it has no ledger.jsonl)" in err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'} is missing" in capsys.readouterr().err
    assert main([str(tmp_path / "notes.txt")]) == 2
    assert "is not a Confide run folder: it is a file" in capsys.readouterr().err


def test_an_earlier_run_no_refusal_names_fails(template_run: RunInfo, tmp_path: Path
                                               ) -> None:
    """`--earlier-run` with a folder that no signed refusal of this run names: the
    auditor compared nothing, and the audit must not pass as if it had."""
    other = build_run(tmp_path / "other")
    result = verify_run(template_run.dir, pld=False, earlier=[other.dir])
    cross = result.check("earlier-runs")
    assert cross.status == "FAIL" and result.verdict == "FAIL"
    assert f"earlier run {other.dir}: no signed budget refusal of this run names it" in \
        cross.problems[0].reason


def test_a_large_delta_override_is_stated_in_every_guarantee_line(run: RunInfo) -> None:
    """A run started with allow-large-delta: verify, the report and the console's final
    table each say so where they state the guarantee."""
    from rich.console import Console

    from confide.audit.report import write_report
    from confide.audit.verify import LARGE_DELTA_NOTE
    from confide.config import config_digest
    from confide.simulation.runner import final_table

    from .test_verify import _lines, _resign, _write

    entries = _lines(run)
    config = {**entries[0]["payload"]["config"], "allow-large-delta": True}
    entries[0]["payload"]["config"] = config
    entries[0]["payload"]["config_digest"] = config_digest(config)
    _resign(entries, run.server_key)
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert result.verdict == "PASS" and result.large_delta
    assert LARGE_DELTA_NOTE in render_verdict(result)
    _, md = write_report(run.dir, result=result)
    assert LARGE_DELTA_NOTE in md.read_text()
    summary = json.loads((run.dir / "summary.json").read_text())
    summary["privacy"]["allow_large_delta"] = True
    console = Console(width=400, record=True)
    console.print(final_table(run.dir, summary))
    assert LARGE_DELTA_NOTE in " ".join(console.export_text().split())
