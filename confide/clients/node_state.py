"""What a partner node remembers between rounds: its accountant, its node key, its pseudonym.

In simulation the state lives in the node's Flower `Context.state`; in deployment (node
config `state-dir`) it is also written atomically to the partner's own disk, and the disk
copy wins on restart, so a restarted node never forgets spent budget.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context

from confide.privacy.accountant import PartnerAccountant
from confide.privacy.receipts import pseudonym_of
from confide.run_layout import atomic_write_text

STATE_RECORD = "confide-node-state"
STATE_FILE = "node_state.json"


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
    # The receipts this node signed for the round it trained last ("run key/round"). A
    # server that died (or tore its ledger line) before recording a reply re-sends that
    # round after its resume; the node trains again (fresh noise: a new release) and
    # attaches these receipts, so the lost attempt's spend reaches the ledger as well.
    attempt_round: str = ""
    attempt_receipts: list[str] = field(default_factory=list)

    def earlier_attempts(self, run_key: str, round_: int) -> list[str]:
        """Receipts signed in earlier attempts of this run's round `round_`."""
        return list(self.attempt_receipts) if self.attempt_round == f"{run_key}/{round_}" \
            else []

    def remember_receipt(self, run_key: str, round_: int, receipt_json: str) -> None:
        self.attempt_receipts = [*self.earlier_attempts(run_key, round_), receipt_json]
        self.attempt_round = f"{run_key}/{round_}"

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
                           "handled": self.handled, "attempt_round": self.attempt_round,
                           "attempt_receipts": self.attempt_receipts})

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
            attempt_round=str(data.get("attempt_round", "")),
            attempt_receipts=[str(r) for r in data.get("attempt_receipts", [])])


def node_state_dir(context: Context, run_out: str = "") -> Path | None:
    """Where the node keeps its state on disk.

    Deployment: node config `state-dir` (the partner's own disk). Simulation: the virtual
    partner's folder inside the run folder, so a resumed simulation finds its nodes' spent
    budget and keys again. None only for a simulation without a run folder."""
    value = context.node_config.get("state-dir")
    if value:
        return Path(str(value))
    if "partition-id" in context.node_config and run_out:
        return Path(run_out) / "partners" / f"partition-{int(context.node_config['partition-id'])}"
    return None


def load_node_state(context: Context, *, delta: float, max_epsilon: float,
                    state_dir: Path | None) -> NodeState:
    text: str | None = None
    if state_dir is not None and (state_dir / STATE_FILE).is_file():
        text = (state_dir / STATE_FILE).read_text()
    elif STATE_RECORD in context.state.config_records:
        text = str(context.state.config_records[STATE_RECORD]["json"])
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
