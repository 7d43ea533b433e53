"""The server's secure-aggregation adapter driven with in-process Flower messages: a local
grid hands each message to the node's real adapter (`secure_client.secure_reply`) with its
own Context, so the folding, the Context.state persistence and the validation all run as in
a deployment, without a runtime or training."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from confide import wire as W
from confide.clients import secure_client as S
from confide.clients.identity import enrol
from confide.config import ConfigError, RunConfig, build_config
from confide.privacy import ledger_events as E
from confide.privacy.mechanisms import DistributedDiscreteGaussian
from confide.privacy.replay import replay_client_level
from confide.server.exchange import exchange
from confide.server.partners import PartnerBook
from confide.server.secure_round import SecureRounds
from confide.strategies.delta_fedavg import DeltaFedAvg

SHAPES = {"a": (3, 4), "b": (5,)}


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0


def node_delta(node: int, server_round: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node * 100 + server_round)
    return {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}


def node_rows(node: int) -> int:
    return 4 + 3 * (node % 7)  # unequal, so weighting shows


Tamper = Callable[[int, Message, Message], Message]


class LocalGrid:
    """Routes messages to in-process nodes. `drop[(round, kind)]` lists nodes that answer
    with an error (kind 'train' or 'secagg'); `tamper(node, sent, reply)` may alter a
    reply."""

    def __init__(self, n: int, cfg: RunConfig) -> None:
        self.cfg = cfg
        # each partner's identity on its own disk, and the federation's roster of them all
        self.root = Path(tempfile.mkdtemp(prefix="confide-partners-"))
        lines = [enrol(self.root / f"node-{i}", delta=cfg.delta, max_epsilon=cfg.max_epsilon)
                 for i in range(n)]
        (self.root / "roster.txt").write_text("\n".join(lines) + "\n")
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i,
                              node_config={"partition-id": i, "num-partitions": n,
                                           "state-dir": str(self.root / f"node-{i}"),
                                           "federation-roster": str(self.root / "roster.txt")},
                              state=RecordDict(), run_config={})
            for i in range(n)}
        self.drop: dict[tuple[int, str], set[int]] = {}
        self.tamper: Tamper | None = None
        self.tamper_down: Callable[[int, Message], None] | None = None  # a malicious server
        self.trained: dict[int, dict[int, dict[str, np.ndarray]]] = {}  # round -> node -> delta

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            server_round = int(msg.content.config_records[W.SECAGG][W.SECAGG_ROUND])
            kind = "train" if msg.metadata.message_type == "train" else "secagg"
            if node in self.drop.get((server_round, kind), set()):
                out.append(Message(Error(701, "dropped"), reply_to=msg))
                continue
            ctx = self.contexts[node]
            if self.tamper_down is not None:
                self.tamper_down(node, msg)
            if kind == "train":
                delta = node_delta(node, server_round)
                self.trained.setdefault(server_round, {})[node] = delta
                plain = Message(RecordDict({
                    W.ARRAYS: W.to_array_record(delta),
                    W.METRICS: MetricRecord({W.NUM_EXAMPLES: node_rows(node)}),
                    W.STATUS: ConfigRecord({W.STATUS_CODE: W.OK, W.STATUS_DETAIL: "",
                                            W.PARTNER: f"p{node}", W.PUBLIC_KEY: f"k{node}"})}),
                    reply_to=msg)
                reply = S.secure_reply(msg, ctx, self.cfg, plain, delta)
            else:
                reply = S.secure_reply(msg, ctx, self.cfg, None, None)
            if self.tamper is not None:
                reply = self.tamper(node, msg, reply)
            out.append(reply)
        return out


class FakeLedger:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def append(self, event: E.LedgerEvent) -> int:
        self.entries.append((event.TYPE, event.to_payload()))
        return len(self.entries) - 1

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [p for k, p in self.entries if k == kind]


class FakeFederation:
    """What the adapter reads from its host (confide.server.aggregation.RoundHost); the
    replies are recorded by the real PartnerBook."""

    first_round = True
    run_key = ""

    def __init__(self, cfg: RunConfig, grid: LocalGrid) -> None:
        self.cfg, self.grid, self.timeout = cfg, grid, 10.0
        self.global_state = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
        self.ledger = FakeLedger()
        self.run_dir = Path(cfg.out)  # nothing is written: for crash points only
        self.book = PartnerBook(cfg)
        self.inner = DeltaFedAvg(server_learning_rate=1.0)
        self.client_dp_epsilon: float | None = None

    def record(self, event: E.LedgerEvent) -> int:
        return self.ledger.append(event)

    def entry_hash_at(self, index: int) -> str | None:
        return None

    def server_step(self, mean_delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.step(self.global_state, mean_delta)

    def partner_rows_known(self, rows: list[int]) -> None:
        pass

    def exchange(self, messages: list[Message], what: str) -> list[Message]:
        return exchange(self.grid, messages, timeout=self.timeout)


def make(n: int = 5, rounds: int = 2, **kw: Any) -> tuple[FakeFederation, SecureRounds]:
    values = {"secure-aggregation": True, "example-dp": False, "rounds": rounds, "clients": n,
              "seed": 7, "secagg-clip": 1.0, **kw}
    cfg = build_config(values)
    fed = FakeFederation(cfg, LocalGrid(n, cfg))
    return fed, SecureRounds(fed, simulation=True)  # type: ignore[arg-type]


def expected_mean(fed: FakeFederation, server_round: int, survivors: list[int]
                  ) -> dict[str, np.ndarray]:
    """The plaintext mean of the survivors' (clipped) deltas: weighted by rows, as
    DeltaFedAvg weights them, unless distributed DP counts each once."""
    deltas = [fed.grid.trained[server_round][n] for n in survivors]
    weights = [1 if fed.cfg.distributed_dp else node_rows(n) for n in survivors]
    return {k: np.average([np.clip(d[k], -1, 1) for d in deltas], axis=0, weights=weights)
            for k in SHAPES}


def run(fed: FakeFederation, secure: SecureRounds, server_round: int) -> dict[str, Any]:
    before = {k: v.copy() for k, v in fed.global_state.items()}
    outcome = secure.run_round(server_round, ConfigRecord(fed.cfg.to_dict()))
    for event in outcome.events:  # as Federation.run_round adopts an outcome
        fed.record(event)
    if outcome.client_level_epsilon is not None:
        fed.client_dp_epsilon = outcome.client_level_epsilon
    if outcome.aggregate is not None:
        fed.global_state = outcome.aggregate
    return {"before": before, "sampled": outcome.sampled, "aggregated": outcome.aggregated,
            "uploaded": outcome.uploaded, "dropped": outcome.dropped, **outcome.metrics}


def test_two_rounds_fold_into_two_exchanges_each() -> None:
    fed, secure = make()
    sent: list[int] = []
    original = fed.grid.send_and_receive

    def counting(messages: list[Message], timeout: float) -> list[Message]:
        sent.append(len(messages))
        return original(messages, timeout)

    fed.grid.send_and_receive = counting  # type: ignore[method-assign]
    r1 = run(fed, secure, 1)
    assert len(sent) == 4  # 2 setup + fit + unmask
    nodes = r1["sampled"]
    step = r1["secagg_quantization_step"]
    want = expected_mean(fed, 1, nodes)
    for k in SHAPES:
        np.testing.assert_allclose(fed.global_state[k], want[k], atol=step * 2 + 1e-6)
    r2 = run(fed, secure, 2)
    assert len(sent) == 6  # steady state: fit + unmask only
    assert r2["secagg_survivors"] == 5 and r2["uploaded"] > 0
    events = fed.ledger.of(E.SECURE_AGGREGATION)
    assert [e["round"] for e in events] == [1, 2]
    assert all(e["aborted"] is None and len(e["participants"]) == 5 for e in events)
    # the plaintext delta never travelled: no reply carried W.ARRAYS
    assert secure.sessions == {}


def test_masked_input_dropout_is_tolerated_and_unmasked() -> None:
    fed, secure = make(n=6)
    fed.grid.drop[(1, "train")] = {1002}
    r1 = run(fed, secure, 1)
    survivors = [n for n in r1["sampled"] if n != 1002]
    assert r1["secagg_survivors"] == 5 and r1["secagg_dropouts"] == 1
    want = expected_mean(fed, 1, survivors)
    for k in SHAPES:
        np.testing.assert_allclose(fed.global_state[k], want[k],
                                   atol=r1["secagg_quantization_step"] * 2 + 1e-6)
    # folded: node 1002 also lost its ShareKeys(2), so it sits out round 2 (not an error)
    r2 = run(fed, secure, 2)
    assert r2["secagg_survivors"] == 5 and r2["secagg_aborted"] is None


def test_too_few_survivors_abort_cleanly_and_the_run_continues() -> None:
    fed, secure = make(n=5, rounds=3)
    fed.grid.drop[(1, "train")] = {1000, 1001, 1002}
    r1 = run(fed, secure, 1)
    assert r1["secagg_aborted"] and "aborted" in r1["secagg_aborted"]
    assert r1["aggregated"] == []
    for k in SHAPES:
        np.testing.assert_array_equal(fed.global_state[k], r1["before"][k])
    r2 = run(fed, secure, 2)  # the dropped nodes missed round 2's key shares: aborts too
    assert r2["secagg_aborted"]
    r3 = run(fed, secure, 3)  # they advertised for round 3 during round 1's unmask
    assert r3["secagg_aborted"] is None and r3["secagg_survivors"] == 5
    events = fed.ledger.of(E.SECURE_AGGREGATION)
    assert [bool(e["aborted"]) for e in events] == [True, True, False]
    assert E.SecureAggregationEvent.from_payload(events[0]).abort is not None


def test_invalid_messages_are_rejected_naming_the_node() -> None:
    fed, secure = make(n=7, **{"secagg-threshold": 0.55})  # t = 4 of 7

    def tamper(node: int, sent: Message, reply: Message) -> Message:
        if sent.metadata.message_type != "train" or reply.has_error():
            return reply
        if node == 1001:  # wrong length
            v = reply.content[W.MASKED]["vector"].numpy()
            reply.content[W.MASKED] = ArrayRecord({"vector": Array(v[:-1].copy())})
        if node == 1002:  # wrong dtype
            v = reply.content[W.MASKED]["vector"].numpy()
            reply.content[W.MASKED] = ArrayRecord({"vector": Array(v.astype(np.uint64))})
        if node == 1003:  # replayed from an earlier round
            reply.content[W.SECAGG_UP][W.MASKED_ROUND] = 0
        return reply

    fed.grid.tamper = tamper
    r1 = run(fed, secure, 1)
    assert r1["secagg_survivors"] == 4 and r1["secagg_aborted"] is None
    # named by pseudonym, the one name of each partner (they answered with it)
    assert set(r1["dropped"]) == {"p1001", "p1002", "p1003"}
    want = expected_mean(fed, 1, [1000, 1004, 1005, 1006])
    for k in SHAPES:
        np.testing.assert_allclose(fed.global_state[k], want[k],
                                   atol=r1["secagg_quantization_step"] * 2 + 1e-6)


def test_reply_from_a_node_not_sampled_is_rejected() -> None:
    fed, secure = make(n=4)
    secure.setup(1, ConfigRecord(fed.cfg.to_dict()))
    session = secure.sessions[1]
    stranger = Message(RecordDict({}), dst_node_id=4242, message_type="train")
    reply = Message(RecordDict({W.SECAGG_UP: ConfigRecord({})}), reply_to=stranger)
    assert not secure.consume(session, reply, "share-keys/1", object)  # type: ignore[arg-type]
    assert "node 4242 was not sampled" in session.rejected[4242]


def test_verify_and_distributed_dp_ledger_replays() -> None:
    fed, secure = make(n=6, **{"distributed-dp": True, "verify-secagg": True,
                               "client-dp-noise-multiplier": 0.5,
                               "client-dp-clipping-norm": 1.0})
    fed.grid.drop[(1, "train")] = {1005}
    rows = [run(fed, secure, r) for r in (1, 2)]
    for row in rows:
        assert row["secagg_max_abs_error"] <= row["secagg_quantization_step"]
        assert row["secagg_ring_sum_equal"] is True
    events = [E.ClientDpEvent.from_payload(p) for p in fed.ledger.of(E.CLIENT_DP)]
    assert [type(e.mechanism) for e in events] == [DistributedDiscreteGaussian] * 2
    replayed = replay_client_level(events, fed.cfg.delta).epsilons
    assert replayed == pytest.approx([e.epsilon_claimed for e in events], rel=1e-12)
    assert fed.client_dp_epsilon == pytest.approx(replayed[-1])
    assert replayed[1] > replayed[0] > 0


def test_simulation_only_options_are_refused_in_deployment() -> None:
    cfg = build_config({"secure-aggregation": True, "verify-secagg": True, "clients": 4})
    fed = FakeFederation(cfg, LocalGrid(4, cfg))
    with pytest.raises(ConfigError, match="only in simulation"):
        SecureRounds(fed, simulation=False)  # type: ignore[arg-type]
    cfg = build_config({"secure-aggregation": True, "dropout-rate": 0.2, "clients": 4})
    with pytest.raises(ConfigError, match="only in simulation"):
        SecureRounds(FakeFederation(cfg, LocalGrid(4, cfg)), simulation=False)  # type: ignore[arg-type]
    # client-dp on a secure sum: the privacy mode refuses it with the configuration
    with pytest.raises(ConfigError, match="use distributed-dp"):
        build_config({"secure-aggregation": True, "client-dp": True, "clients": 4})


def test_a_partner_refusal_is_signed_into_the_round_entry() -> None:
    """Partner 1000's roster lacks partner 1004 (as if the server had slipped it in): 1000
    refuses the key directory, and its signed refusal lands in the round's ledger entry."""
    from confide.privacy.secagg.identity import refusal_verifies

    fed, secure = make(n=5, **{"secagg-threshold": 0.51})
    root = fed.grid.root
    lines = (root / "roster.txt").read_text().splitlines()
    own = root / "roster-1000.txt"
    own.write_text("\n".join(lines[:4]) + "\n")  # everyone but partner 1004
    fed.grid.contexts[1000].node_config["federation-roster"] = str(own)
    run(fed, secure, 1)
    event = fed.ledger.of(E.SECURE_AGGREGATION)[0]
    refusals = event["refusals"]
    assert [r["stage"] for r in refusals] == ["share-keys"]
    assert "not on this partner's federation roster" in refusals[0]["reason"]
    assert refusals[0]["identity"] == lines[0].split()[0] and refusal_verifies(refusals[0])
    assert not refusal_verifies({**refusals[0], "reason": "nothing to see"})
    assert E.SecureAggregationEvent.from_payload(event).refusals == refusals


