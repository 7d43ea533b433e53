"""`confide audit partner STATE_DIR RUN_DIR`: a partner checks the operator's published run
folder against its own record of the run.

`confide audit verify` checks a run folder on its own, but the server holds the ledger key:
it can delete a partner's receipt, list the partner as dropped, restate its epsilon and
re-sign the chain, and the folder verifies. The partner's node keeps what the server cannot
forge (its `node_state.json`): every receipt it signed in the run, every chain head it
countersigned, and its accountant's history. This audit compares them with the folder:

  chain     the published ledger verifies (hashes, links, the server's signatures)
  receipts  every receipt the partner signed in this run is in the ledger (else: an omitted
            round); every receipt the ledger holds in its name is one it signed for this
            run (else: a receipt moved from another run, or one it never signed)
  epsilon   the ledger's last claim, summary.json and metrics.jsonl state the epsilon the
            partner's own accountant computes for this run (else: a restated epsilon)
  heads     every chain head the partner countersigned is an entry of the published chain,
            with the same hash (else: two different chains for one run)
  models    each round it trained in started from the model the ledger published for the
            round before (else: the server sent it another model than it published)

Exit status 0 (PASS), 1 (FAIL), 2 (nothing to compare: a file missing or unreadable).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.audit.checks.base import CheckResult
from confide.audit.checks.integrity import check_chain
from confide.audit.checks.loaded_run import LoadedRun, load_run
from confide.errors import ConfideError
from confide.privacy import ledger_events as ev
from confide.privacy.accountant import PartnerAccountant
from confide.privacy.json_fields import PayloadError
from confide.privacy.receipts import (
    PartnerRunRecord,
    ReceiptError,
    pseudonym_of,
    receipt_binding,
)
from confide.run_layout import LEDGER_FILE

NODE_STATE_FILE = "node_state.json"  # confide.clients.node_state.STATE_FILE (node side)
SAME = 1e-6  # relative: the partner's own epsilon and a published one are the same number


class PartnerStateError(ConfideError, ValueError):
    """The partner's node state cannot be read or holds nothing of the run."""


@dataclass(frozen=True)
class PartnerState:
    """What the audit reads of a node's state file: never the private key itself, only the
    pseudonym it derives."""

    partner: str
    accountant: PartnerAccountant
    records: dict[str, PartnerRunRecord]  # run key -> the node's record of that run


def read_partner_state(path: Path) -> PartnerState:
    """A node's state (its `node_state.json`, or the folder holding it)."""
    file = path / NODE_STATE_FILE if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(str(data["key"])))
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        accountant = PartnerAccountant.from_state_dict(data["accountant"])
        records = {str(k): PartnerRunRecord.from_json(v)
                   for k, v in (data.get("run_records") or {}).items()}
    except FileNotFoundError:
        raise PartnerStateError(f"{file} does not exist (give the node's state-dir or its "
                                f"{NODE_STATE_FILE})") from None
    except (OSError, ValueError, KeyError, TypeError, PayloadError) as exc:
        raise PartnerStateError(f"{file} is not a readable node state: {exc}") from None
    return PartnerState(pseudonym_of(public), accountant, records)


@dataclass
class PartnerAudit:
    """The comparison's findings, check by check, and whom and what it compared."""

    run_dir: Path
    partner: str
    run_key: str | None
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(not c.problems for c in self.checks)

    @property
    def problems(self) -> list[str]:
        return [p.reason for c in self.checks for p in c.problems]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "verdict": "PASS" if self.ok else "FAIL",
                "run_dir": str(self.run_dir), "partner": self.partner, "run": self.run_key,
                "checks": {c.name: {"status": c.status, "detail": c.detail,
                                    "problems": [p.reason for p in c.problems]}
                           for c in self.checks}}


