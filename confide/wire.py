"""What travels in Flower messages between server and nodes: record names, keys, encodings.

One place for them, so client, server, strategies and tests cannot drift apart; both sides
import this module and neither imports the other.

Secure aggregation (down = server to node, in ConfigRecord `SECAGG`; up = node to server, in
ConfigRecord `SECAGG_UP`, the masked vector in ArrayRecord `MASKED`):
  down  round, config/<q> (JSON of the SecAggConfig of secure round q), id/<q> (this node's
        client id in q), advertise (JSON list of rounds), key-directory/<q>,
        masked-input-request/<q>, consistency-request/<q>, unmask-request/<q>, verify (bool),
        shared/<q>, shared-info
  up    advertise/<q>, share-keys/<q>, masked-round, masked-sender, masked-vote,
        consistency-vote/<q>, unmask-shares/<q>, error/<q>/<stage>, refusal/<q>/<stage>
        (signed), verify-only (bool; with
        ArrayRecord `VERIFY`), shared-info
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from confide.config import RunConfig
from confide.modes import ClientLevel
from confide.privacy.reply_fields import EPSILON as EPSILON
from confide.privacy.reply_fields import NOISE_MULTIPLIER as NOISE_MULTIPLIER
from confide.privacy.reply_fields import NUM_EXAMPLES as NUM_EXAMPLES
from confide.privacy.reply_fields import SAMPLE_RATE as SAMPLE_RATE
from confide.privacy.reply_fields import STEPS as STEPS
from confide.privacy.reply_fields import TRAIN_LOSS as TRAIN_LOSS
from confide.privacy.reply_fields import TRAIN_SECONDS as TRAIN_SECONDS
from confide.privacy.secagg import SecAggConfig

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message

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
# the run's ledger head when the round started (index, entry hash): each partner that takes
# part countersigns it (confide.privacy.receipts.sign_head)
LEDGER_HEAD_INDEX = "ledger-head-index"
LEDGER_HEAD_HASH = "ledger-head-hash"

# METRICS keys: confide.privacy.reply_fields (which of them a reply carries is its mode's rule)

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
# JSON list of receipts the node signed in earlier attempts of the same round of the run
# (the server died before recording them): their spend is recorded too
RECEIPT_EARLIER = "earlier"
# JSON of the partner's countersignature of the ledger head its train message named
RECEIPT_HEAD = "head"

# RecordDict entry of a train message: the receipts of the node's partner that the server's
# ledger holds for this run (key ACKNOWLEDGED: JSON list of `receipt_ack_name`s), so the
# node stops re-sending them. Absent when the server does not know the node's partner yet.
RECORDED = "recorded"
ACKNOWLEDGED = "receipts"
# JSON object: receipt_ack_name -> index of the ledger entry that holds it. A node forgets
# a receipt only once it countersigns a head at or after that entry (the bare list above,
# which nodes of earlier versions read, is a server's word only)
ACKNOWLEDGED_AT = "receipts-at"
_ACK_DIGITS = 16  # 64 bits of the signature: names one of a partner's receipts


def receipt_ack_name(signature_hex: str) -> str:
    """How an acknowledgement names a receipt: the start of its signature."""
    return str(signature_hex)[:_ACK_DIGITS]


def acknowledged_receipts(message: Message) -> set[str] | None:
    """The `receipt_ack_name`s a train message acknowledges (None: it says nothing)."""
    if RECORDED not in message.content.config_records:
        return None
    return {str(a) for a in json.loads(str(message.content[RECORDED][ACKNOWLEDGED]))}


def acknowledged_at(message: Message) -> dict[str, int] | None:
    """receipt_ack_name -> ledger index of the receipts a train message acknowledges (None:
    it says nothing, or only names them, as servers of earlier versions did)."""
    if RECORDED not in message.content.config_records or \
            ACKNOWLEDGED_AT not in message.content[RECORDED]:
        return None
    data = json.loads(str(message.content[RECORDED][ACKNOWLEDGED_AT]))
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else None


def ledger_head(config: Mapping[str, object]) -> tuple[int, str] | None:
    """The ledger head (index, entry hash) a round's configuration names, None if none."""
    index, head = config.get(LEDGER_HEAD_INDEX), config.get(LEDGER_HEAD_HASH)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0 \
            or not isinstance(head, str):
        return None
    return index, head


def reported_num_examples(reply: Message) -> object:
    """What a node's reply reports as NUM_EXAMPLES in its metrics, as sent (None if absent)."""
    return reply.content[METRICS].get(NUM_EXAMPLES) if METRICS in reply.content else None


def reported_rows(reply: Message) -> float | None:
    """The training rows a node's reply reports (its metrics' NUM_EXAMPLES, the weight of
    its update in the mean), or None unless that is a positive finite number."""
    rows = reported_num_examples(reply)
    if isinstance(rows, bool) or not isinstance(rows, int | float) or not rows > 0 \
            or not math.isfinite(rows):
        return None
    return float(rows)


