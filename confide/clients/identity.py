"""A partner's identity in the federation and the federation's roster as the partner holds it.

The identity is the node key of `node_state.py` (the key that signs the partner's receipts
and names it in the ledger); the roster is a file of the identities of every partner of the
federation, which each partner receives from the operator out of band and checks itself (it
is not taken from the server). Secure aggregation runs only between identities on the
roster (`confide.privacy.secagg.identity`).

Deployment: `confide deploy partner-identity --state-dir DIR` creates the identity and prints
its roster line; the partner's SuperNode names the roster in node config `federation-roster`.
Simulation: the driver enrols every virtual partner through the same function (`enrol`) and
writes the run's roster to `RUN/partners/roster.txt`, which the virtual partners read.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, RecordDict

from confide.clients.policy import node_policy
from confide.clients.state_location import (
    STATE_FILE,
    node_state_dir,
    stored_key_hex,
    stored_state_json,
)
from confide.config import RunConfig
from confide.privacy.secagg import SecAggRefusal
from confide.privacy.secagg.identity import Roster, parse_roster, raw_public, roster_line
from confide.run_layout import atomic_write_text

ROSTER_FILE = "roster.txt"
ROSTER_KEY = "federation-roster"  # node config: path of the roster file


class IdentityError(ValueError):
    """The partner's identity or roster is missing or unusable (names which and how to fix)."""


def enrol(state_dir: Path, *, delta: float, max_epsilon: float) -> str:
    """The partner's roster line, creating its identity (and node state) if it has none."""
    # the accountant (Opacus, torch) only here: the secure-aggregation stages never enrol
    from confide.clients.node_state import load_node_state, save_node_state

    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    state = load_node_state(context, delta=delta, max_epsilon=max_epsilon,
                            state_dir=state_dir)
    if not (state_dir / STATE_FILE).is_file():
        save_node_state(context, state, state_dir)
    return roster_line(state.public_key, state.pseudonym)


def simulation_roster_path(run_out: str | Path) -> Path:
    return Path(run_out) / "partners" / ROSTER_FILE


def enrol_simulated_partners(run_out: str | Path, num_partitions: int, *, delta: float,
                             max_epsilon: float) -> Path:
    """Every virtual partner's identity (in its folder of the run), and the run's roster."""
    lines = []
    for partition in range(num_partitions):
        folder = Path(run_out) / "partners" / f"partition-{partition}"
        lines.append(enrol(folder, delta=delta, max_epsilon=max_epsilon))
    path = simulation_roster_path(run_out)
    atomic_write_text(path, "# the federation's partners (one Ed25519 public key a line)\n"
                      + "\n".join(lines) + "\n")
    return path


def _simulation_roster(context: Context, cfg: RunConfig) -> Path:
    """Simulation: the run's roster, enrolling every virtual partner first if nobody has
    (under a lock: the virtual partners of one run may start at once, in several processes).
    `confide simulate` enrols them before the run; `flwr run` leaves it to the partners."""
    path = simulation_roster_path(cfg.out)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".roster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            enrol_simulated_partners(cfg.out, int(context.node_config["num-partitions"]),
                                     delta=cfg.delta, max_epsilon=cfg.max_epsilon)
    return path


def _roster_path(context: Context, cfg: RunConfig) -> Path:
    value = context.node_config.get(ROSTER_KEY)
    if value:
        return Path(str(value))
    if "num-partitions" in context.node_config and cfg.out:
        return _simulation_roster(context, cfg)
    raise IdentityError(f"secure aggregation needs the federation's roster: set node config "
                        f"{ROSTER_KEY} to the roster file the operator gave you")


def node_identity(context: Context, cfg: RunConfig) -> tuple[Ed25519PrivateKey, Roster]:
    """This node's identity key and the roster it checks every key directory against.
    Refuses (SecAggRefusal) when its own identity is not on the roster."""
    path = _roster_path(context, cfg)
    key = _signing_key(context, cfg)
    try:
        identities = parse_roster(path.read_text(), str(path))
    except FileNotFoundError:
        raise IdentityError(f"federation roster {path} is missing") from None
    except ValueError as exc:
        raise IdentityError(str(exc)) from None
    if raw_public(key) not in identities:
        raise SecAggRefusal(f"this partner's identity is not on the federation roster {path}; "
                            f"ask the operator to add the line: {roster_line(raw_public(key))}")
    return key, Roster(identities, node_policy(context, cfg).min_partners)


def _signing_key(context: Context, cfg: RunConfig) -> Ed25519PrivateKey:
    """The node key, from the state on disk (deployment, simulation with a run folder) or
    the node's context; never created here (an identity nobody enrolled is on no roster)."""
    state_dir = node_state_dir(context, cfg.out)
    text = stored_state_json(context, state_dir)
    if text is None:
        raise IdentityError("this partner has no identity yet: create it with `confide deploy "
                            "partner-identity --state-dir DIR` and give its line to the "
                            "operator for the federation roster")
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(stored_key_hex(text)))
    except (KeyError, ValueError, TypeError) as exc:
        raise IdentityError(f"node state in {state_dir or 'node context'} holds no usable "
                            f"identity key ({exc})") from None

