"""What a node's reply says about its partner's records (confide.clients.disclosure): for
every privacy mode, the exact records and keys of every reply a node sends in a real
federation (the real ClientApp and server in one process), the public row count it reports
and computes with, and in shared mode the fixed work of a round."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Message
from torch import nn

from confide import wire as W
from confide.clients.disclosure import (
    dp_run,
    public_rows,
    reply_metrics,
    reported_rows,
)
from confide.config import RunConfig, build_config
from confide.privacy.mechanisms import SampledGaussian
from confide.privacy.secagg.shared_noise import padded_slots
from confide.server.federation import Federation
from confide.tasks.inputs import federated_data, model_spec
from tests.inprocess import InProcessGrid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# the demo's ~556 rows per partner (public count 560), one local step, fixed noise: fast
TINY = {"model": "tiny", "clients": 3, "rounds": 1, "max-length": 16, "num-labels": 2,
        "max-eval-examples": 16, "batch-size": 8, "physical-batch-size": 8,
        "local-epochs": 0.01, "noise-multiplier": 1.0, "preflight": "off", "seed": 3}
SECURE = {"secure-aggregation": True}
MODES: dict[str, dict[str, Any]] = {
    "none": {"example-dp": False},
    "none, secure aggregation": {"example-dp": False, **SECURE},
    "local noise": {},
    "local noise, secure aggregation": {"example-dp-noise": "local", **SECURE},
    "shared noise": {"local-epochs": 1.0, **SECURE},
    "client-level": {"example-dp": False, "client-dp": True},
    "client-level, local noise": {"client-dp": True},
    "distributed DP": {"example-dp": False, "distributed-dp": True, **SECURE},
    "distributed DP, local noise": {"distributed-dp": True, **SECURE},
}

# -- what each reply carries: record -> keys (round numbers written <q>) ---------------------
STATUS = {W.STATUS: {W.STATUS_CODE, W.STATUS_DETAIL, W.PARTNER, W.PUBLIC_KEY}}
# the receipt (empty without example DP) and the ledger head countersigned
RECEIPT = {W.RECEIPT: {W.RECEIPT_JSON, W.RECEIPT_HEAD}}
MECHANISM = {W.NUM_EXAMPLES, W.EPSILON, W.STEPS, W.SAMPLE_RATE, W.NOISE_MULTIPLIER}
RAW_STATISTICS = {W.TRAIN_LOSS, W.TRAIN_SECONDS}  # only where no DP is promised
PLAIN_UPDATE = {W.ARRAYS: {"<trainable weights>"}}
MASKED_UPDATE = {W.MASKED: {"vector"},
                 W.SECAGG_UP: {W.MASKED_ROUND, W.MASKED_SENDER, W.MASKED_VOTE}}
KEY_STAGES = [{W.SECAGG_UP: {f"{W.ADVERTISE}/<q>"}}, {W.SECAGG_UP: {f"{W.SHARE_KEYS}/<q>"}},
              {W.SECAGG_UP: {f"{W.UNMASK_SHARES}/<q>"}}]


def train_reply(update: dict[str, set[str]], raw: bool) -> dict[str, set[str]]:
    return {**update, **STATUS, **RECEIPT,
            W.METRICS: MECHANISM | (RAW_STATISTICS if raw else set())}


EXPECTED: dict[str, dict[str, list[dict[str, set[str]]]]] = {
    "none": {"train": [train_reply(PLAIN_UPDATE, raw=True)]},
    "none, secure aggregation": {"train": [train_reply(MASKED_UPDATE, raw=True)],
                                 W.SECAGG_MESSAGE_TYPE: KEY_STAGES},
    "local noise": {"train": [train_reply(PLAIN_UPDATE, raw=False)]},
    "local noise, secure aggregation": {"train": [train_reply(MASKED_UPDATE, raw=False)],
                                        W.SECAGG_MESSAGE_TYPE: KEY_STAGES},
    "shared noise": {"train": [train_reply(MASKED_UPDATE, raw=False)],
                     W.SECAGG_MESSAGE_TYPE: [{W.SECAGG_UP: {W.SHARED_INFO}}, *KEY_STAGES]},
    "client-level": {"train": [train_reply(PLAIN_UPDATE, raw=False)]},
    "client-level, local noise": {"train": [train_reply(PLAIN_UPDATE, raw=False)]},
    "distributed DP": {"train": [train_reply(MASKED_UPDATE, raw=False)],
                       W.SECAGG_MESSAGE_TYPE: KEY_STAGES},
    "distributed DP, local noise": {"train": [train_reply(MASKED_UPDATE, raw=False)],
                                    W.SECAGG_MESSAGE_TYPE: KEY_STAGES},
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every reply with the type of message it answers."""

    def __init__(self, nodes: int) -> None:
        super().__init__(nodes)
        self.replies: list[tuple[str, int, Message]] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        kinds = {m.metadata.dst_node_id: m.metadata.message_type for m in messages}
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies += [(kinds[r.metadata.src_node_id], r.metadata.src_node_id, r)
                         for r in replies]
        return replies


