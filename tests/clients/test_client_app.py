"""The ClientApp's train handler driven in-process: budget guard, replay guard, bad node
configuration, a base model that differs from the server's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from confide import wire as W
from confide.clients import client_app
from confide.clients.local_round import NodeConfigError
from confide.config import build_config
from confide.model import frozen_digest, trainable_state
from confide.privacy.receipts import Receipt, verify_receipt
from confide.tasks import build_model
from confide.tasks.inputs import model_spec


def train_message(cfg, server_round: int = 1, frozen: str | None = None) -> Message:
    model = build_model(model_spec(cfg, cfg.num_labels))
    config = ConfigRecord({**cfg.to_dict(), W.ROUND: server_round, W.RUN_KEY: "run-1",
                           W.FROZEN_DIGEST: frozen or frozen_digest(model)})
    return Message(RecordDict({W.ARRAYS: W.to_array_record(trainable_state(model)),
                               W.CONFIG: config}), dst_node_id=5, message_type="train")


def node(tmp_path: Path, **extra: object) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": 0, "num-partitions": 2,
                                                     **extra},
                   state=RecordDict(), run_config={})


@pytest.fixture
def cfg(tmp_path: Path):
    return build_config({"model": "tiny", "clients": 2, "num-labels": 2, "max-length": 16,
                         "noise-multiplier": 1.0, "batch-size": 64, "physical-batch-size": 64,
                         "max-epsilon": 20.0, "target-epsilon": 8.0, "local-epochs": 0.5,
                         "out": str(tmp_path / "run")})


def test_trains_and_signs_a_receipt_then_refuses_when_budget_runs_out(cfg, tmp_path) -> None:
    ctx = node(tmp_path)
    out = client_app.train(train_message(cfg, 1), ctx)
    assert out.content[W.STATUS][W.STATUS_CODE] == W.OK
    receipt = Receipt.from_dict(json.loads(out.content[W.RECEIPT][W.RECEIPT_JSON]))
    verify_receipt(receipt)
    eps1 = receipt.payload["epsilon"]
    assert eps1 == pytest.approx(out.content[W.METRICS][W.EPSILON])
    # the partner lowers its own cap below what the next round would cost
    capped = node(tmp_path, **{"max-epsilon": eps1 * 1.05})
    capped.state = ctx.state
    second = client_app.train(train_message(cfg, 2), capped)
    status = second.content[W.STATUS]
    assert status[W.STATUS_CODE] == W.BUDGET_EXHAUSTED
    assert W.ARRAYS not in second.content.array_records, "a refusal carries no update"
    assert status["spent"] == pytest.approx(eps1)
    # the on-disk state still records only the one round that was trained
    state = json.loads((Path(cfg.out) / "partners" / "partition-0" / "node_state.json")
                       .read_text())
    assert [e["round"] for e in state["accountant"]["history"]] == [1]


def test_a_replayed_message_does_not_spend_budget_twice(cfg, tmp_path) -> None:
    ctx = node(tmp_path)
    msg = train_message(cfg, 1)
    client_app.train(msg, ctx)
    again = client_app.train(msg, ctx)
    assert again.content[W.STATUS][W.STATUS_CODE] == W.STALE
    state = json.loads((Path(cfg.out) / "partners" / "partition-0" / "node_state.json")
                       .read_text())
    assert len(state["accountant"]["history"]) == 1


def test_different_base_model_is_refused(cfg, tmp_path) -> None:
    with pytest.raises(NodeConfigError, match="frozen base model differs"):
        client_app.train(train_message(cfg, 1, frozen="0" * 64), node(tmp_path))


@pytest.mark.parametrize(("value", "needle"), [("lots", "is not a number"),
                                               (-1.0, "must be > 0")])
def test_bad_node_max_epsilon_is_named(cfg, tmp_path, value: object, needle: str) -> None:
    with pytest.raises(NodeConfigError, match=needle):
        client_app.train(train_message(cfg, 1), node(tmp_path, **{"max-epsilon": value}))


def test_the_client_app_answers_secure_aggregation_stages_without_the_training_stack(
) -> None:
    # A deployed node starts a fresh process per message: the key setup, shares and
    # unmasking must not pay for importing torch, transformers and Opacus.
    import subprocess
    import sys

    code = ("import sys, confide.clients.client_app; print(sorted(m for m in "
            "('torch', 'transformers', 'opacus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.strip() == "[]"
