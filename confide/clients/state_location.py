"""Where a partner node keeps its state: one small module, importable without the
accountant (and so without Opacus and torch), for the secure-aggregation stages that only
need the node's identity key."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context

STATE_RECORD = "confide-node-state"  # the node's Context.state record (simulation)
STATE_FILE = "node_state.json"


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


def stored_state_json(context: Context, state_dir: Path | None) -> str | None:
    """The node's saved state as text: its disk copy wins, else its Context.state."""
    if state_dir is not None and (state_dir / STATE_FILE).is_file():
        return (state_dir / STATE_FILE).read_text()
    if STATE_RECORD in context.state.config_records:
        return str(context.state.config_records[STATE_RECORD]["json"])
    return None


def stored_key_hex(text: str) -> str:
    """The node key (hex) in a saved state."""
    return str(json.loads(text)["key"])