def to_array_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """name -> numpy array, in order, as a Flower ArrayRecord."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


# -- secure aggregation --------------------------------------------------------------------
SECAGG = "secagg"  # ConfigRecord, down
SECAGG_UP = "secagg-up"  # ConfigRecord, up
MASKED = "secagg-masked"  # ArrayRecord, up: {"vector": uint32/uint64}
VERIFY = "secagg-verify"  # ArrayRecord, up, simulation only: {"encoded": pre-mask vector}
SECAGG_MESSAGE_TYPE = "train.secagg"  # setup / key-only / unmask exchanges
# the server asks a node for its receipts of the run the ledger may lack (no training)
RECEIPTS_MESSAGE_TYPE = "train.receipts"
SECAGG_ROUND = "round"
ADVERTISE = "advertise"
KEY_DIRECTORY = "key-directory"
MASKED_REQUEST = "masked-input-request"
UNMASK_REQUEST = "unmask-request"
SHARE_KEYS = "share-keys"
UNMASK_SHARES = "unmask-shares"
MASKED_ROUND = "masked-round"
MASKED_SENDER = "masked-sender"
MASKED_VOTE = "masked-vote"  # up: the node's consistency vote sent with its masked input
CONSISTENCY_REQUEST = "consistency-request"  # down, only after a masked-input dropout
CONSISTENCY_VOTE = "consistency-vote"
REFUSAL = "refusal"  # up: refusal/<q>/<stage> = a partner's signed refusal (JSON)
VERIFY_FLAG = "verify"
VERIFY_ONLY = "verify-only"
SHARED = "shared"  # down: shared/<q> = SharedNoiseConfig JSON of round q (shared noise)
SHARED_INFO = "shared-info"  # down: True asks the node for its rows and rate; up: that JSON


def flatten(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """Trainable tensors in sorted name order as one float64 vector (both sides sort, so
    the order does not depend on how a record was built)."""
    if not state:
        return np.zeros(0)
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel()
                           for k in sorted(state)])


def unflatten(vector: np.ndarray, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    pos = 0
    for name in sorted(reference):
        ref = reference[name]
        out[name] = vector[pos:pos + ref.size].reshape(ref.shape)
        pos += ref.size
    if pos != vector.size:
        raise ValueError(f"vector of length {vector.size} does not match {pos} parameters")
    return {k: out[k] for k in reference}  # the reference's order


_WIRE_FIELDS = ("num_clients", "vector_length", "degree", "threshold", "min_survivors", "bits",
                "coord_clip", "l2_clip", "max_weight", "noise_stddev")


def config_to_json(config: SecAggConfig) -> str:
    values = {f: getattr(config, f) for f in _WIRE_FIELDS}
    return json.dumps({"session": config.session_id.hex(), **values}, sort_keys=True)


def config_from_json(text: str) -> SecAggConfig:
    data = json.loads(text)
    return SecAggConfig(bytes.fromhex(data.pop("session")), **data)


def session_config(cfg: RunConfig, *, session_id: bytes, num_clients: int,
                   vector_length: int) -> SecAggConfig:
    """The SecAggConfig of one secure round from the run configuration.

    Threshold: `secagg-threshold` is a fraction of the closed neighbourhood (k + 1 parties,
    which is all sampled clients when the graph is complete), t = ceil(fraction * (k + 1))
    clamped to [2, k + 1]. Distributed DP: total noise stddev = client-dp-noise-multiplier x
    client-dp-clipping-norm in update units, L2 clip = client-dp-clipping-norm. Weights: an
    update's rows, capped at secagg-max-weight, where the sum is weighted (`RunConfig.
    secure_sum_weighted`); 1 each otherwise."""
    base = SecAggConfig(session_id, num_clients=num_clients, vector_length=vector_length,
                        degree=cfg.secagg_neighbours or None, bits=cfg.secagg_bits,
                        coord_clip=cfg.secagg_clip,
                        max_weight=float(cfg.secagg_max_weight if cfg.secure_sum_weighted
                                         else 1))
    k = int(base.degree)  # type: ignore[arg-type]  # resolved to an int in __post_init__
    t = min(k + 1, max(2, math.ceil(cfg.secagg_threshold * (k + 1))))
    noise = (cfg.client_dp_noise_multiplier * cfg.client_dp_clipping_norm
             if cfg.privacy_mode.client is ClientLevel.DISTRIBUTED else None)
    return dataclasses.replace(base, threshold=t, min_survivors=None,
                               l2_clip=cfg.client_dp_clipping_norm
                               if cfg.privacy_mode.client is ClientLevel.DISTRIBUTED
                               else None, noise_stddev=noise)
