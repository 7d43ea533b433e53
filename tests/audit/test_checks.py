"""Each check of `confide audit verify` alone: on a run altered in one way, the check run by
itself on the loaded run names the problem, exactly as it does inside verify_run; the
checks share no state, so their order does not matter."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest

from confide.audit.checks.base import CheckResult
from confide.audit.checks.loaded_run import load_run
from confide.audit.verify import CHECKS, run_checks, verify_run
from confide.privacy.ledger_events import BUDGET_REFUSAL, EXAMPLE_DP, MODEL_DIGEST
from confide.run_layout import METRICS_FILE, MODEL_DIR, SUMMARY_FILE, WEIGHTS_FILE

from .conftest import RunInfo
from .test_verify import _lines, _resign, _write


def _first(entries: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    return next(e for e in entries if e["type"] == type_)


def _edit_ledger(run: RunInfo, edit: Callable[[list[dict[str, Any]]], None], *,
                 resign: bool = True) -> None:
    """Change the ledger's entries; re-signed with the server's key unless `resign` is
    False, so that only the check under test has something to say about the chain."""
    entries = _lines(run)
    edit(entries)
    if resign:
        _resign(entries, run.server_key)
    _write(run, entries)


def _edit_json(run: RunInfo, name: str, edit: Callable[[Any], None]) -> None:
    path = run.dir / name
    if name.endswith(".jsonl"):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        edit(rows)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))


def _payload_edit(entries: list[dict[str, Any]]) -> None:
    entries[3]["payload"]["steps"] = 99  # not re-signed: the hash no longer matches


def _wrong_type(entries: list[dict[str, Any]]) -> None:
    _first(entries, MODEL_DIGEST)["payload"]["sha256"] = 5


def _swap_rounds(entries: list[dict[str, Any]]) -> None:
    i = next(k for k, e in enumerate(entries) if e["type"] == "round_configured"
             and e["payload"]["round"] == 2)
    entries[i - 1], entries[i] = entries[i], entries[i - 1]


def _drop_model_digest(entries: list[dict[str, Any]]) -> None:
    entries.remove(next(e for e in entries if e["type"] == MODEL_DIGEST
                        and e["payload"]["round"] == 2))


def _drop_receipt(entries: list[dict[str, Any]]) -> None:
    del _first(entries, EXAMPLE_DP)["payload"]["receipt"]


def _refusal_below_its_cap(entries: list[dict[str, Any]]) -> None:
    refusal = _first(entries, BUDGET_REFUSAL)["payload"]  # unsigned: only the replay reads it
    refusal["would_be_epsilon"] = refusal["max_epsilon"] / 2


def _summary_epsilon(summary: dict[str, Any]) -> None:
    eps = summary["privacy"]["example_level"]
    first = sorted(eps)[0]
    eps[first] *= 1.02


def _metrics_aggregated(rows: list[dict[str, Any]]) -> None:
    rows[1]["num_clients_aggregated"] = 9


def _node_spent_more(run: RunInfo) -> None:
    """A partner's own record holds a round of this run the ledger lacks (acknowledged)."""
    path = sorted(run.dir.glob("partners/*/node_state.json"))[0]
    state = json.loads(path.read_text())
    history = state["accountant"]["history"]
    history.append({**history[-1], "round": 9})
    path.write_text(json.dumps(state))


def _checkpoint_ahead(state: dict[str, Any]) -> None:
    state["round"] = 5


# check -> (how to alter a consistent run, what its first problem says)
ALTERATIONS: dict[str, tuple[Callable[[RunInfo], None], str]] = {
    "chain": (lambda r: _edit_ledger(r, _payload_edit, resign=False), "entry 3: "),
    "payloads": (lambda r: _edit_ledger(r, _wrong_type), "sha256"),
    "ordering": (lambda r: _edit_ledger(r, _swap_rounds),
                 "round 2 configured before round 1 completed"),
    "completeness": (lambda r: _edit_ledger(r, _drop_model_digest),
                     "round 2 has 0 model_digest entries"),
    "receipts": (lambda r: _edit_ledger(r, _drop_receipt), "has no receipt"),
    "replay": (lambda r: _edit_ledger(r, _refusal_below_its_cap), "budget refusal of"),
    "summary": (lambda r: _edit_json(r, SUMMARY_FILE, _summary_epsilon),
                "privacy.example_level["),
    "metrics": (lambda r: _edit_json(r, METRICS_FILE, _metrics_aggregated),
                "round 2: num_clients_aggregated = 9"),
    "model": (lambda r: (r.dir / MODEL_DIR / WEIGHTS_FILE).write_bytes(b"swapped"),
              "has SHA-256"),
    "partners": (_node_spent_more, "holds spends of this run in round(s) 9 that the "
                 "ledger lacks"),
    "checkpoint": (lambda r: _edit_json(r, "checkpoint/server_state.json", _checkpoint_ahead),
                   "the checkpoint is of round 5, but the ledger completes only 3"),
}


def test_every_check_has_an_alteration() -> None:
    assert set(ALTERATIONS) == set(CHECKS)


@pytest.mark.parametrize("name", list(ALTERATIONS))
def test_each_check_alone_names_its_problem(run: RunInfo, name: str) -> None:
    alter, expected = ALTERATIONS[name]
    alter(run)
    alone = CHECKS[name](load_run(run.dir, pld=False))
    assert alone.name == name and alone.status == "FAIL"
    assert expected in str(alone.problems[0]), [str(p) for p in alone.problems]
    # the same findings inside the whole verification: nothing came from another check
    within = verify_run(run.dir, pld=False).check(name)
    assert within.problems == alone.problems and within.detail == alone.detail


def test_a_consistent_run_passes_every_check_alone(template_run: RunInfo) -> None:
    run = load_run(template_run.dir, pld=False)
    for name, check in CHECKS.items():
        result = check(run)
        assert isinstance(result, CheckResult) and result.name == name
        assert result.status == "PASS", (name, [str(p) for p in result.problems])


def test_checks_share_no_state_their_order_does_not_matter(run: RunInfo) -> None:
    for alter, _ in ALTERATIONS.values():  # many problems at once
        alter(run)
    forward = run_checks(load_run(run.dir, pld=False))
    backward = [check(load_run(run.dir, pld=False)) for check in reversed(CHECKS.values())]
    assert forward == backward[::-1]
    assert sum(1 for c in forward if c.problems) >= len(CHECKS) - 1  # the chain re-signed


def test_the_loaded_run_cannot_be_changed_by_a_check(template_run: RunInfo) -> None:
    run = load_run(template_run.dir, pld=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.summary = None  # type: ignore[misc]
    assert run.rounds is run.rounds and run.replay is run.replay  # derived once


def test_without_a_ledger_only_the_chain_check_speaks(run: RunInfo) -> None:
    (run.dir / "ledger.jsonl").unlink()
    results = run_checks(load_run(run.dir))
    assert [c.name for c in results] == list(CHECKS)
    assert "does not exist" in str(results[0].problems[0])
    assert not any(c.problems for c in results[1:])
