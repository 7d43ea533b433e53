"""The run folder's other records against its ledger: what the partners' own node states
(simulation: `partners/*/node_state.json`) say they spent in this run, and what the
server's checkpoint says it completed.

Both are written by someone other than the ledger's append: a ledger cut back at a round
boundary (and re-signed, or simply truncated) still forms a valid chain, but the partners'
accountants and the last checkpoint remember the rounds it dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.audit.checks.base import CheckResult
from confide.audit.checks.loaded_run import LoadedRun
from confide.privacy import ledger_events as ev
from confide.privacy.accountant import Spend
from confide.privacy.receipts import pseudonym_of

PARTNERS_DIR = "partners"
NODE_STATE_FILE = "node_state.json"  # confide.clients.node_state.STATE_FILE (node side)
CHECKPOINT_DIR = "checkpoint"
SERVER_STATE_FILE = "server_state.json"


def partner_state_files(run_dir: Path) -> list[Path]:
    """The node states a simulation keeps in its run folder, one per virtual partner."""
    return sorted((run_dir / PARTNERS_DIR).glob(f"*/{NODE_STATE_FILE}"))


def check_partner_records(run: LoadedRun) -> CheckResult:
    """Every spend a partner's own node state records for this run is in the ledger, or
    still pending at the node (its receipt not yet acknowledged by the server): a spend
    the server acknowledged and the ledger no longer holds means the ledger was cut back."""
    c = CheckResult("partners")
    files = partner_state_files(run.run_dir)
    if not files:
        c.skipped, c.detail = True, f"no {PARTNERS_DIR}/*/{NODE_STATE_FILE} in the run folder"
        return c
    key = run.run_key
    recorded: dict[str, Counter[int]] = {}
    for _, e in run.events:
        if isinstance(e, ev.ExampleDpEvent):
            recorded.setdefault(e.partner, Counter())[e.round] += 1
    compared = 0
    for path in files:
        where = path.relative_to(run.run_dir)
        try:
            partner, spent, pending = _node_record(path, key)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # PayloadError too
            c.add(f"{where} cannot be read: {exc}")
            continue
        compared += 1
        missing = spent - recorded.get(partner, Counter()) - pending
        if missing:
            rounds = sorted(missing.elements())
            c.add(f"partner {partner}'s own record ({where}) holds spends of this run in "
                  f"round(s) {', '.join(map(str, rounds))} that the ledger lacks, although "
                  "the server had acknowledged them: the ledger was cut back or edited")
    c.detail = f"{compared} partner record(s) compared with the ledger"
    return c


def _node_record(path: Path, run_key: str | None
                 ) -> tuple[str, Counter[int], Counter[int]]:
    """(pseudonym, rounds it spent in this run, rounds of its receipts still pending)."""
    data = json.loads(path.read_text())
    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(str(data["key"])))
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    spent: Counter[int] = Counter(
        s.round for s in (Spend.from_json(x, "history entry")
                          for x in data["accountant"]["history"]) if s.run == run_key)
    pending: Counter[int] = Counter()
    for text in (data.get("pending_receipts") or {}).get(run_key or "", []):
        receipt: Any = json.loads(text)
        pending[int(receipt["payload"]["round"])] += 1
    return pseudonym_of(public), spent, pending


def check_checkpoint(run: LoadedRun) -> CheckResult:
    """The server's last checkpoint (checkpoint/server_state.json) is of a round the ledger
    completes (or, after a crash, of the round right after it, whose model_digest the
    ledger holds), and its weights are the model the ledger recorded for that round. (Its
    config digest is not compared: a resumed run may have moved its folder.)"""
    c = CheckResult("checkpoint")
    state_path = run.run_dir / CHECKPOINT_DIR / SERVER_STATE_FILE
    if not state_path.is_file():
        c.skipped, c.detail = True, f"no {CHECKPOINT_DIR}/{SERVER_STATE_FILE}"
        return c
    try:
        state = json.loads(state_path.read_text())
        round_ = int(state["round"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        c.add(f"{CHECKPOINT_DIR}/{SERVER_STATE_FILE} cannot be read: {exc}")
        return c
    completed = run.rounds.rounds_completed
    digests = [e for _, e in run.events if isinstance(e, ev.ModelDigest) and e.round == round_]
    if round_ > completed + 1 or (round_ == completed + 1 and not digests):
        c.add(f"the checkpoint is of round {round_}, but the ledger completes only "
              f"{completed} round(s): the ledger was cut back (or the checkpoint is "
              "another run's)")
        return c
    if round_ > 0:
        weights = run.run_dir / CHECKPOINT_DIR / str(state.get("weights", ""))
        if not weights.is_file():
            c.add(f"the checkpoint names {weights.name}, which is missing")
        elif not digests:
            c.add(f"the checkpoint is of round {round_}, for which the ledger has no "
                  "model_digest")
        elif ev.file_digest(weights) != digests[-1].sha256:
            c.add(f"{CHECKPOINT_DIR}/{weights.name} is not the model the ledger recorded "
                  f"for round {round_}")
    c.detail = f"round {round_}" + (" (the round after the last completed one: resume "
                                    "completes its record)" if round_ > completed else "")
    return c
