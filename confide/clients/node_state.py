"""What a partner node remembers between rounds: its accountant, its node key, its pseudonym.

In simulation the state lives in the node's Flower `Context.state`; in deployment (node
config `state-dir`) it is also written atomically to the partner's own disk, and the disk
copy wins on restart, so a restarted node never forgets spent budget.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context

from confide import wire as W
from confide.clients.state_location import STATE_FILE as STATE_FILE  # re-exported
from confide.clients.state_location import (
    STATE_RECORD,
    stored_state_json,
)
from confide.privacy.accountant import PartnerAccountant
from confide.privacy.receipts import (
    CountersignedHead,
    PartnerRunRecord,
    Receipt,
    pseudonym_of,
    sign_head,
)
from confide.run_layout import atomic_write_text

MAX_PENDING = 256  # unacknowledged receipts a node keeps per run (one per round trained)
MAX_PENDING_RUNS = 8  # runs whose unacknowledged receipts a node keeps
MAX_RECORD_RUNS = 16  # runs whose record (receipts, countersigned heads) a node keeps


@dataclass
class NodeState:
    accountant: PartnerAccountant
    signing_key: Ed25519PrivateKey
    # Calibrated once per run (keyed by the run), reused in every round of that run.
    noise_multiplier: float | None = None
    noise_run: str = ""
    # Ids of train messages already handled: a replayed or duplicated message must not
    # spend budget twice (a resumed round comes in a new message and is accounted again).
    handled: list[str] = field(default_factory=list)
    # Receipts this node signed that the server of their run has not acknowledged as
    # recorded in its ledger (run key -> receipts, oldest first). A reply can be lost (the
    # server died before recording it, or the reply never arrived); the spend was real all
    # the same. The node attaches these to its next reply in that run, whatever round that
    # is (a resumed run included), and the server records the ones its ledger lacks. Each
    # train message acknowledges what the ledger holds and where; a receipt is forgotten
    # here only once the node countersigns a chain head at or after that entry (the
    # server's word alone is not enough: the countersigned head commits it).
    pending: dict[str, list[str]] = field(default_factory=dict)
    # The node's own record of each run (run key -> its receipts and the chain heads it
    # countersigned), kept after the run for `confide audit partner`.
    records: dict[str, PartnerRunRecord] = field(default_factory=dict)

    def status(self, code: str, detail: str, **extra: float) -> ConfigRecord:
        """The STATUS record of every reply: outcome, and who answers (partner, key)."""
        return ConfigRecord({W.STATUS_CODE: code, W.STATUS_DETAIL: detail,
                             W.PARTNER: self.pseudonym, W.PUBLIC_KEY: self.public_key.hex(),
                             **extra})

    def unrecorded_receipts(self, run_key: str,
                            acknowledged: Mapping[str, int] | Set[str] | None,
                            countersigned: int | None = None) -> list[str]:
        """Receipts of run `run_key` not yet known to be inside a chain head this node
        countersigned, oldest first (what the next reply re-sends). `acknowledged`:
        `wire.receipt_ack_name` -> index of the ledger entry the server says holds it (a
        bare set of names, as servers of earlier versions send, forgets nothing);
        `countersigned`: the index of the head this node countersigns in the same reply.
        A receipt is forgotten when its entry is at or before that head."""
        kept = self.pending.get(run_key, [])
        if isinstance(acknowledged, Mapping) and countersigned is not None:
            def covered(receipt_json: str) -> bool:
                name = W.receipt_ack_name(str(json.loads(receipt_json).get("signature", "")))
                return name in acknowledged and acknowledged[name] <= countersigned
            kept = [r for r in kept if not covered(r)]
            self._set_pending(run_key, kept)
        return list(kept)

    def remember_receipt(self, run_key: str, receipt_json: str) -> None:
        # bounded: a server that never acknowledges (an older version) must not grow the
        # node's state without end; the node's own accountant keeps every spend regardless
        self._set_pending(run_key, [*self.pending.get(run_key, []), receipt_json]
                          [-MAX_PENDING:])
        self._record(run_key).add_receipt(json.loads(receipt_json))

    def countersign(self, run_key: str, index: int, entry_hash: str, round_: int) -> Receipt:
        """Countersign run `run_key`'s ledger head as this round's message names it, and
        keep it in the run's record."""
        signed = sign_head(run=run_key, index=index, entry_hash=entry_hash, round_=round_,
                           private_key=self.signing_key)
        self._record(run_key).add_head(CountersignedHead(index, entry_hash, round_))
        return signed

    def _record(self, run_key: str) -> PartnerRunRecord:
        record = self.records.pop(run_key, None) or PartnerRunRecord()
        # the runs touched most recently last; the oldest are let go
        self.records = {**dict(list(self.records.items())[-(MAX_RECORD_RUNS - 1):]),
                        run_key: record}
        return record

    def _set_pending(self, run_key: str, receipts: list[str]) -> None:
        others = {k: v for k, v in self.pending.items() if k != run_key}
        # the runs touched most recently last; a few runs at most
        self.pending = dict(list(others.items())[-(MAX_PENDING_RUNS - 1):])
        if receipts:
            self.pending[run_key] = receipts

    def seen(self, message_id: str) -> bool:
        return message_id in self.handled

    def mark_handled(self, message_id: str) -> None:
        self.handled = [*self.handled, message_id][-256:]

    @property
    def public_key(self) -> bytes:
        return self.signing_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def pseudonym(self) -> str:
        return pseudonym_of(self.public_key)

    def to_json(self) -> str:
        key = self.signing_key.private_bytes(serialization.Encoding.Raw,
                                             serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
        return json.dumps({"accountant": self.accountant.state_dict(), "key": key.hex(),
                           "noise_multiplier": self.noise_multiplier,
                           "noise_run": self.noise_run,
                           "handled": self.handled, "pending_receipts": self.pending,
                           "run_records": {k: v.to_json() for k, v in self.records.items()}})

    @classmethod
    def from_json(cls, text: str, delta: float, max_epsilon: float) -> NodeState:
        data = json.loads(text)
        accountant = PartnerAccountant(delta, max_epsilon)
        accountant.load_state_dict(data["accountant"])  # refuses another delta
        return cls(
            accountant=accountant,
            signing_key=Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["key"])),
            noise_multiplier=data.get("noise_multiplier"),
            noise_run=str(data.get("noise_run", "")),
            handled=list(data.get("handled", [])),
            pending=_pending_of(data),
            # absent in state files of earlier versions: no record of their runs
            records={str(k): PartnerRunRecord.from_json(v)
                     for k, v in data.get("run_records", {}).items()})


