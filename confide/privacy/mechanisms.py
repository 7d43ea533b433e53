"""Privacy facts in one shape: one frozen dataclass per differential-privacy mechanism.

Every privacy-relevant thing a run does is one of these mechanism events:

* `SampledGaussian`: a partner's DP-SGD in one round, with its own noise (example level).
* `SharedNoiseSampledGaussian`: the same, with the noise shared inside the secure sum.
* `ClientLevelGaussian`: the server's Gaussian noise on the clipped mean (client level).
* `DistributedDiscreteGaussian`: the clients' discrete Gaussian shares inside the secure sum
  (client level, without trusting the server).
* `SecureAggregationAbort`: a secure round that released nothing.

The node signs them (`receipts.py`), the ledger stores them (`ledger_events.py`: each
privacy entry holds its `mechanism`), and the accountants compose lists of them with one rule
per class (`accountant.py`: the claims, the budget guard, their second opinion; `replay.py`:
the audit's independent replay), without asking which kind an event is. Adding a mechanism
means a class here, registered with `register_mechanism`, and its rule in each accountant
that can analyse it.

JSON: `to_json()` returns the mechanism as a JSON object laid out as the ledger entries and
receipts of every version hold it: example level, its numbers flat (the shared noise tagged
`"noise": "shared"`); client level, the numbers every client-level mechanism has at the top
and its own under `params`; an abort, its reason as `aborted`. So what earlier versions wrote
parses unchanged and new entries keep their bytes. `from_json()` checks types and ranges and
raises `PayloadError` naming the field: `where.field`, where is the kind unless the caller
names the entry that holds the mechanism.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self, TypeAlias, TypeVar

from confide.privacy import json_fields as F
from confide.privacy.json_fields import PayloadError


class Mechanism:
    """Base of the mechanism events: `KIND` is the name it is registered and recorded by."""

    KIND: ClassVar[str] = ""
    TITLE: ClassVar[str] = ""  # what the report calls it

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def title(self) -> str:
        return self.TITLE or self.kind

    def describe(self) -> str:
        """Its parameters in one line (`name=value, ...`), for the report and messages: a
        new mechanism is described without the report knowing it."""
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value = getattr(self, f.name)
            if value is None:
                continue
            parts.append(f"{f.name}={value:g}" if isinstance(value, float)
                         else f"{f.name}={value}")
        return ", ".join(parts)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str | None = None) -> Self:
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """The name it is recorded by: its class's KIND."""
        return self.KIND

    @property
    def composes_nothing(self) -> bool:
        """The accountants skip it: no record or client could have changed what it released
        (dp-accounting's NoOpDpEvent)."""
        return False

    @property
    def noiseless(self) -> bool:
        """It released without noise: its epsilon, and that of any composition, is infinite."""
        return False

    def __str__(self) -> str:
        # Messages and the report name a mechanism as the ledger does: by its kind.
        return self.kind


MECHANISMS: dict[str, type[Mechanism]] = {}
M = TypeVar("M", bound=type[Mechanism])


def register_mechanism(cls: M) -> M:
    """Class decorator: make a mechanism known by its KIND (what a client_dp entry names)."""
    if not cls.KIND or MECHANISMS.get(cls.KIND, cls) is not cls:
        raise ValueError(f"mechanism kind {cls.KIND!r} is empty or already registered")
    MECHANISMS[cls.KIND] = cls
    return cls


# -- example level: one partner's records ------------------------------------------------

@register_mechanism
@dataclass(frozen=True)
class SampledGaussian(Mechanism):
    """`steps` DP-SGD steps of one partner: each a Poisson sample of its records at rate
    `sample_rate`, per-example clipping, and Gaussian noise of `noise_multiplier` x the clip
    norm that the partner adds itself."""

    KIND: ClassVar[str] = "sampled_gaussian"
    TITLE: ClassVar[str] = "example-level DP-SGD, local noise (Poisson-sampled Gaussian)"
    # the tag of example-level mechanisms in example_dp entries and receipts (`noise`;
    # entries of earlier versions have none: local)
    NOISE: ClassVar[str] = "local"
    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def sampled_gaussian(self) -> SampledGaussian:
        """What the accountants compose for it (itself)."""
        return self

    @property
    def composes_nothing(self) -> bool:
        return self.steps == 0 or self.sample_rate == 0

    @property
    def noiseless(self) -> bool:
        return self.noise_multiplier == 0

    def to_json(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str | None = None) -> Self:
        w = where or cls.KIND
        _check_noise_tag(cls, w, data)
        return cls(**_sampled_gaussian_fields(w, data))


