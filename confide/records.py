"""Names of the records and keys that travel in Flower messages between server and nodes.

One place for them, so client, server, strategies and tests cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

# RecordDict entries
ARRAYS = "arrays"  # ArrayRecord: global trainable weights (to nodes) or a delta (from nodes)
CONFIG = "config"  # ConfigRecord: the run configuration + round facts (to nodes)
METRICS = "metrics"  # MetricRecord: numbers about the local round (from nodes)
STATUS = "status"  # ConfigRecord: outcome of the local round (from nodes)
RECEIPT = "receipt"  # ConfigRecord: the partner-signed DP event (from nodes)

# CONFIG keys beyond the run configuration
ROUND = "server-round"
RUN_KEY = "run-key"  # the server's ledger public key: names the run, stable across resume
FROZEN_DIGEST = "frozen-digest"

# METRICS keys
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
STEPS = "steps"
SAMPLE_RATE = "sample-rate"
NOISE_MULTIPLIER = "noise-multiplier"
TRAIN_SECONDS = "train-seconds"

# STATUS keys and codes
STATUS_CODE = "code"
STATUS_DETAIL = "detail"
PARTNER = "partner"
PUBLIC_KEY = "public-key"
OK = "ok"
STALE = "stale-message"
BUDGET_EXHAUSTED = "budget-exhausted"

# RECEIPT keys
RECEIPT_JSON = "json"


def to_array_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """name -> numpy array, in order, as a Flower ArrayRecord."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}