def _pending_of(data: dict[str, Any]) -> dict[str, list[str]]:
    """The pending receipts of a state file; earlier versions kept only the receipts of
    the last round they trained in ("run key/round")."""
    if isinstance(data.get("pending_receipts"), dict):
        return {str(k): [str(r) for r in v]
                for k, v in data["pending_receipts"].items()}
    run_key = str(data.get("attempt_round", "")).rpartition("/")[0]
    receipts = [str(r) for r in data.get("attempt_receipts", [])]
    return {run_key: receipts} if run_key and receipts else {}


def load_node_state(context: Context, *, delta: float, max_epsilon: float,
                    state_dir: Path | None) -> NodeState:
    text = stored_state_json(context, state_dir)
    if text is None:
        return NodeState(PartnerAccountant(delta, max_epsilon), Ed25519PrivateKey.generate())
    try:
        return NodeState.from_json(text, delta, max_epsilon)
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        where = state_dir / STATE_FILE if state_dir else "node context"
        # Refuse rather than start from zero: a lost history would let budget be re-spent.
        raise RuntimeError(f"node state in {where} cannot be used ({exc}); refusing to train "
                           "with an unknown privacy history") from None


def save_node_state(context: Context, state: NodeState, state_dir: Path | None) -> None:
    text = state.to_json()
    context.state.config_records[STATE_RECORD] = ConfigRecord({"json": text})
    if state_dir is not None:
        atomic_write_text(state_dir / STATE_FILE, text)