@register_mechanism
@dataclass(frozen=True)
class SharedNoiseSampledGaussian(Mechanism):
    """One DP-SGD step of a partner whose noise is shared inside the secure sum
    (example-dp-noise = 'shared', privacy/secagg/shared_noise.py): a Poisson sample of its
    records at `sample_rate`, per-example clipping, and only a share of the noise. The
    released sum carries the effective `noise_multiplier` as long as at least `noise_shares`
    = m honest shares (min_survivors - `colluders`) are in it; `tv_slack` is the round's
    total-variation distance to the continuous Gaussian mechanism, which the plain
    (epsilon, delta) statement adds to delta.

    A class of its own rather than optional fields of `SampledGaussian`: it rests on another
    trust assumption (m honest shares), carries a delta slack that local noise never has,
    and every one of its fields is required. The accountants compose what it amounts to,
    `sampled_gaussian`, so its epsilon is that of the same release with local noise."""

    KIND: ClassVar[str] = "shared_noise_sampled_gaussian"
    TITLE: ClassVar[str] = ("example-level DP-SGD, noise shared inside secure aggregation "
                            "(Poisson-sampled Gaussian)")
    NOISE: ClassVar[str] = "shared"
    noise_multiplier: float
    sample_rate: float
    steps: int
    noise_shares: int
    colluders: int
    tv_slack: float

    @property
    def sampled_gaussian(self) -> SampledGaussian:
        return SampledGaussian(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def composes_nothing(self) -> bool:
        return self.sampled_gaussian.composes_nothing

    @property
    def noiseless(self) -> bool:
        return self.noise_multiplier == 0

    def to_json(self) -> dict[str, Any]:
        return {"noise": self.NOISE, **self.sampled_gaussian.to_json(),
                "noise_shares": self.noise_shares, "colluders": self.colluders,
                "tv_slack": self.tv_slack}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str | None = None) -> Self:
        w = where or cls.KIND
        _check_noise_tag(cls, w, data)
        return cls(**_sampled_gaussian_fields(w, data),
                   noise_shares=F.integer(w, "noise_shares",
                                          F.required(w, data, "noise_shares"), lo=1),
                   colluders=F.integer(w, "colluders", F.required(w, data, "colluders")),
                   tv_slack=F.number(w, "tv_slack", F.required(w, data, "tv_slack")))


ExampleLevelMechanism: TypeAlias = SampledGaussian | SharedNoiseSampledGaussian
EXAMPLE_LEVEL: tuple[type[ExampleLevelMechanism], ...] = (SampledGaussian,
                                                         SharedNoiseSampledGaussian)


# The keys example-level mechanisms take in a flat payload: a sampled Gaussian's, then the
# noise tag and the fields of the other classes.
SAMPLED_GAUSSIAN_KEYS: tuple[str, ...] = tuple(f.name for f in fields(SampledGaussian))
EXAMPLE_LEVEL_KEYS: tuple[str, ...] = tuple(dict.fromkeys(
    [*SAMPLED_GAUSSIAN_KEYS, "noise", *(f.name for c in EXAMPLE_LEVEL for f in fields(c))]))


def example_level_from_json(data: Mapping[str, Any], where: str = "example_dp"
                            ) -> ExampleLevelMechanism:
    """The example-level mechanism of an example_dp entry, a receipt or a node's history,
    told apart by its `noise` tag (absent: local)."""
    tag = F.text(where, "noise", data.get("noise", SampledGaussian.NOISE))
    for cls in EXAMPLE_LEVEL:
        if tag == cls.NOISE:
            return cls.from_json(data, where)
    tags = " or ".join(repr(c.NOISE) for c in EXAMPLE_LEVEL)
    raise PayloadError(f"{where}.noise = {tag!r} is not {tags}")


def _check_noise_tag(cls: type[ExampleLevelMechanism], where: str,
                     data: Mapping[str, Any]) -> None:
    tag = data.get("noise", SampledGaussian.NOISE)
    if tag != cls.NOISE:
        raise PayloadError(f"{where}.noise = {tag!r}, but a {cls.KIND} has noise = "
                           f"{cls.NOISE!r}")


def _sampled_gaussian_fields(where: str, data: Mapping[str, Any]) -> dict[str, Any]:
    return {"noise_multiplier": F.number(where, "noise_multiplier",
                                         F.required(where, data, "noise_multiplier")),
            "sample_rate": F.number(where, "sample_rate", F.required(where, data, "sample_rate"),
                                    hi=1.0),
            "steps": F.integer(where, "steps", F.required(where, data, "steps"))}


