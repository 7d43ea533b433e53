"""Event types of the privacy ledger and typed payload builders/validators.

Privacy is recorded as *mechanism events* (confide.privacy.mechanisms: noise multiplier,
sampling rate, steps, population, ...) so any accountant can replay them: the privacy entries
(example_dp, client_dp, secure_aggregation) each hold theirs. The epsilon a component claimed
is stored next to it (`epsilon_claimed`) only so the audit can compare it with its own
replay. Every payload is a flat JSON object built by `to_payload()` and parsed back (and
validated: types, ranges, required keys) by `from_payload()`, which raises `PayloadError`
naming the type and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from confide.privacy import json_fields as F
from confide.privacy.json_fields import PayloadError
from confide.privacy.mechanisms import (
    ClientLevelMechanism,
    ExampleLevelMechanism,
    SecureAggregationAbort,
    client_level_from_json,
    example_level_from_json,
)

RUN_STARTED = "run_started"
ROUND_CONFIGURED = "round_configured"
EXAMPLE_DP = "example_dp"
CLIENT_DP = "client_dp"
SECURE_AGGREGATION = "secure_aggregation"
BUDGET_REFUSAL = "budget_refusal"
MODEL_DIGEST = "model_digest"
ROUND_COMPLETED = "round_completed"
RUN_RESUMED = "run_resumed"
RUN_FINISHED = "run_finished"
RUN_INTERRUPTED = "run_interrupted"
HEAD_COUNTERSIGNED = "head_countersigned"

EVENT_TYPES: tuple[str, ...] = (
    RUN_STARTED, ROUND_CONFIGURED, EXAMPLE_DP, CLIENT_DP, SECURE_AGGREGATION, BUDGET_REFUSAL,
    MODEL_DIGEST, ROUND_COMPLETED, RUN_RESUMED, RUN_FINISHED, RUN_INTERRUPTED,
    HEAD_COUNTERSIGNED)

def weights_digest(arrays: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the safetensors serialisation of `arrays` (name -> numpy array).

    `safetensors.numpy.save_file` writes exactly these bytes, so the digest the server
    records for the final round equals the SHA-256 of `model/weights.safetensors` when the
    server writes that file from the same arrays. The audit checks that equality.
    """
    import numpy as np
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return hashlib.sha256(blob).hexdigest()


def file_digest(path: Path | str) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# the field readers, by their short names here (confide.privacy.json_fields)
_get, _int, _float, _opt_float = F.required, F.integer, F.number, F.optional_number
_str, _str_list, _dict, _hex = F.text, F.text_list, F.obj, F.hex_digits

T = TypeVar("T", bound="LedgerEvent")


class LedgerEvent:
    """Base of the typed payloads: `TYPE` is the ledger entry type."""

    TYPE: ClassVar[str] = ""

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value = getattr(self, f.name)
            out[f.name] = F.json_number(value) if isinstance(value, float) else value
        return out

    @classmethod
    def from_payload(cls: type[T], payload: Mapping[str, Any]) -> T:
        raise NotImplementedError


@dataclass(frozen=True)
class RunStarted(LedgerEvent):
    TYPE: ClassVar[str] = RUN_STARTED
    config: dict[str, Any]
    config_digest: str
    code_version: str
    ledger_public_key: str  # raw Ed25519 public key, hex
    delta: float

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RunStarted:
        k = cls.TYPE
        return cls(config=_dict(k, "config", _get(k, payload, "config")),
                   config_digest=_hex(k, "config_digest", _get(k, payload, "config_digest"), 64),
                   code_version=_str(k, "code_version", _get(k, payload, "code_version")),
                   ledger_public_key=_hex(k, "ledger_public_key",
                                          _get(k, payload, "ledger_public_key"), 64),
                   delta=_float(k, "delta", _get(k, payload, "delta"), lo=0.0, hi=1.0))


@dataclass(frozen=True)
class RoundConfigured(LedgerEvent):
    TYPE: ClassVar[str] = ROUND_CONFIGURED
    round: int
    sampled: list[str]  # node ids (or pseudonyms) the round was sent to

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RoundConfigured:
        k = cls.TYPE
        return cls(round=_int(k, "round", _get(k, payload, "round"), lo=1),
                   sampled=_str_list(k, "sampled", _get(k, payload, "sampled")))


