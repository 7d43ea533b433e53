"""An actively malicious server against honest partners (scripted in `malicious.py`).

Each attack recovers individual inputs from clients that run without identities (the
honest-but-curious protocol), and ends in a refusal by the authenticated clients the
product runs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import make_updates
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from malicious import MaliciousServer

from confide.privacy.secagg import SecAggClient, SecAggConfig, SecAggRefusal
from confide.privacy.secagg.identity import Roster, raw_public


def _clients(cfg: SecAggConfig, n: int, *, authenticated: bool,
             min_partners: int = 2) -> dict[int, SecAggClient]:
    if not authenticated:
        return {c: SecAggClient(cfg, c, 1) for c in range(1, n + 1)}
    keys = {c: Ed25519PrivateKey.generate() for c in range(1, n + 1)}
    roster = Roster(frozenset(raw_public(k) for k in keys.values()), min_partners)
    return {c: SecAggClient(cfg, c, 1, identity=keys[c], roster=roster) for c in keys}


def _recovered(recovered: dict[int, np.ndarray], updates: dict[int, np.ndarray]) -> list[int]:
    return [c for c, x in recovered.items() if np.allclose(x, updates[c], atol=1e-3)]


def _half_threshold(n: int) -> SecAggConfig:
    # t = (k + 1) / 2 on a complete graph with an even cohort: what the run configuration's
    # threshold fraction 0.5 used to give
    return SecAggConfig(os.urandom(16), num_clients=n, vector_length=8, threshold=n // 2,
                        min_survivors=n // 2)


@pytest.mark.parametrize("n", [4, 6])
def test_equivocation_recovers_inputs_without_identities(n):
    updates = make_updates(n, 8)
    cfg = _half_threshold(n)
    recovered = MaliciousServer(cfg, _clients(cfg, n, authenticated=False)).equivocate(updates)
    assert _recovered(recovered, updates) == list(range(1, n + 1))


@pytest.mark.parametrize("n", [4, 6])
def test_equivocation_with_half_threshold_is_refused_before_any_share(n):
    cfg = _half_threshold(n)
    with pytest.raises(SecAggRefusal, match="not above half"):
        MaliciousServer(cfg, _clients(cfg, n, authenticated=True)).equivocate(make_updates(n, 8))


@pytest.mark.parametrize("n", [4, 6, 7])
def test_equivocation_with_majority_threshold_is_refused_at_unmask(n):
    cfg = SecAggConfig(os.urandom(16), num_clients=n, vector_length=8)
    with pytest.raises(SecAggRefusal, match="survivors"):
        MaliciousServer(cfg, _clients(cfg, n, authenticated=True)).equivocate(make_updates(n, 8))


def test_fake_partners_recover_a_victim_without_identities():
    n, fakes = 2, 4
    cfg = SecAggConfig(os.urandom(16), num_clients=n + fakes, vector_length=8)
    updates = make_updates(n, 8)
    server = MaliciousServer(cfg, _clients(cfg, n, authenticated=False))
    assert _recovered(server.fill_with_fakes(updates, victim=1, fakes=fakes), updates) == [1]


def test_fake_partners_are_refused_by_the_roster():
    n, fakes = 2, 4
    cfg = SecAggConfig(os.urandom(16), num_clients=n + fakes, vector_length=8)
    server = MaliciousServer(cfg, _clients(cfg, n, authenticated=True))
    with pytest.raises(SecAggRefusal, match="not on this partner's federation roster"):
        server.fill_with_fakes(make_updates(n, 8), victim=1, fakes=fakes)


def test_server_chosen_graph_seed_is_refused():
    cfg = SecAggConfig(os.urandom(16), num_clients=4, vector_length=8)
    server = MaliciousServer(cfg, _clients(cfg, 4, authenticated=True))
    server.graph_seed = lambda keys, identities: os.urandom(32)  # type: ignore[method-assign]
    with pytest.raises(SecAggRefusal, match="graph seed is not the hash"):
        server.run_to_masked(make_updates(4, 8))


def test_directory_below_the_partners_floor_is_refused():
    cfg = SecAggConfig(os.urandom(16), num_clients=4, vector_length=8)
    server = MaliciousServer(cfg, _clients(cfg, 4, authenticated=True, min_partners=5))
    with pytest.raises(SecAggRefusal, match="fewer than this partner's floor of 5"):
        server.run_to_masked(make_updates(4, 8))


def test_unsigned_or_resigned_directory_entry_is_refused():
    cfg = SecAggConfig(os.urandom(16), num_clients=4, vector_length=8)
    clients = _clients(cfg, 4, authenticated=True)
    server = MaliciousServer(cfg, clients)
    honest_directory = server.directory

    def swap_signature(adverts):  # client 2's keys replaced by the server's own
        d = honest_directory(adverts)
        keys = dict(d.public_keys)
        keys[2] = (os.urandom(32), os.urandom(32))
        return type(d)(d.session_id, d.round, graph_seed=server.graph_seed(keys, d.identities),
                       public_keys=keys, identities=d.identities, signatures=d.signatures)

    server.directory = swap_signature  # type: ignore[method-assign]
    with pytest.raises(SecAggRefusal, match="entry of client 2 is unsigned or its signature"):
        server.run_to_masked(make_updates(4, 8))