def audit_partner(state: PartnerState | Path, run_dir: Path | str) -> PartnerAudit:
    """Compare a partner's own record with a published run folder (see the module doc)."""
    if not isinstance(state, PartnerState):
        state = read_partner_state(Path(state))
    run = load_run(run_dir)
    out = PartnerAudit(run.run_dir, state.partner, run.run_key)
    chain = check_chain(run)
    out.checks.append(chain)
    record = state.records.get(run.run_key or "")
    if record is None:
        missing = CheckResult("record")
        missing.add(f"your node state has no record of run {_short(run.run_key)} (the "
                    "ledger key in its run_started): your node took no part in it, kept "
                    "no record (a version before partner records), or the run is older "
                    "than the runs it keeps; a ledger started under another key is "
                    "another chain than the one your node saw")
        out.checks.append(missing)
        return out
    out.checks += [_receipts(run, state, record), _epsilon(run, state),
                   _heads(run, record), _models(run, record)]
    return out


# -- the checks --------------------------------------------------------------------------

def _signature(receipt: Mapping[str, Any]) -> str:
    return str(receipt.get("signature", ""))


def _receipts(run: LoadedRun, state: PartnerState, record: PartnerRunRecord) -> CheckResult:
    c = CheckResult("receipts")
    mine = {_signature(r): r for r in record.receipts}
    others = {_signature(r): key for key, rec in state.records.items()
              if key != run.run_key for r in rec.receipts}
    held: set[str] = set()
    for i, e in run.events:
        if isinstance(e, ev.ExampleDpEvent) and e.partner == state.partner:
            signature = _signature(e.receipt or {})
            held.add(signature)
            if signature in mine:
                continue
            where = f"round {e.round} (ledger entry {i})"
            bound = _binding(e.receipt or {})
            if signature in others:
                c.add(f"{where}: the ledger holds your receipt of another run "
                      f"({_short(others[signature])}), moved into this one")
            elif bound is not None and bound.run != run.run_key:
                c.add(f"{where}: the ledger holds a receipt of yours signed for another run "
                      f"({_short(bound.run)}), moved into this one")
            else:
                c.add(f"{where}: the ledger holds a receipt in your name that your node "
                      "did not sign in this run")
        elif isinstance(e, ev.BudgetRefusal) and e.partner == state.partner \
                and e.receipt is not None:
            run_named = (e.receipt.get("payload") or {}).get("run")
            if run_named != run.run_key:
                c.add(f"round {e.round} (ledger entry {i}): the ledger holds your budget "
                      f"refusal of another run ({_short(str(run_named))}), moved into this "
                      "one")
    dropped = {r: set(d.dropped) for r in range(1, run.rounds.rounds_completed + 1)
               if (d := run.rounds.completed(r)) is not None}
    for signature, receipt in mine.items():
        if signature in held:
            continue
        pay = receipt.get("payload") or {}
        r = int(pay.get("round", 0))
        bound = _binding(receipt)
        what = f"epsilon {pay.get('epsilon')}"
        if bound is not None and bound.update_sha256 is not None:
            what += f", update sha256 {bound.update_sha256[:16]}…"
        text = (f"round {r}: omitted: your signed receipt of round {r} ({what}) is not in "
                "the published ledger")
        if state.partner in dropped.get(r, set()):
            text += f", which lists you as dropped in round {r}"
        c.add(text)
    rounds = sorted(int((r.get("payload") or {}).get("round", 0)) for r in mine.values())
    c.detail = (f"{len(mine)} receipt(s) you signed in this run are in the ledger (rounds "
                f"{', '.join(map(str, rounds)) or '-'}); it holds none in your name you did "
                "not sign for this run")
    return c


def _epsilon(run: LoadedRun, state: PartnerState) -> CheckResult:
    c = CheckResult("epsilon")
    key = run.run_key or ""
    spent = any(s.run == key for s in state.accountant.history)
    own = state.accountant.epsilon(key) if spent else 0.0
    stated: list[tuple[str, Any]] = []
    claims = [e.epsilon_claimed for _, e in run.events
              if isinstance(e, ev.ExampleDpEvent) and e.partner == state.partner]
    stated.append(("the ledger's last claim", claims[-1] if claims else None))
    if run.summary is not None:
        level = (run.summary.get("privacy") or {}).get("example_level") or {}
        stated.append(("summary.json", level.get(state.partner)))
    rows = []
    for line in (run.metrics_text or "").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # not a row: `confide audit verify` names it
    rows = [r for r in rows if isinstance(r, dict)]
    if rows:
        stated.append(("metrics.jsonl's last round",
                       (rows[-1].get("epsilon_example_level") or {}).get(state.partner)))
    for where, value in stated:
        if value is None and not spent:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool) or \
                abs(float(value) - own) > SAME * max(abs(own), 1e-12):
            c.add(f"restated epsilon: {where} states {value!r} for you, your own "
                  f"accountant {own:.6g} for this run")
    c.detail = (f"{own:.6g} for this run, as your accountant says "
                f"({', '.join(w for w, _ in stated)})" if spent
                else "you spent nothing in this run")
    return c