def test_equivocating_server_gets_no_unmask_shares_through_the_adapters() -> None:
    """The server keeps every masked input, then tells half of the partners "the others
    dropped" (with the votes it holds) and the other half the reverse: through the real
    adapters, every partner refuses, signed, and nothing is unmasked."""
    from confide.privacy.secagg import UnmaskRequest

    fed, secure = make(n=4)
    unmask_key = f"{W.UNMASK_REQUEST}/1"
    answered: list[str] = []

    def equivocate(node: int, msg: Message) -> None:
        down = msg.content.config_records[W.SECAGG]
        if unmask_key not in down:
            return
        honest = UnmaskRequest.from_bytes(bytes(down[unmask_key]))
        ids = sorted(honest.survivors)
        half = set(ids[:2]) if node in (1000, 1001) else set(ids[2:])
        down[unmask_key] = UnmaskRequest(
            honest.session_id, 1, survivors=tuple(sorted(half)),
            dropped=tuple(sorted(set(ids) - half)), votes=honest.votes).to_bytes()

    def spy(node: int, sent: Message, reply: Message) -> Message:
        up = reply.content.config_records.get(W.SECAGG_UP)
        if up is not None and f"{W.UNMASK_SHARES}/1" in up:
            answered.append(f"node {node}")
        return reply

    fed.grid.tamper_down, fed.grid.tamper = equivocate, spy
    r1 = run(fed, secure, 1)
    assert answered == []  # not one share left a partner
    assert r1["secagg_aborted"] is not None
    refusals = fed.ledger.of(E.SECURE_AGGREGATION)[0]["refusals"]
    assert len(refusals) == 4 and all(r["stage"] == "unmask" for r in refusals)
    assert all("survivors" in r["reason"] for r in refusals)


def test_the_round_entry_says_it_was_authenticated() -> None:
    fed, secure = make(n=4)
    run(fed, secure, 1)
    event = fed.ledger.of(E.SECURE_AGGREGATION)[0]
    assert event["authenticated"] is True
    assert E.SecureAggregationEvent.from_payload(event).authenticated is True