def fields(reply: Message, trainable: set[str]) -> dict[str, set[str]]:
    """record -> its keys, round numbers as <q>; an update's weights as one name."""
    out = {}
    for name, record in reply.content.items():
        keys = {re.sub(r"/\d+(?=/|$)", "/<q>", str(k)) for k in record}
        if name == W.ARRAYS:
            assert set(record) == trainable, "an update names exactly the trainable weights"
            keys = {"<trainable weights>"}
        out[name] = keys
    return out


def canonical(shapes: Iterable[dict[str, set[str]]]) -> list[str]:
    return sorted({json.dumps({k: sorted(v) for k, v in s.items()}, sort_keys=True)
                   for s in shapes})


def embedding(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, nn.Embedding))


@pytest.mark.parametrize("mode", list(MODES))
def test_every_reply_carries_exactly_the_fields_of_its_privacy_mode(tmp_path: Path,
                                                                    mode: str) -> None:
    cfg = build_config({**TINY, **MODES[mode], "out": str(tmp_path / "run")})
    assert (cfg.example_dp_noise == "shared") == (mode == "shared noise")
    grid = RecordingGrid(cfg.clients)
    rows = {node: len(p) for node, p in zip(grid.contexts, federated_data(cfg).partitions,
                                            strict=True)}
    forwards = _count_node_forwards(cfg) if mode == "shared noise" else None
    fed = Federation.open(grid, cfg, Path(cfg.out))
    assert fed.run()["rounds_completed"] == 1
    if forwards is not None:
        forwards[0].remove()

    seen: dict[str, list[dict[str, set[str]]]] = {}
    for kind, node, reply in grid.replies:
        assert not reply.has_error(), reply.error.reason
        seen.setdefault(kind, []).append(fields(reply, set(fed.global_state)))
        public = public_rows(rows[node]) if dp_run(cfg) else rows[node]
        if W.METRICS in reply.content:
            metrics = reply.content[W.METRICS]
            # the count it reports is the one its rate was computed from
            assert metrics[W.NUM_EXAMPLES] == public
            if cfg.example_dp_noise == "local":
                assert metrics[W.SAMPLE_RATE] == pytest.approx(cfg.batch_size / public)
        up = reply.content.config_records.get(W.SECAGG_UP)
        if up is not None and W.SHARED_INFO in up:
            assert json.loads(str(up[W.SHARED_INFO]))["examples"] == public
    assert {k: canonical(v) for k, v in seen.items()} == \
        {k: canonical(v) for k, v in EXPECTED[mode].items()}
    if dp_run(cfg):
        assert all(public_rows(n) != n for n in rows.values())  # the test can tell them apart

    if forwards is not None:
        # shared noise: every partner put exactly its padded budget of example slots through
        # the model, at one token width, whatever its Poisson sample held
        q = cfg.batch_size / sum(public_rows(n) for n in rows.values())
        slots = {padded_slots(public_rows(n), q)[0] for n in rows.values()}
        assert len(slots) == 1  # equal public counts: equal budgets
        calls = forwards[1]
        assert sum(r for r, _ in calls) == len(rows) * slots.pop()
        assert len({w for _, w in calls}) == 1


def _count_node_forwards(cfg: RunConfig) -> tuple[Any, list[tuple[int, int]]]:
    """(hook handle, [(rows, width)] of every forward pass of the nodes' model)."""
    from confide.clients.local_round import _cached_model

    calls: list[tuple[int, int]] = []
    model = _cached_model(model_spec(cfg, cfg.num_labels))
    handle = embedding(model).register_forward_hook(
        lambda _m, args, _out: calls.append(tuple(args[0].shape)))
    return handle, calls


# -- the rules, one by one ------------------------------------------------------------------

@pytest.mark.parametrize(("n", "public"), [(0, 100), (37, 100), (100, 100), (101, 110),
                                           (999, 1000), (4873, 4900), (5000, 5000),
                                           (123_456, 130_000)])
def test_the_public_row_count_is_rounded_up_to_two_significant_digits(n: int, public: int
                                                                      ) -> None:
    assert public_rows(n) == public


def test_the_public_row_count_never_understates_and_overstates_by_at_most_ten_percent(
) -> None:
    for n in range(0, 20_000, 7):
        assert n <= public_rows(n) <= max(100, 1.1 * n)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "12"])
def test_a_row_count_that_is_not_a_count_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match="row count must be an integer"):
        public_rows(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("mode", "private"), [
    ({"example-dp": False}, False), ({}, True),
    ({"example-dp": False, "client-dp": True}, True),
    ({"example-dp": False, "secure-aggregation": True, "distributed-dp": True}, True)])
def test_loss_time_and_the_exact_count_leave_the_node_only_without_dp(
        mode: dict[str, Any], private: bool) -> None:
    cfg = build_config(mode)
    assert dp_run(cfg) is private
    assert reported_rows(cfg, 4873) == (4900 if private else 4873)
    metrics = reply_metrics(cfg, rows=reported_rows(cfg, 4873), epsilon=0.5,
                            mechanism=SampledGaussian(1.0, 0.01, 3), train_loss=0.7,
                            train_seconds=2.0)
    assert (W.TRAIN_LOSS in metrics, W.TRAIN_SECONDS in metrics) == (not private,
                                                                      not private)
    assert metrics[W.STEPS] == 3 and metrics[W.SAMPLE_RATE] == 0.01