def _heads(run: LoadedRun, record: PartnerRunRecord) -> CheckResult:
    c = CheckResult("heads")
    n = len(run.lines)
    for head in record.heads:
        seen = f"you countersigned entry {head.index} (hash {head.hash[:16]}…) in round " \
               f"{head.round}"
        if head.index >= n:
            c.add(f"two different chains for one run: {seen}, but the published ledger "
                  f"ends at entry {n - 1}")
            continue
        entry = run.lines[head.index].entry or {}
        if entry.get("entry_hash") != head.hash:
            c.add(f"two different chains for one run: {seen}; the published ledger's entry "
                  f"{head.index} has hash {str(entry.get('entry_hash'))[:16]}…")
    c.detail = (f"{len(record.heads)} chain head(s) you countersigned are entries of the "
                f"published chain ({', '.join(str(h.index) for h in record.heads) or '-'})")
    return c


def _models(run: LoadedRun, record: PartnerRunRecord) -> CheckResult:
    c = CheckResult("models")
    published: dict[int, str] = {}  # round -> its final model_digest
    for _, e in run.events:
        if isinstance(e, ev.ModelDigest):
            published[e.round] = e.sha256
    compared = 0
    for receipt in record.receipts:
        bound = _binding(receipt)
        r = int((receipt.get("payload") or {}).get("round", 0))
        if bound is None or r <= 1 or (r - 1) not in published:
            continue  # round 1 trains from the initial model, which the ledger does not hold
        compared += 1
        if bound.model_sha256 != published[r - 1]:
            c.add(f"round {r}: you trained from model {bound.model_sha256[:16]}…, the "
                  f"published model after round {r - 1} is {published[r - 1][:16]}…: the "
                  "server sent you another model than it published")
    unbound = sum(1 for r in record.receipts if _binding(r) is None)
    c.detail = f"{compared} round(s) trained from the model the ledger published before"
    if unbound:
        c.detail += f"; {unbound} receipt(s) of an earlier version name no model"
    return c


def _binding(receipt: Mapping[str, Any]) -> Any:
    try:
        return receipt_binding(receipt)
    except ReceiptError:
        return None


def _short(key: str | None) -> str:
    return "(none)" if not key else f"{key[:16]}…"


# -- output and command line -------------------------------------------------------------

def render(result: PartnerAudit) -> str:
    out = [f"Confide partner audit of {result.run_dir}",
           f"  partner {result.partner}, run {_short(result.run_key)}", ""]
    width = max(len(c.name) for c in result.checks)
    for c in result.checks:
        lines = [p.reason for p in c.problems] or [c.detail]
        out.append(f"  {c.name:<{width}}  {c.status:<4}  {lines[0]}")
        out += [f"  {'':<{width}}        {line}" for line in lines[1:]]
    out.append("")
    if result.ok:
        out.append("VERDICT: PASS (the published run agrees with your own record)")
    else:
        out.append(f"VERDICT: FAIL, {result.problems[0]}")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("state_dir", type=Path,
                        help=f"your node's state-dir (or its {NODE_STATE_FILE})")
    parser.add_argument("run_dir", type=Path, help="the run folder the operator published")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """`confide audit partner` with parsed options (see add_arguments)."""
    if not (args.run_dir / LEDGER_FILE).is_file():
        print(f"error: {args.run_dir / LEDGER_FILE} does not exist", file=sys.stderr)
        return 2
    try:
        state = read_partner_state(args.state_dir)
    except PartnerStateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = audit_partner(state, args.run_dir)
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="confide audit partner",
        description="Compare your node's own record with a published run folder.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
