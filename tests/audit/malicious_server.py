"""A scripted malicious server (tests only): it holds the run's ledger key, rewrites the
published run folder after the run, and re-signs the chain, so that every signature, hash
and link verifies again. What it changes, `confide audit verify` cannot see on its own; the
partners' own records (`confide audit partner`) are what must catch it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from confide.audit.checks.loaded_run import load_run
from confide.audit.checks.outputs import replayed_epsilons_per_round
from confide.privacy import ledger_events as E
from confide.privacy.ledger import GENESIS_HASH, entry_hash_of, load_private_key
from confide.run_layout import canonical_json

Entry = dict[str, Any]


def entries(run_dir: Path) -> list[Entry]:
    return [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines()]


def resign(run_dir: Path, ledger: list[Entry]) -> None:
    """Write `ledger` re-indexed, re-chained and re-signed with the run's own key."""
    key = load_private_key(run_dir / "checkpoint" / "ledger_key.pem")
    prev = GENESIS_HASH
    for index, entry in enumerate(ledger):
        entry["index"], entry["prev_hash"] = index, prev
        entry["entry_hash"] = entry_hash_of(entry)
        entry["signature"] = key.sign(bytes.fromhex(entry["entry_hash"])).hex()
        prev = entry["entry_hash"]
    (run_dir / "ledger.jsonl").write_bytes(b"".join(canonical_json(e) + b"\n" for e in ledger))


def resign_from(run_dir: Path, ledger: list[Entry], changed_at: int) -> None:
    """Re-sign a ledger edited from entry `changed_at` on, leaving out the partners'
    countersignatures of entries from there on (they no longer name an entry of the
    rewritten chain, and the server cannot re-sign them; those of earlier entries still
    verify and stay)."""
    resign(run_dir, [e for e in ledger if not (e["type"] == "head_countersigned"
                                               and e["payload"]["index"] >= changed_at)])


def restate_outputs(run_dir: Path) -> None:
    """summary.json and metrics.jsonl rewritten to what the (rewritten) ledger replays to:
    the run's published epsilons then agree with its ledger again."""
    run = load_run(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    priv = summary["privacy"]
    priv["example_level"] = {p: r.final for p, r in run.replay.example.items()}
    priv["example_level_rdp"] = {p: r.final_rdp for p, r in run.replay.example.items()}
    for row in summary.get("partners", []):
        rep = run.replay.example.get(row["partner"])
        if rep is not None:
            row["epsilon"], row["epsilon_rdp"] = rep.final, rep.final_rdp
    (run_dir / "summary.json").write_text(json.dumps(summary))
    per_round = replayed_epsilons_per_round(run)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        eps, _ = per_round[row["round"]]
        row["epsilon_example_level"] = dict(eps)
        done = run.rounds.completed(row["round"])
        if done is not None:
            row["num_clients_aggregated"] = len(done.aggregated)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _partner_entries_of_round(entry: Entry, partner: str, round_: int) -> bool:
    payload = entry["payload"]
    return payload.get("partner") == partner and (
        payload.get("recorded_in_round") or payload.get("round")) == round_ and \
        entry["type"] != E.ROUND_COMPLETED


def omit_round(run_dir: Path, partner: str, round_: int) -> None:
    """Delete the partner's receipt of `round_` (and whatever else it sent that round),
    list it as dropped in that round, restate its epsilon everywhere and re-sign."""
    ledger = [e for e in entries(run_dir) if not _partner_entries_of_round(e, partner, round_)]
    for e in ledger:
        if e["type"] == E.ROUND_COMPLETED and e["payload"]["round"] == round_:
            done = e["payload"]
            done["replied"] = [p for p in done["replied"] if p != partner]
            done["aggregated"] = [p for p in done["aggregated"] if p != partner]
            done["dropped"] = sorted({*done["dropped"], partner})
    resign(run_dir, ledger)
    restate_outputs(run_dir)


def move_receipt(run_dir: Path, other_run: Path, partner: str, round_: int) -> None:
    """Replace the partner's receipt of `round_` with its receipt of the same round of
    another run (validly signed by the partner, same round, same numbers)."""
    donor = next(e for e in entries(other_run) if e["type"] == E.EXAMPLE_DP
                 and e["payload"]["partner"] == partner and e["payload"]["round"] == round_)
    ledger = entries(run_dir)
    for e in ledger:
        if e["type"] == E.EXAMPLE_DP and e["payload"]["partner"] == partner \
                and e["payload"]["round"] == round_:
            e["payload"] = copy.deepcopy(donor["payload"])
    resign(run_dir, ledger)
    restate_outputs(run_dir)


def fork(run_dir: Path, round_: int) -> None:
    """Publish another chain than the one the partners saw: round `round_`'s recorded
    accuracy changed and everything after it re-signed; the partners' countersignatures of
    entries from there on no longer name an entry of the published chain, so they are
    left out (those of earlier entries still verify and stay)."""
    ledger = entries(run_dir)
    at = next(i for i, e in enumerate(ledger) if e["type"] == E.ROUND_COMPLETED
              and e["payload"]["round"] == round_)
    ledger[at]["payload"]["accuracy"] = 1.0
    resign_from(run_dir, ledger, at)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row["round"] == round_:
            row["accuracy"] = 1.0
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if round_ == max(r["round"] for r in rows):
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["final_metrics"]["accuracy"] = 1.0
        (run_dir / "summary.json").write_text(json.dumps(summary))
