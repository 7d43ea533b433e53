"""A partner's identity and the federation roster it checks secure rounds against."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, RecordDict

from confide.clients.identity import (
    IdentityError,
    enrol,
    node_identity,
    simulation_roster_path,
)
from confide.clients.policy import PolicyError
from confide.config import build_config
from confide.privacy.secagg import SecAggRefusal
from confide.privacy.secagg.identity import parse_roster, raw_public, roster_line

RUN = build_config({"secure-aggregation": True})


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_enrol_is_stable_and_the_line_names_the_pseudonym(tmp_path: Path) -> None:
    line = enrol(tmp_path / "a", delta=RUN.delta, max_epsilon=RUN.max_epsilon)
    assert enrol(tmp_path / "a", delta=RUN.delta, max_epsilon=RUN.max_epsilon) == line
    key_hex, pseudonym = line.split()
    assert pseudonym.startswith("p-") and len(bytes.fromhex(key_hex)) == 32


def test_partner_on_the_roster_gets_its_key_and_floor(tmp_path: Path) -> None:
    line = enrol(tmp_path / "a", delta=RUN.delta, max_epsilon=RUN.max_epsilon)
    other = roster_line(raw_public(Ed25519PrivateKey.generate()))
    (tmp_path / "roster.txt").write_text(f"# partners\n{line}\n{other}\n")
    key, roster = node_identity(_context({"state-dir": str(tmp_path / "a"),
                                          "federation-roster": str(tmp_path / "roster.txt"),
                                          "min-partners": 3}), RUN)
    assert raw_public(key) == bytes.fromhex(line.split()[0])
    assert len(roster.identities) == 2 and roster.min_partners == 3


def test_partner_missing_from_the_roster_is_told_which_line_to_ask_for(tmp_path: Path
                                                                        ) -> None:
    line = enrol(tmp_path / "a", delta=RUN.delta, max_epsilon=RUN.max_epsilon)
    (tmp_path / "roster.txt").write_text(roster_line(raw_public(Ed25519PrivateKey.generate())))
    with pytest.raises(SecAggRefusal, match=f"add the line: {line.split()[0]}"):
        node_identity(_context({"state-dir": str(tmp_path / "a"),
                                "federation-roster": str(tmp_path / "roster.txt")}), RUN)


@pytest.mark.parametrize(("node_config", "match"), [
    ({}, "set node config federation-roster"),
    ({"federation-roster": "/nonexistent/roster.txt"}, "roster.txt is missing"),
    ({"federation-roster": "ROSTER", "state-dir": "/nonexistent/state"}, "no identity yet"),
])
def test_unusable_identity_or_roster_is_named(tmp_path: Path, node_config: dict, match: str
                                             ) -> None:
    line = enrol(tmp_path / "a", delta=RUN.delta, max_epsilon=RUN.max_epsilon)
    (tmp_path / "roster.txt").write_text(line)
    config = {"state-dir": str(tmp_path / "a"), **node_config}
    config = {k: str(tmp_path / "roster.txt") if v == "ROSTER" else v for k, v in config.items()}
    with pytest.raises(IdentityError, match=match):
        node_identity(_context(config), RUN)


def test_roster_lines_are_checked() -> None:
    with pytest.raises(ValueError, match="line 2: 'abcd' is not a 32-byte public key"):
        parse_roster("# ok\nabcd name\n")
    with pytest.raises(ValueError, match="lists no partner"):
        parse_roster("# nobody\n")


def test_simulated_partners_are_enrolled_once_for_the_run(tmp_path: Path) -> None:
    run = build_config({"secure-aggregation": True, "out": str(tmp_path / "run")})
    contexts = [_context({"partition-id": i, "num-partitions": 3}) for i in range(3)]
    keys = [raw_public(node_identity(c, run)[0]) for c in contexts]
    roster = parse_roster(simulation_roster_path(run.out).read_text())
    assert set(keys) == roster and len(roster) == 3
    assert (Path(run.out) / "partners" / "partition-2" / "node_state.json").is_file()


def test_min_partners_below_two_is_refused(tmp_path: Path) -> None:
    line = enrol(tmp_path / "a", delta=RUN.delta, max_epsilon=RUN.max_epsilon)
    (tmp_path / "roster.txt").write_text(line)
    with pytest.raises(PolicyError, match="min-partners = 1: allowed an integer >= 2"):
        node_identity(_context({"state-dir": str(tmp_path / "a"), "min-partners": 1,
                                "federation-roster": str(tmp_path / "roster.txt")}), RUN)