@dataclass(frozen=True)
class ExampleDpEvent(LedgerEvent):
    """One partner's example-level mechanism in one round (`SampledGaussian`, or
    `SharedNoiseSampledGaussian` when its noise is shared inside the secure sum), as the
    partner signed it in its receipt."""

    TYPE: ClassVar[str] = EXAMPLE_DP
    round: int
    partner: str  # pseudonym, derived from the partner's node key
    mechanism: ExampleLevelMechanism
    delta: float
    epsilon_claimed: float  # cumulative, as the partner's own accountant says
    accountant: str = "rdp"  # the analysis of the claim (absent in early ledgers: RDP)
    receipt: dict[str, Any] | None = None  # Receipt.to_dict(), signed by the partner
    # Set when the server records the release in a later round than `round` (the reply
    # of `round` was lost: the server died, or the reply never arrived; the partner sent
    # the receipt again with its next reply): the round whose entries hold it. Absent
    # (None) for a release recorded in its own round, as in every earlier ledger.
    recorded_in_round: int | None = None

    # The mechanism's numbers, as the flat payload (and the report) names them.
    @property
    def noise_multiplier(self) -> float:
        return self.mechanism.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.mechanism.sample_rate

    @property
    def steps(self) -> int:
        return self.mechanism.steps

    def to_payload(self) -> dict[str, Any]:
        # the mechanism's numbers sit flat beside the entry's own fields
        late = {} if self.recorded_in_round is None else \
            {"recorded_in_round": self.recorded_in_round}
        return {"round": self.round, "partner": self.partner, **self.mechanism.to_json(),
                "delta": self.delta, "epsilon_claimed": F.json_number(self.epsilon_claimed),
                "accountant": self.accountant, "receipt": self.receipt, **late}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ExampleDpEvent:
        k = cls.TYPE
        receipt = payload.get("receipt")
        return cls(
            round=_int(k, "round", _get(k, payload, "round"), lo=1),
            partner=_str(k, "partner", _get(k, payload, "partner")),
            mechanism=example_level_from_json(payload, k),
            delta=_float(k, "delta", _get(k, payload, "delta"), hi=1.0),
            epsilon_claimed=_float(k, "epsilon_claimed",
                                     _get(k, payload, "epsilon_claimed"), allow_inf=True),
            accountant=_str(k, "accountant", payload.get("accountant", "rdp")),
            receipt=None if receipt is None else _dict(k, "receipt", receipt),
            recorded_in_round=None if payload.get("recorded_in_round") is None
            else _int(k, "recorded_in_round", payload["recorded_in_round"], lo=1))

    @classmethod
    def from_receipt(cls, receipt: Any, recorded_in_round: int | None = None
                     ) -> ExampleDpEvent:
        """The event exactly as the partner signed it, with the receipt attached.

        The server should build EXAMPLE_DP entries this way: it then copies the partner's
        signed numbers instead of re-stating them. `receipt` is a `Receipt` or its dict.
        """
        data = receipt.to_dict() if hasattr(receipt, "to_dict") else dict(receipt)
        signed = dict(data["payload"])
        if "epsilon_claimed" not in signed:
            signed["epsilon_claimed"] = signed.get("epsilon")
        signed.pop("epsilon", None)
        signed["receipt"] = data
        if recorded_in_round is not None:
            signed["recorded_in_round"] = recorded_in_round
        return cls.from_payload(signed)


@dataclass(frozen=True)
class ClientDpEvent(LedgerEvent):
    """Client-level DP of one round: one release of the noised sum of clipped updates, by
    the client-level mechanism it holds (`ClientLevelGaussian`,
    `DistributedDiscreteGaussian`)."""

    TYPE: ClassVar[str] = CLIENT_DP
    round: int
    mechanism: ClientLevelMechanism
    delta: float
    epsilon_claimed: float | None = None  # cumulative
    # the analysis of the claim ("pld"), kept under params; None: the mechanism's default
    # (earlier versions: RDP)
    accountant: str | None = None
    # params this version does not read (e.g. flwr's "neighboring" in early ledgers), kept
    # so that the payload stays as it was written
    extra_params: dict[str, Any] = field(default_factory=dict)

    # The mechanism's numbers, as the flat payload (and the report) names them.
    @property
    def noise_multiplier(self) -> float:
        return self.mechanism.noise_multiplier

    @property
    def clipping_norm(self) -> float:
        return self.mechanism.clipping_norm

    @property
    def population(self) -> int:
        return self.mechanism.population

    @property
    def sampled(self) -> int:
        return self.mechanism.sampled

    @property
    def params(self) -> dict[str, Any]:
        """The payload's params: the mechanism's own, the claim's accountant, the rest."""
        mine = self.mechanism.params()
        if self.accountant is not None:
            mine["accountant"] = self.accountant
        return {**self.extra_params, **mine}

    def to_payload(self) -> dict[str, Any]:
        return {"round": self.round, "mechanism": self.mechanism.kind,
                **self.mechanism.to_json(), "params": self.params, "delta": self.delta,
                "epsilon_claimed": F.json_number(self.epsilon_claimed)}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ClientDpEvent:
        k = cls.TYPE
        mechanism = client_level_from_json(payload, k)
        params = _dict(k, "params", payload.get("params", {}))
        accountant = params.get("accountant")
        return cls(
            round=_int(k, "round", _get(k, payload, "round"), lo=1),
            mechanism=mechanism,
            delta=_float(k, "delta", _get(k, payload, "delta"), hi=1.0),
            epsilon_claimed=_opt_float(k, "epsilon_claimed",
                                              payload.get("epsilon_claimed")),
            accountant=None if accountant is None
            else _str(f"{k}.params", "accountant", accountant),
            extra_params={key: v for key, v in params.items()
                          if key not in mechanism.params() and key != "accountant"})


