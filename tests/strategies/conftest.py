"""Build Flower messages in-process (no runtime) for strategy tests."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from confide import wire as W


@pytest.fixture(autouse=True)
def task_identity() -> None:
    # Messages outside a Flower runtime need a run/task identity to be constructed.
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0


def reply(node: int, delta: dict[str, np.ndarray], examples: float) -> Message:
    sent = Message(RecordDict({}), dst_node_id=node, message_type="train")
    return Message(RecordDict({W.ARRAYS: W.to_array_record(delta),
                               W.METRICS: MetricRecord({W.NUM_EXAMPLES: examples})}),
                   reply_to=sent)
