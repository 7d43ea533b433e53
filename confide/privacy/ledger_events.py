"""Event types of the privacy ledger and typed payload builders/validators.

Privacy is recorded as *mechanism events* (noise multiplier, sampling rate, steps,
population, delta) so any accountant can replay them; the epsilon a component claimed is
stored next to them (`epsilon_claimed`) only so the audit can compare it with its own
replay. Every payload is a flat JSON object built by `to_payload()` and parsed back (and
validated: types, ranges, required keys) by `from_payload()`, which raises
`PayloadError` naming the type and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

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

EVENT_TYPES: tuple[str, ...] = (
    RUN_STARTED, ROUND_CONFIGURED, EXAMPLE_DP, CLIENT_DP, SECURE_AGGREGATION, BUDGET_REFUSAL,
    MODEL_DIGEST, ROUND_COMPLETED, RUN_RESUMED, RUN_FINISHED, RUN_INTERRUPTED)

# Client-level mechanisms the replay knows by name (see confide.privacy.replay).
GAUSSIAN_FIXED_CLIPPING = "gaussian_fixed_clipping"
DISTRIBUTED_DISCRETE_GAUSSIAN = "distributed_discrete_gaussian"


class PayloadError(ValueError):
    """A ledger payload misses a field or has a value of the wrong type or range."""


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


# -- field validators -------------------------------------------------------------------

def _get(kind: str, payload: Mapping[str, Any], key: str) -> Any:
    if key not in payload:
        raise PayloadError(f"{kind} payload lacks field {key!r}")
    return payload[key]


def _int(kind: str, key: str, value: Any, lo: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{kind}.{key} = {value!r} is not an integer")
    if lo is not None and value < lo:
        raise PayloadError(f"{kind}.{key} = {value} is below {lo}")
    return value


def _float(kind: str, key: str, value: Any, lo: float | None = 0.0,
           hi: float | None = None, allow_inf: bool = False) -> float:
    if isinstance(value, str) and allow_inf and value == "inf":
        # Canonical JSON has no Infinity; an infinite epsilon (sigma = 0) travels as "inf".
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{kind}.{key} = {value!r} is not a number")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise PayloadError(f"{kind}.{key} = {value!r} is not finite")
    if lo is not None and value < lo:
        raise PayloadError(f"{kind}.{key} = {value} is below {lo}")
    if hi is not None and value > hi:
        raise PayloadError(f"{kind}.{key} = {value} is above {hi}")
    return value


def _opt_float(kind: str, key: str, value: Any) -> float | None:
    return None if value is None else _float(kind, key, value, lo=None, allow_inf=True)


def _str(kind: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise PayloadError(f"{kind}.{key} = {value!r} is not a non-empty string")
    return value


def _str_list(kind: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PayloadError(f"{kind}.{key} = {value!r} is not a list of strings")
    return list(value)


def _dict(kind: str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{kind}.{key} = {value!r} is not an object")
    return dict(value)


def _hex(kind: str, key: str, value: Any, length: int) -> str:
    text = _str(kind, key, value)
    if len(text) != length or any(c not in "0123456789abcdef" for c in text):
        raise PayloadError(f"{kind}.{key} is not {length} lowercase hex digits")
    return text


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    return "inf" if math.isinf(value) else float(value)


T = TypeVar("T", bound="LedgerEvent")


class LedgerEvent:
    """Base of the typed payloads: `TYPE` is the ledger entry type."""

    TYPE: ClassVar[str] = ""

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value = getattr(self, f.name)
            out[f.name] = _json_float(value) if isinstance(value, float) else value
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
    """`steps` DP-SGD steps of one partner in one round (Poisson-sampled Gaussian)."""

    TYPE: ClassVar[str] = EXAMPLE_DP
    round: int
    partner: str  # pseudonym, derived from the partner's node key
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_claimed: float  # cumulative, as the partner's own (Opacus RDP) accountant says
    accountant: str = "rdp"
    receipt: dict[str, Any] | None = None  # Receipt.to_dict(), signed by the partner
    # Shared noise (example-dp-noise = 'shared'; absent in older ledgers = 'local'): the
    # partner added only a share of the noise inside the secure sum; `noise_multiplier` is
    # the total effective one, carried by at least `noise_shares` = m honest shares
    # (min_survivors - `colluders`); `tv_slack`: this round's TV distance to the continuous
    # Gaussian mechanism (confide.privacy.secagg.shared_noise), added to delta.
    noise: str = "local"
    noise_shares: int | None = None
    colluders: int | None = None
    tv_slack: float | None = None

    def to_payload(self) -> dict[str, Any]:
        out = super().to_payload()
        if self.noise == "local":  # payloads of local-noise events stay as they always were
            for key in ("noise", "noise_shares", "colluders", "tv_slack"):
                out.pop(key)
        return out

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ExampleDpEvent:
        k = cls.TYPE
        receipt = payload.get("receipt")
        noise = _str(k, "noise", payload.get("noise", "local"))
        if noise not in ("local", "shared"):
            raise PayloadError(f"{k}.noise = {noise!r} is not 'local' or 'shared'")
        shared = {}
        if noise == "shared":
            shared = {"noise_shares": _int(k, "noise_shares", _get(k, payload, "noise_shares"),
                                           lo=1),
                      "colluders": _int(k, "colluders", _get(k, payload, "colluders")),
                      "tv_slack": _float(k, "tv_slack", _get(k, payload, "tv_slack"))}
        return cls(noise=noise, **shared,  # type: ignore[arg-type]  # shared's values are typed
            round=_int(k, "round", _get(k, payload, "round"), lo=1),
            partner=_str(k, "partner", _get(k, payload, "partner")),
            noise_multiplier=_float(k, "noise_multiplier", _get(k, payload, "noise_multiplier")),
            sample_rate=_float(k, "sample_rate", _get(k, payload, "sample_rate"), hi=1.0),
            steps=_int(k, "steps", _get(k, payload, "steps")),
            delta=_float(k, "delta", _get(k, payload, "delta"), hi=1.0),
            epsilon_claimed=_float(k, "epsilon_claimed", _get(k, payload, "epsilon_claimed"),
                                   allow_inf=True),
            accountant=_str(k, "accountant", payload.get("accountant", "rdp")),
            receipt=None if receipt is None else _dict(k, "receipt", receipt))

    @classmethod
    def from_receipt(cls, receipt: Any) -> ExampleDpEvent:
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
        return cls.from_payload(signed)


@dataclass(frozen=True)
class ClientDpEvent(LedgerEvent):
    """Client-level DP of one round: one release of the noised sum of clipped updates."""

    TYPE: ClassVar[str] = CLIENT_DP
    round: int
    mechanism: str  # "gaussian_fixed_clipping" | "distributed_discrete_gaussian" | ...
    noise_multiplier: float
    clipping_norm: float
    population: int
    sampled: int
    delta: float
    epsilon_claimed: float | None = None  # cumulative
    params: dict[str, Any] = field(default_factory=dict)  # mechanism-specific extras

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ClientDpEvent:
        k = cls.TYPE
        population = _int(k, "population", _get(k, payload, "population"), lo=1)
        sampled = _int(k, "sampled", _get(k, payload, "sampled"))
        if sampled > population:
            raise PayloadError(f"{k}.sampled = {sampled} exceeds population = {population}")
        return cls(
            round=_int(k, "round", _get(k, payload, "round"), lo=1),
            mechanism=_str(k, "mechanism", _get(k, payload, "mechanism")),
            noise_multiplier=_float(k, "noise_multiplier", _get(k, payload, "noise_multiplier")),
            clipping_norm=_float(k, "clipping_norm", _get(k, payload, "clipping_norm")),
            population=population, sampled=sampled,
            delta=_float(k, "delta", _get(k, payload, "delta"), hi=1.0),
            epsilon_claimed=_opt_float(k, "epsilon_claimed", payload.get("epsilon_claimed")),
            params=_dict(k, "params", payload.get("params", {})))


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
    # unchanged), None when the secure sum was released. Optional for older ledgers.
    aborted: str | None = None

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> SecureAggregationEvent:
        k = cls.TYPE
        aborted = payload.get("aborted")
        return cls(round=_int(k, "round", _get(k, payload, "round"), lo=1),
                   participants=_str_list(k, "participants", _get(k, payload, "participants")),
                   dropouts=_str_list(k, "dropouts", _get(k, payload, "dropouts")),
                   threshold=_int(k, "threshold", _get(k, payload, "threshold")),
                   bits=_int(k, "bits", _get(k, payload, "bits"), lo=1),
                   neighbours=_int(k, "neighbours", _get(k, payload, "neighbours")),
                   aborted=None if aborted is None else _str(k, "aborted", aborted))


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


EVENT_CLASSES: dict[str, type[LedgerEvent]] = {
    cls.TYPE: cls for cls in (RunStarted, RoundConfigured, ExampleDpEvent, ClientDpEvent,
                              SecureAggregationEvent, BudgetRefusal, ModelDigest,
                              RoundCompleted, RunResumed, RunFinished, RunInterrupted)}


def parse_payload(event_type: str, payload: Mapping[str, Any]) -> LedgerEvent:
    """Typed event of an entry; PayloadError on an unknown type or a bad payload."""
    cls = EVENT_CLASSES.get(event_type)
    if cls is None:
        raise PayloadError(f"unknown ledger entry type {event_type!r}")
    if not isinstance(payload, Mapping):
        raise PayloadError(f"{event_type} payload is not an object")
    return cls.from_payload(payload)


def round_of(event: LedgerEvent) -> int | None:
    """The round an event belongs to (None for run-level events)."""
    value = getattr(event, "round", None)
    return value if isinstance(value, int) else None
