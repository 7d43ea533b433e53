"""Every malformed, replayed, misaddressed or tampered input is rejected with a named error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import Parties, make_config, make_updates

from confide.privacy.secagg import (
    MaskedInput,
    Message,
    SecAggClient,
    SecAggDecryptionError,
    SecAggProtocolError,
    SecAggRefusal,
    SecAggServer,
    SecAggValidationError,
    UnmaskRequest,
)


def _first_envelope(request):
    sender = next(iter(request.envelopes))
    return sender, request.envelopes[sender]


def test_tampered_ciphertext_names_sender_and_receiver(parties):
    requests = parties.to_masked_input()
    req = requests[1]
    sender, env = _first_envelope(req)
    bad = env[:-1] + bytes([env[-1] ^ 1])
    forged = dataclasses.replace(req, envelopes={**req.envelopes, sender: bad})
    with pytest.raises(SecAggDecryptionError) as info:
        parties.clients[1].masked_input(forged, np.zeros(20))
    assert info.value.sender == sender and info.value.receiver == 1
    assert "failed authentication" in str(info.value)


def test_misaddressed_ciphertext_is_reported(parties):
    requests = parties.to_masked_input()
    other = 2
    req = requests[1]
    # an envelope meant for `other` from a sender that also writes to client 1
    sender = next(s for s in requests[other].envelopes if s != 1 and s in req.envelopes)
    env = requests[other].envelopes[sender]
    forged = dataclasses.replace(req, envelopes={**req.envelopes, sender: env})
    with pytest.raises(SecAggProtocolError, match=f"addressed to client {other}"):
        parties.clients[1].masked_input(forged, np.zeros(20))


def test_request_for_another_client_rejected(parties):
    requests = parties.to_masked_input()
    with pytest.raises(SecAggProtocolError, match="addressed to client 2"):
        parties.clients[1].masked_input(requests[2], np.zeros(20))


def test_replay_from_earlier_round_rejected():
    cfg = make_config()
    old = Parties(cfg, round_number=1)
    new = Parties(cfg, round_number=2)
    with pytest.raises(SecAggProtocolError, match="from round 1 but this is round 2"):
        new.server.receive(SecAggClient(cfg, 1, 1).advertise_keys())
    directory_r1 = old.to_share_keys()
    new.to_share_keys()
    with pytest.raises(SecAggProtocolError, match="round 1"):
        new.clients[1].share_keys(directory_r1)


def test_ciphertext_replayed_across_rounds_fails_authentication():
    """Same keys reused with a round-1 envelope in round 2: the AD binds the round."""
    cfg = make_config()
    p = Parties(cfg, round_number=1)
    requests = p.to_masked_input()
    req = requests[1]
    replay = dataclasses.replace(req, round=2)
    client = p.clients[1]
    client.round = 2  # simulate a client whose round counter moved on, same keys
    with pytest.raises(SecAggDecryptionError):
        client.masked_input(replay, np.zeros(20))


def test_message_from_other_stage_rejected(parties):
    parties.to_share_keys()
    advertise_again = SecAggClient(parties.config, 1, 1).advertise_keys()
    with pytest.raises(SecAggProtocolError, match=r"stage 'advertise_keys'.*is expected"):
        parties.server.receive(advertise_again)
    # client side: an unmask request while the client expects the key directory
    request = UnmaskRequest(parties.config.session_id, 1, survivors=(1, 2), dropped=())
    with pytest.raises(SecAggProtocolError, match=r"cannot share keys|expected"):
        parties.clients[1].share_keys(request)  # type: ignore[arg-type]


def test_wire_stage_tampering_rejected(parties):
    from confide.privacy.secagg.messages import _decode, _encode

    head, blobs = _decode(parties.clients[1].advertise_keys().to_bytes())
    kind = head.pop("kind")
    head.pop("blobs")
    head["stage"] = "unmask"
    tampered = _encode(kind, head, [("enc", blobs["enc"]), ("mask", blobs["mask"])])
    with pytest.raises(SecAggProtocolError, match="carries stage"):
        Message.from_bytes(tampered)


def test_other_session_rejected(parties):
    other = make_config()
    stranger = SecAggClient(other, 1, 1)
    with pytest.raises(SecAggProtocolError, match="belongs to session"):
        parties.server.receive(stranger.advertise_keys())


@pytest.mark.parametrize(
    ("update", "match"),
    [
        (np.zeros(19), "expected a flat vector of length 20"),
        (np.zeros((4, 5)), "expected a flat vector of length 20"),
        (np.zeros(20, dtype=np.int64), "floating-point dtype"),
        (np.array([0.0] * 19 + [np.nan]), "non-finite.*index 19"),
        (np.array([np.inf] + [0.0] * 19), "non-finite.*index 0"),
        ([0.0] * 20, "numpy array"),
    ],
)
def test_bad_update_rejected(parties, update, match):
    requests = parties.to_masked_input()
    with pytest.raises(SecAggValidationError, match=match):
        parties.clients[1].masked_input(requests[1], update)


def test_wrong_length_or_dtype_masked_input_rejected_by_server(parties):
    parties.to_masked_input()
    cfg = parties.config
    short = MaskedInput(cfg.session_id, 1, sender=1, vector=np.zeros(5, np.uint32))
    with pytest.raises(SecAggProtocolError, match="shape"):
        parties.server.receive(short)
    wrong = MaskedInput(cfg.session_id, 1, sender=1, vector=np.zeros(21, np.uint64))
    with pytest.raises(SecAggProtocolError, match="dtype"):
        parties.server.receive(wrong)


def test_duplicate_masked_input_rejected(parties):
    requests = parties.to_masked_input()
    msg = parties.clients[1].masked_input(requests[1], np.zeros(20))
    parties.server.receive(msg)
    with pytest.raises(SecAggProtocolError, match="duplicate"):
        parties.server.receive(msg)


def _to_unmask(p: Parties):
    requests = p.to_masked_input()
    ups = make_updates(p.config.num_clients, p.config.vector_length)
    for c, client in p.clients.items():
        p.server.receive(client.masked_input(requests[c], ups[c]))
    return p.server.unmask_request()


def test_client_refuses_to_reveal_both_share_kinds(parties):
    request = _to_unmask(parties)
    evil = dataclasses.replace(request, dropped=(request.survivors[1],))
    with pytest.raises(SecAggRefusal, match="both survived and dropped"):
        parties.clients[1].unmask(evil)


def test_client_refuses_second_unmask_and_being_listed_dropped(parties):
    request = _to_unmask(parties)
    survivors = tuple(c for c in request.survivors if c != 2)
    with pytest.raises(SecAggRefusal, match="not list this client as a survivor"):
        parties.clients[2].unmask(dataclasses.replace(request, survivors=survivors, dropped=(2,)))
    parties.clients[1].unmask(request)
    with pytest.raises(SecAggProtocolError, match="replayed or out of order"):
        parties.clients[1].unmask(request)


def test_client_refuses_too_few_survivors(parties):
    request = _to_unmask(parties)
    few = dataclasses.replace(request, survivors=(1,), dropped=request.survivors[1:])
    with pytest.raises(SecAggRefusal, match="min_survivors"):
        parties.clients[1].unmask(few)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"bits": 8}, "bits"),
        ({"bits": 65}, "bits"),
        ({"threshold": 1}, "threshold"),
        ({"degree": 3, "n": 10}, "degree"),
        ({"noise_stddev": 1.0}, "l2_clip"),
        ({"coord_clip": float("nan")}, "coord_clip"),
        ({"min_survivors": 1}, "min_survivors"),
    ],
)
def test_config_errors_name_the_key(kw, match):
    n = kw.pop("n", 6)
    with pytest.raises(SecAggValidationError, match=f"SecAggConfig.{match}"):
        make_config(n, 10, **kw)


def test_server_rejects_message_after_done():
    p = Parties(make_config())
    request = _to_unmask(p)
    for client in p.clients.values():
        p.server.receive(client.unmask(request))
    p.server.result()
    with pytest.raises(SecAggProtocolError, match="no more messages"):
        p.server.receive(SecAggClient(p.config, 1, 1).advertise_keys())
    assert isinstance(p.server, SecAggServer)
