"""The node's secure-aggregation adapter: state that survives between messages, fault
injection, refusal of weaker session parameters, and no plaintext delta on the wire."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from confide import wire as W
from confide.clients import secure_client as S
from confide.clients.faults import drops_out
from confide.clients.identity import enrol
from confide.config import build_config
from confide.privacy.secagg import (
    MaskedInput,
    SecAggClient,
    SecAggConfig,
    SecAggRefusal,
    SecAggServer,
    UpdateEncoder,
)
from confide.privacy.secagg import Message as SecAggMessage


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def test_flatten_roundtrip_in_sorted_order() -> None:
    ref = {"z": np.ones((2, 3), np.float32), "a": np.arange(4, dtype=np.float32)}
    vec = W.flatten(ref)
    assert vec[:4].tolist() == [0, 1, 2, 3]
    back = W.unflatten(vec, ref)
    assert list(back) == ["z", "a"]
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k])
    with pytest.raises(ValueError):
        W.unflatten(vec[:-1], ref)


def test_client_state_roundtrip_completes_a_round() -> None:
    """Every stage runs on a client restored from bytes, as after a process switch."""
    cfg = SecAggConfig(os.urandom(16), num_clients=4, vector_length=6)
    server = SecAggServer(cfg, 1)
    states = {}
    for c in range(1, 5):
        client = SecAggClient(cfg, c, 1)
        server.receive(client.advertise_keys())
        states[c] = client.to_state()
    directory = server.key_directory()
    for c in states:
        client = SecAggClient.from_state(cfg, states[c])
        server.receive(client.share_keys(directory))
        states[c] = client.to_state()
    requests = server.masked_input_requests()
    updates = {c: np.full(6, 0.1 * c) for c in states}
    for c in states:
        client = SecAggClient.from_state(cfg, states[c])
        server.receive(client.masked_input(requests[c], updates[c]))
        states[c] = client.to_state()
    unmask = server.unmask_request()
    for c in states:
        server.receive(SecAggClient.from_state(cfg, states[c]).unmask(unmask))
    np.testing.assert_allclose(server.result().weighted_sum, np.full(6, 1.0), atol=1e-6)


def test_config_travels_as_json() -> None:
    cfg = SecAggConfig(os.urandom(16), num_clients=8, vector_length=10, l2_clip=1.0,
                       noise_stddev=0.5)
    assert W.config_from_json(W.config_to_json(cfg)) == cfg


def test_node_refuses_less_noise_than_the_run_promises() -> None:
    run = build_config({"secure-aggregation": True, "distributed-dp": True,
                        "client-dp-noise-multiplier": 1.0, "client-dp-clipping-norm": 1.0})
    weak = SecAggConfig(os.urandom(16), num_clients=4, vector_length=3, l2_clip=1.0,
                        noise_stddev=0.5)
    with pytest.raises(SecAggRefusal, match="noise"):
        S.check_session_config(weak, run)
    ok = W.session_config(run, session_id=os.urandom(16), num_clients=4, vector_length=3)
    S.check_session_config(ok, run)
    assert ok.noise_stddev == 1.0 and ok.l2_clip == 1.0


def test_injected_dropout_is_seeded_and_simulation_only() -> None:
    run = build_config({"secure-aggregation": True, "dropout-rate": 0.5, "seed": 3})
    down = ConfigRecord({W.SECAGG_ROUND: 1, f"{W.MASKED_REQUEST}/1": b""})
    msg = Message(RecordDict({W.CONFIG: ConfigRecord(run.to_dict()), W.SECAGG: down}),
                  dst_node_id=5, message_type="train")
    sim = Context(1, 5, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})
    deployed = Context(1, 5, {}, RecordDict(), {})
    expected = drops_out(3, 1, 0, 0.5)
    assert (S.injected_dropout(msg, sim, run) is not None) == expected
    assert S.injected_dropout(msg, deployed, run) is None
    assert drops_out(3, 1, 0, 0.5) == expected  # same inputs, same decision


def _enrolled(tmp_path: Path, nodes: list[int], run) -> dict[int, Context]:
    """Partners with identities on their own disks, and the roster of them all."""
    lines = [enrol(tmp_path / str(n), delta=run.delta, max_epsilon=run.max_epsilon)
             for n in nodes]
    (tmp_path / "roster.txt").write_text("\n".join(lines))
    return {n: Context(1, n, {"state-dir": str(tmp_path / str(n)),
                              "federation-roster": str(tmp_path / "roster.txt")},
                       RecordDict(), {}) for n in nodes}


def test_reply_carries_the_masked_vector_not_the_delta(tmp_path: Path) -> None:
    run = build_config({"secure-aggregation": True, "clients": 2, "example-dp": False})
    cfg = W.session_config(run, session_id=os.urandom(16), num_clients=2, vector_length=3)
    server = SecAggServer(cfg, 1)
    ctx = _enrolled(tmp_path, [10, 11], run)

    def send(node: int, part: dict, train: bool = False, delta=None) -> Message:
        down = ConfigRecord({W.SECAGG_ROUND: 1, **part})
        msg = Message(RecordDict({W.CONFIG: ConfigRecord(run.to_dict()), W.SECAGG: down}),
                      dst_node_id=node, message_type="train" if train else "train.secagg")
        plain = Message(RecordDict({
            W.ARRAYS: W.to_array_record(delta),
            W.METRICS: MetricRecord({W.NUM_EXAMPLES: rows[node]})}), reply_to=msg) \
            if train else None
        return S.secure_reply(msg, ctx[node], run, plain, delta)

    ids = {10: 1, 11: 2}
    rows = {10: 30, 11: 10}
    for node, cid in ids.items():
        up = send(node, {W.ADVERTISE: "[1]", "config/1": W.config_to_json(cfg), "id/1": cid})
        server.receive(SecAggMessage.from_bytes(up.content[W.SECAGG_UP]["advertise/1"]))
    assert "confide-secagg" in ctx[10].state.config_records  # secrets stay in the Context
    directory = server.key_directory().to_bytes()
    for node in ids:
        up = send(node, {"key-directory/1": directory})
        server.receive(SecAggMessage.from_bytes(up.content[W.SECAGG_UP]["share-keys/1"]))
    requests = server.masked_input_requests()
    delta = {"w": np.array([0.25, -0.5, 0.125], np.float32)}
    for node, cid in ids.items():
        sign = 1 if node == 10 else -1
        reply = send(node, {"masked-input-request/1": requests[cid].to_bytes()}, True,
                     {"w": sign * delta["w"]})
        assert W.ARRAYS not in reply.content.array_records  # no plaintext delta
        vector = reply.content[W.MASKED]["vector"].numpy()
        vote = reply.content[W.SECAGG_UP][W.MASKED_VOTE]
        server.receive(MaskedInput(cfg.session_id, 1, sender=cid, vector=vector, vote=vote))
    unmask = server.unmask_request().to_bytes()
    for node in ids:
        up = send(node, {"unmask-request/1": unmask})
        server.receive(SecAggMessage.from_bytes(up.content[W.SECAGG_UP]["unmask-shares/1"]))
    # weighted by rows, as the plaintext mean: (30 d - 10 d) over 40 rows
    result = server.result()
    rounding = UpdateEncoder(cfg).sum_error_bound(2)  # per coordinate, in weight units
    assert result.total_weight == pytest.approx(40, abs=rounding)
    np.testing.assert_allclose(result.weighted_sum, 20 * delta["w"], atol=rounding)
