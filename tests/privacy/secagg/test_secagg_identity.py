"""Authenticated rounds: signed directory, derived graph seed, consistency votes."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from conftest import make_updates
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.privacy.secagg import (
    SecAggClient,
    SecAggConfig,
    SecAggProtocolError,
    SecAggRefusal,
    SecAggServer,
    UnmaskRequest,
    UpdateEncoder,
)
from confide.privacy.secagg.identity import Roster, raw_public
from confide.privacy.secagg.inprocess import run_round


def _keys(n: int) -> dict[int, Ed25519PrivateKey]:
    return {c: Ed25519PrivateKey.generate() for c in range(1, n + 1)}


@pytest.mark.parametrize("drop", [
    {"share_keys": [3, 8]}, {"masked_input": [3, 8]}, {"unmask": [3, 8]},
    {"masked_input": [3], "consistency": [8]}])
def test_authenticated_round_survives_dropouts(drop):
    n, d = 10, 40
    cfg = SecAggConfig(os.urandom(16), num_clients=n, vector_length=d, degree=6)
    ups = make_updates(n, d, 5)
    result, _ = run_round(cfg, ups, drop=drop, identities=_keys(n))
    # who drops after delivering a masked input is still in the sum
    out = set(drop.get("share_keys", [])) | set(drop.get("masked_input", []))
    in_sum = [c for c in ups if c not in out]
    assert list(result.survivors) == in_sum
    plain = sum(ups[c] for c in in_sum)
    assert np.max(np.abs(result.weighted_sum - plain)) <= \
        UpdateEncoder(cfg).sum_error_bound(len(in_sum))


class _Round:
    """Four authenticated clients and an honest server, advanced to the unmask stage."""

    def __init__(self, n: int = 4, drop: int | None = None) -> None:
        keys = _keys(n)
        roster = Roster(frozenset(raw_public(k) for k in keys.values()))
        self.cfg = SecAggConfig(os.urandom(16), num_clients=n, vector_length=6)
        self.server = SecAggServer(self.cfg, 1)
        self.clients = {c: SecAggClient(self.cfg, c, 1, identity=keys[c], roster=roster)
                        for c in keys}
        for c in self.clients.values():
            self.server.receive(c.advertise_keys())
        directory = self.server.key_directory()
        for c in self.clients.values():
            self.server.receive(c.share_keys(directory))
        requests = self.server.masked_input_requests()
        self.votes = {}
        for cid, c in self.clients.items():
            out = c.masked_input(requests[cid], np.zeros(6))
            self.votes[cid] = out.vote
            if cid != drop:
                self.server.receive(out)


def test_unmask_of_a_split_nobody_voted_for_is_refused():
    r = _Round()
    # the server claims client 4 dropped although it holds its masked input, and shows the
    # votes the clients gave for "everyone survived"
    forged = UnmaskRequest(r.cfg.session_id, 1, survivors=(1, 2, 3), dropped=(4,),
                           votes=r.votes)
    with pytest.raises(SecAggRefusal, match="never voted for"):
        r.clients[1].unmask(forged)


def test_unmask_without_enough_votes_is_refused():
    r = _Round()
    request = r.server.unmask_request()
    thin = dataclasses.replace(request, votes={1: request.votes[1], 2: request.votes[2]})
    with pytest.raises(SecAggRefusal, match="2 valid survivor votes"):
        r.clients[1].unmask(thin)
    forged = dataclasses.replace(request, votes={c: os.urandom(64) for c in request.votes})
    with pytest.raises(SecAggRefusal, match="0 valid survivor votes"):
        r.clients[2].unmask(forged)
    # the genuine request is still answered
    assert r.clients[3].unmask(request).self_mask_shares


def test_dropout_needs_a_consistency_round_and_each_client_votes_once():
    r = _Round(drop=4)
    with pytest.raises(SecAggProtocolError, match="collect consistency votes"):
        SecAggServer.unmask_request(r.server)
    r = _Round(drop=4)
    ask = r.server.consistency_request()
    assert ask is not None and ask.survivors == (1, 2, 3) and ask.dropped == (4,)
    for c in (1, 2, 3):
        r.server.receive(r.clients[c].consistency_vote(ask))
    with pytest.raises(SecAggRefusal, match="already voted"):
        r.clients[1].consistency_vote(ask)
    request = r.server.unmask_request()
    assert sorted(request.votes) == [1, 2, 3]
    answers = [r.clients[c].unmask(request) for c in (1, 2, 3)]
    assert all(set(a.mask_key_shares) <= {4} for a in answers)


def test_client_state_keeps_its_votes_and_directory():
    r = _Round()
    client = r.clients[2]
    restored = SecAggClient.from_state(r.cfg, client.to_state(), identity=client._identity,
                                       roster=client._roster)
    assert restored.unmask(r.server.unmask_request()).self_mask_shares


def test_server_keeps_bad_advertisements_out_of_the_directory():
    cfg = SecAggConfig(os.urandom(16), num_clients=3, vector_length=4)
    key = Ed25519PrivateKey.generate()
    roster = Roster(frozenset({raw_public(key)}))
    server = SecAggServer(cfg, 1)
    first = SecAggClient(cfg, 1, 1, identity=key, roster=roster).advertise_keys()
    server.receive(first)
    twin = SecAggClient(cfg, 2, 1, identity=key, roster=roster).advertise_keys()
    with pytest.raises(SecAggProtocolError, match="identity already advertised"):
        server.receive(twin)
    other = SecAggClient(cfg, 3, 1, identity=Ed25519PrivateKey.generate(),
                         roster=roster).advertise_keys()
    tampered = dataclasses.replace(other, mask_public=os.urandom(32))
    with pytest.raises(SecAggProtocolError, match="signature does not verify"):
        server.receive(tampered)


def test_identity_needs_a_roster():
    cfg = SecAggConfig(os.urandom(16), num_clients=3, vector_length=4)
    with pytest.raises(ValueError, match="identity and the federation's roster"):
        SecAggClient(cfg, 1, 1, identity=Ed25519PrivateKey.generate())