@dataclass(frozen=True)
class SecureAggregationEvent(LedgerEvent):
    TYPE: ClassVar[str] = SECURE_AGGREGATION
    round: int
    participants: list[str]
    dropouts: list[str]
    threshold: int
    bits: int
    neighbours: int
    # why the round aborted (too few survivors; nothing was unmasked, the model is
    # unchanged), None when the secure sum was released. Absent in older ledgers.
    abort: SecureAggregationAbort | None = None
    # partners' signed refusals of this round's protocol stages
    # (confide.privacy.secagg.identity.sign_refusal); absent when there were none
    refusals: list[dict[str, Any]] = field(default_factory=list)
    # every partner of the round signed its keys with its roster identity and unmasked only
    # a split of the survivors it voted for (confide.privacy.secagg.identity); None in
    # ledgers of earlier versions (an honest-but-curious server only)
    authenticated: bool | None = None

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"round": self.round, "participants": self.participants,
                               "dropouts": self.dropouts, "threshold": self.threshold,
                               "bits": self.bits, "neighbours": self.neighbours}
        if self.refusals:
            out["refusals"] = self.refusals
        if self.authenticated is not None:
            out["authenticated"] = self.authenticated
        return {**out, **(self.abort.to_json() if self.abort else {"aborted": None})}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> SecureAggregationEvent:
        k = cls.TYPE
        return cls(round=_int(k, "round", _get(k, payload, "round"), lo=1),
                   participants=_str_list(k, "participants",
                                            _get(k, payload, "participants")),
                   dropouts=_str_list(k, "dropouts", _get(k, payload, "dropouts")),
                   threshold=_int(k, "threshold", _get(k, payload, "threshold")),
                   bits=_int(k, "bits", _get(k, payload, "bits"), lo=1),
                   neighbours=_int(k, "neighbours", _get(k, payload, "neighbours")),
                   abort=None if payload.get("aborted") is None
                   else SecureAggregationAbort.from_json(payload, k),
                   refusals=[_dict(k, "refusals", r) for r in payload.get("refusals", [])],
                   authenticated=None if payload.get("authenticated") is None
                   else bool(payload["authenticated"]))


@dataclass(frozen=True)
class BudgetRefusal(LedgerEvent):
    TYPE: ClassVar[str] = BUDGET_REFUSAL
    round: int
    partner: str
    spent_epsilon: float  # the partner's lifetime spend (all runs) when it has a receipt
    max_epsilon: float
    would_be_epsilon: float
    # confide.privacy.refusals: the refusal signed by the partner, stating its lifetime
    # spend and the events behind it. None in ledgers of earlier versions.
    receipt: dict[str, Any] | None = None

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> BudgetRefusal:
        k = cls.TYPE
        receipt = payload.get("receipt")
        return cls(round=_int(k, "round", _get(k, payload, "round"), lo=1),
                   partner=_str(k, "partner", _get(k, payload, "partner")),
                   spent_epsilon=_float(k, "spent_epsilon", _get(k, payload, "spent_epsilon"),
                                        allow_inf=True),
                   max_epsilon=_float(k, "max_epsilon", _get(k, payload, "max_epsilon")),
                   would_be_epsilon=_float(k, "would_be_epsilon",
                                           _get(k, payload, "would_be_epsilon"), allow_inf=True),
                   receipt=None if receipt is None else _dict(k, "receipt", receipt))


@dataclass(frozen=True)
class ModelDigest(LedgerEvent):
    TYPE: ClassVar[str] = MODEL_DIGEST
    round: int
    sha256: str  # weights_digest() of the global trainable weights after the round

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ModelDigest:
        k = cls.TYPE
        return cls(round=_int(k, "round", _get(k, payload, "round"), lo=1),
                   sha256=_hex(k, "sha256", _get(k, payload, "sha256"), 64))