# -- client level: one client's whole contribution ------------------------------------------

@dataclass(frozen=True)
class ClientLevelMechanism(Mechanism):
    """What every client-level release records: its noise multiplier and clipping norm, the
    population the clients come from and how many were sampled. A subclass adds its own
    fields, which it keeps under `params`."""

    noise_multiplier: float
    clipping_norm: float
    population: int
    sampled: int

    def params(self) -> dict[str, Any]:
        """The subclass's own fields, as they sit under `params`."""
        return {}

    @classmethod
    def fields_from_params(cls, where: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """The subclass's own fields (constructor keywords) read from `params`."""
        return {}

    def to_json(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
                "population": self.population, "sampled": self.sampled,
                "params": self.params()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str | None = None) -> Self:
        w = where or cls.KIND
        population = F.integer(w, "population", F.required(w, data, "population"), lo=1)
        sampled = F.integer(w, "sampled", F.required(w, data, "sampled"))
        if sampled > population:
            raise PayloadError(f"{w}.sampled = {sampled} exceeds population = {population}")
        params = F.obj(w, "params", data.get("params", {}))
        return cls(noise_multiplier=F.number(w, "noise_multiplier",
                                             F.required(w, data, "noise_multiplier")),
                   clipping_norm=F.number(w, "clipping_norm",
                                          F.required(w, data, "clipping_norm")),
                   population=population, sampled=sampled,
                   **cls.fields_from_params(f"{w}.params", params))


@register_mechanism
@dataclass(frozen=True)
class ClientLevelGaussian(ClientLevelMechanism):
    """The server's Gaussian noise on the equal-weight mean of the clipped updates (client-dp,
    fixed clipping, McMahan et al. 2018): standard deviation noise_multiplier x clipping_norm
    / cohort. `sample_rate` is the amplification by sampling the claim takes (1.0: none, for
    the server's fixed-size cohorts); None in entries of earlier versions, which assumed
    Poisson sampling at sampled / population."""

    KIND: ClassVar[str] = "gaussian_fixed_clipping"
    TITLE: ClassVar[str] = "client-level Gaussian, fixed clipping"
    sample_rate: float | None = None

    @property
    def amplification_rate(self) -> float:
        """The sampling rate the release is accounted with."""
        if self.sample_rate is not None:
            return self.sample_rate
        return self.sampled / self.population

    @property
    def composes_nothing(self) -> bool:
        return self.sampled == 0

    @property
    def noiseless(self) -> bool:
        return self.noise_multiplier == 0

    def params(self) -> dict[str, Any]:
        return {} if self.sample_rate is None else {"sample_rate": self.sample_rate}

    @classmethod
    def fields_from_params(cls, where: str, params: Mapping[str, Any]) -> dict[str, Any]:
        rate = params.get("sample_rate")
        return {"sample_rate": None if rate is None
                else F.number(where, "sample_rate", rate, hi=1.0)}


@register_mechanism
@dataclass(frozen=True)
class DistributedDiscreteGaussian(ClientLevelMechanism):
    """Client-level DP of the distributed discrete Gaussian inside the secure sum (Kairouz,
    Liu, Steinke 2021; privacy/secagg/ddg_accounting.py): every client adds a discrete
    Gaussian share, accounted for the fewest shares the protocol accepts. In integer units:
    the L2 and L1 sensitivity, each share's sigma, the shares summed (min_survivors) and the
    dimension; then the client sampling rate (1.0: no amplification claimed) and whether the
    sum was `released` (False: the secure round aborted and nothing was unmasked).
    `min_survivors`, `noise_stddev` and `bits` describe the session.

    An unreleased round still counts in its accountant, with a zero RDP curve: the claim
    after it is the RDP conversion of what has composed so far (at delta 1e-5, 0.0084 rather
    than 0 when the first round aborts). Kept so that the claims of earlier runs replay to
    the same numbers."""

    KIND: ClassVar[str] = "distributed_discrete_gaussian"
    TITLE: ClassVar[str] = "client-level distributed discrete Gaussian"
    DDG_FIELDS: ClassVar[tuple[str, ...]] = ("l2_sensitivity", "l1_sensitivity", "local_sigma",
                                             "num_summed", "dim")
    l2_sensitivity: float
    l1_sensitivity: float
    local_sigma: float
    num_summed: int
    dim: int
    sampling_rate: float = 1.0
    released: bool = True
    min_survivors: int | None = None
    noise_stddev: float | None = None
    bits: int | None = None

    def params(self) -> dict[str, Any]:
        session = {"min_survivors": self.min_survivors, "noise_stddev": self.noise_stddev,
                   "bits": self.bits}
        # the DDG numbers in the order a parsed entry has them (canonical JSON sorts keys),
        # so that whoever prints them sees one order
        return {"ddg": {k: getattr(self, k) for k in sorted(self.DDG_FIELDS)},
                "sampling_rate": self.sampling_rate, "released": self.released,
                **{k: v for k, v in session.items() if v is not None}}

    @classmethod
    def fields_from_params(cls, where: str, params: Mapping[str, Any]) -> dict[str, Any]:
        ddg = F.obj(where, "ddg", F.required(where, params, "ddg"))
        w = f"{where}.ddg"
        out: dict[str, Any] = {
            "l2_sensitivity": F.number(w, "l2_sensitivity", F.required(w, ddg, "l2_sensitivity")),
            "l1_sensitivity": F.number(w, "l1_sensitivity", F.required(w, ddg, "l1_sensitivity")),
            "local_sigma": F.number(w, "local_sigma", F.required(w, ddg, "local_sigma")),
            "num_summed": F.integer(w, "num_summed", F.required(w, ddg, "num_summed"), lo=1),
            "dim": F.integer(w, "dim", F.required(w, ddg, "dim"), lo=1),
            "sampling_rate": F.number(where, "sampling_rate",
                                      params.get("sampling_rate", 1.0), hi=1.0),
            "released": F.boolean(where, "released", params.get("released", True))}
        if params.get("min_survivors") is not None:
            out["min_survivors"] = F.integer(where, "min_survivors", params["min_survivors"],
                                             lo=1)
        if params.get("noise_stddev") is not None:
            out["noise_stddev"] = F.number(where, "noise_stddev", params["noise_stddev"])
        if params.get("bits") is not None:
            out["bits"] = F.integer(where, "bits", params["bits"], lo=1)
        return out


@dataclass(frozen=True)
class UnregisteredClientMechanism(ClientLevelMechanism):
    """A client-level mechanism this version does not know (in a ledger of a newer version,
    or an edited one), named `name`, its params kept as they were written. Its entry still
    parses, so the audit says that it cannot replay it rather than that the entry is
    malformed; no accountant has a rule for it. Not registered: never produced here."""

    name: str = ""
    params_json: str = "{}"  # its params, as canonical JSON text (hashable, exact)

    @property
    def kind(self) -> str:
        return self.name

    def params(self) -> dict[str, Any]:
        return dict(json.loads(self.params_json))

    @classmethod
    def fields_from_params(cls, where: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"params_json": json.dumps(dict(params), sort_keys=True)}


def client_level_from_json(data: Mapping[str, Any], where: str = "client_dp"
                           ) -> ClientLevelMechanism:
    """The client-level mechanism of a client_dp entry, named by its `mechanism` (its kind);
    one this version does not know is read as an `UnregisteredClientMechanism`."""
    kind = F.text(where, "mechanism", F.required(where, data, "mechanism"))
    cls = MECHANISMS.get(kind, UnregisteredClientMechanism)
    if not issubclass(cls, ClientLevelMechanism):
        raise PayloadError(f"{where}.mechanism = {kind!r} is not a client-level mechanism")
    mechanism = cls.from_json(data, where)
    if isinstance(mechanism, UnregisteredClientMechanism):
        mechanism = dataclasses.replace(mechanism, name=kind)
    return mechanism


# -- secure aggregation ------------------------------------------------------------------

@register_mechanism
@dataclass(frozen=True)
class SecureAggregationAbort(Mechanism):
    """A secure round that released nothing: too few masked inputs survived, or unmasking
    failed, so nothing was unmasked and the global model stays as it was. It composes
    nothing in any accountant; what the partners spent before the abort (their receipts)
    still counts."""

    KIND: ClassVar[str] = "secure_aggregation_abort"
    TITLE: ClassVar[str] = "secure aggregation aborted (nothing released)"
    reason: str

    @property
    def composes_nothing(self) -> bool:
        return True

    def to_json(self) -> dict[str, Any]:
        return {"aborted": self.reason}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str | None = None) -> Self:
        w = where or cls.KIND
        return cls(F.text(w, "aborted", F.required(w, data, "aborted")))