@dataclass(frozen=True)
class RoundCompleted(LedgerEvent):
    """Who replied, whose update went into the aggregate, who dropped; the round's metrics."""

    TYPE: ClassVar[str] = ROUND_COMPLETED
    round: int
    replied: list[str]  # partner pseudonyms that sent a reply (trained or refused)
    aggregated: list[str]  # pseudonyms whose update is in the new global model
    dropped: list[str]  # node ids / pseudonyms that failed or dropped out
    accuracy: float | None = None
    loss: float | None = None

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RoundCompleted:
        k = cls.TYPE
        return cls(round=_int(k, "round", _get(k, payload, "round"), lo=1),
                   replied=_str_list(k, "replied", _get(k, payload, "replied")),
                   aggregated=_str_list(k, "aggregated", _get(k, payload, "aggregated")),
                   dropped=_str_list(k, "dropped", _get(k, payload, "dropped")),
                   accuracy=_opt_float(k, "accuracy", payload.get("accuracy")),
                   loss=_opt_float(k, "loss", payload.get("loss")))


@dataclass(frozen=True)
class RunResumed(LedgerEvent):
    """The server restarted and continues after round `from_round` (its checkpoint)."""

    TYPE: ClassVar[str] = RUN_RESUMED
    from_round: int
    code_version: str = ""

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RunResumed:
        k = cls.TYPE
        return cls(from_round=_int(k, "from_round", _get(k, payload, "from_round")),
                   code_version=str(payload.get("code_version", "")))


@dataclass(frozen=True)
class RunFinished(LedgerEvent):
    TYPE: ClassVar[str] = RUN_FINISHED
    rounds_completed: int

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RunFinished:
        k = cls.TYPE
        return cls(rounds_completed=_int(k, "rounds_completed",
                                         _get(k, payload, "rounds_completed")))


@dataclass(frozen=True)
class RunInterrupted(LedgerEvent):
    """The operator stopped the server (SIGINT / SIGTERM) at a safe point: after round
    `after_round` completed and was checkpointed. Only run_resumed may follow."""

    TYPE: ClassVar[str] = RUN_INTERRUPTED
    after_round: int
    reason: str  # e.g. "SIGINT"

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> RunInterrupted:
        k = cls.TYPE
        return cls(after_round=_int(k, "after_round", _get(k, payload, "after_round")),
                   reason=_str(k, "reason", _get(k, payload, "reason")))


@dataclass(frozen=True)
class HeadCountersigned(LedgerEvent):
    """A partner's countersignature of the chain as the server showed it in `round`: entry
    `index` had hash `hash` (confide.privacy.receipts.sign_head, attached as
    `countersignature`). The server cannot re-sign a rewritten chain under it; the partner
    keeps the head it signed and `confide audit partner` compares the published chain."""

    TYPE: ClassVar[str] = HEAD_COUNTERSIGNED
    round: int
    partner: str
    index: int
    hash: str
    countersignature: dict[str, Any]

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> HeadCountersigned:
        k = cls.TYPE
        return cls(round=_int(k, "round", _get(k, payload, "round"), lo=1),
                   partner=_str(k, "partner", _get(k, payload, "partner")),
                   index=_int(k, "index", _get(k, payload, "index"), lo=0),
                   hash=_hex(k, "hash", _get(k, payload, "hash"), 64),
                   countersignature=_dict(k, "countersignature",
                                          _get(k, payload, "countersignature")))


EVENT_CLASSES: dict[str, type[LedgerEvent]] = {
    cls.TYPE: cls for cls in (RunStarted, RoundConfigured, ExampleDpEvent, ClientDpEvent,
                              SecureAggregationEvent, BudgetRefusal, ModelDigest,
                              RoundCompleted, RunResumed, RunFinished, RunInterrupted,
                              HeadCountersigned)}


def parse_payload(event_type: str, payload: Mapping[str, Any]) -> LedgerEvent:
    """Typed event of an entry; PayloadError on an unknown type or a bad payload."""
    cls = EVENT_CLASSES.get(event_type)
    if cls is None:
        raise PayloadError(f"unknown ledger entry type {event_type!r}")
    if not isinstance(payload, Mapping):
        raise PayloadError(f"{event_type} payload is not an object")
    return cls.from_payload(payload)


def round_of(event: LedgerEvent) -> int | None:
    """The round whose entries hold an event (None for run-level events): its own round,
    or for a release recorded late, the round that recorded it."""
    value = getattr(event, "recorded_in_round", None)
    if value is None:
        value = getattr(event, "round", None)
    return value if isinstance(value, int) else None
