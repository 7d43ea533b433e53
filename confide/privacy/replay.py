"""Recompute every epsilon of a run from its ledger events, independently of the partners.

Only the recorded mechanism events (confide.privacy.mechanisms) go in; each claim is replayed
by the analysis family it names (the event's `accountant`), with another implementation than
the one that made it. The replay of each mechanism class is looked up by the class (the
callers never ask which kind an event is):

* Example-level, per partner: every example-level mechanism is, or amounts to, a sampled
  Gaussian (`mechanism.sampled_gaussian`: `steps` Poisson-subsampled Gaussian steps); rounds
  compose.
  - PLD claims (partners use dp-accounting's PLD): replayed with Opacus' PRV accountant
    (Gopi, Lee, Wutschitz 2021), whose estimate must agree within 1% and whose certified
    lower bound the claim must not undercut; dp-accounting's PLD is recomputed too.
  - RDP claims (runs of earlier versions): dp-accounting's RDP at the partners' integer
    orders. RDP is also the second opinion shown for every run.
* Client-level (`CLIENT_REPLAYS`, by the mechanism's class):
  - `ClientLevelGaussian`: PoissonSampled(q, Gaussian(sigma)) per round, q = its
    amplification rate (1.0 = none). PLD claims (accountant "pld") without sampling are
    replayed exactly: T Gaussian releases compose to one Gaussian (mu-GDP, mu =
    sqrt(sum 1/sigma_i^2)), whose delta(epsilon) is closed-form (Balle & Wang 2018; Dong,
    Roth, Su 2019); with sampling by PRV. RDP claims with dp-accounting's default orders
    (those of flwr's RdpAccountant).
  - `DistributedDiscreteGaussian`: KLS21's RDP bound (confide.privacy.accountant
    .DISTRIBUTED_DG_RDP); no independent implementation of it exists.

Orders: for large sampling rates and small noise Opacus 1.6's fractional-order series does
not converge and reports a *smaller* epsilon than dp-accounting (up to 2.6x at q=0.3,
sigma=0.5). The audit found this; RDP here uses integer orders only, where both analyses
are exact.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

from confide.privacy.accountant import DISTRIBUTED_DG_RDP, grouped_events
from confide.privacy.ledger_events import ClientDpEvent, ExampleDpEvent
from confide.privacy.mechanisms import (
    ClientLevelGaussian,
    DistributedDiscreteGaussian,
    Mechanism,
    SampledGaussian,
)

# The RDP orders of the partners' accountant (confide.privacy.accountant.RDP_ORDERS):
# integer orders, where both Opacus' and dp-accounting's analyses are exact.
OPACUS_RDP_ORDERS: list[float] = [float(a) for a in [*range(2, 65), 80, 96, 128, 192, 256]]
PLD_DISCRETIZATION = 1e-3
# PRV's epsilon grid error: its estimate then agrees with a tight PLD to ~0.1%.
PRV_EPS_ERROR = 0.01

log = logging.getLogger(__name__)


class UnknownMechanism(LookupError):
    """No replay is registered for a client-level mechanism."""


def _epsilon(accountant: dp_accounting.PrivacyAccountant, delta: float) -> float:
    eps = float(accountant.get_epsilon(delta))
    return eps if not math.isnan(eps) else math.inf


@dataclass
class PartnerReplay:
    """Cumulative epsilon of one partner after each round it trained in.

    `epsilons` is the independent replay in the family of the partner's claims: for PLD
    claims Opacus' PRV accountant (Gopi et al. 2021: another algorithm and another code
    base than the partner's dp-accounting PLD), for RDP claims dp-accounting's RDP.
    `lower_bounds` are PRV's certified lower bounds where PRV ran (a claim below one would
    under-state the spend); `rdp_epsilons` is always the RDP second opinion."""

    partner: str
    delta: float
    rounds: list[int] = field(default_factory=list)
    epsilons: list[float] = field(default_factory=list)  # cumulative, claim's family
    rdp_epsilons: list[float] = field(default_factory=list)  # cumulative, RDP
    lower_bounds: list[float | None] = field(default_factory=list)  # PRV lower bounds
    methods: list[str] = field(default_factory=list)  # "prv" or "rdp", per event
    pld_epsilon: float | None = None  # final, dp-accounting PLD (the claim's own analysis)

    @property
    def final(self) -> float:
        return self.epsilons[-1] if self.epsilons else 0.0

    @property
    def final_rdp(self) -> float:
        return self.rdp_epsilons[-1] if self.rdp_epsilons else 0.0

    @property
    def method(self) -> str:
        return self.methods[-1] if self.methods else "rdp"

    def after_round(self, round_: int) -> float:
        """Cumulative epsilon after `round_` (0 before the partner's first round)."""
        eps = 0.0
        for r, e in zip(self.rounds, self.epsilons, strict=True):
            if r <= round_:
                eps = e
        return eps


@functools.lru_cache(maxsize=1024)
def _cumulative_rdp(params: tuple[tuple[float, float, int], ...], delta: float
                    ) -> tuple[float, ...]:
    """Cumulative RDP epsilons of a sequence of (sample_rate, sigma, steps). Cached: an
    audit replays the same histories for verify, report and every comparison."""
    acc = rdp.RdpAccountant(OPACUS_RDP_ORDERS)
    out = []
    for q, sigma, steps in params:
        acc.compose(_sampled_gaussian(q, sigma, steps))
        out.append(_epsilon(acc, delta))
    return tuple(out)


def _sampled_gaussian(q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
    if steps == 0 or q == 0:
        return dp_accounting.NoOpDpEvent()
    if sigma == 0:
        return dp_accounting.NonPrivateDpEvent()
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)


@functools.lru_cache(maxsize=4096)
def prv_epsilon(params: tuple[tuple[float, float, int], ...], delta: float
                ) -> tuple[float, float, float]:
    """(lower bound, estimate, upper bound) of epsilon of the composition of
    (sample_rate, sigma, steps) by Opacus' PRV accountant (Gopi, Lee, Wutschitz 2021),
    an implementation independent of dp-accounting's PLD."""
    from opacus.accountants import PRVAccountant

    # Composition commutes, so the releases of one (sigma, q) are one entry of their summed
    # steps: Opacus discretises every history entry on its own (a numerical integration
    # each), which made a 30-round replay ~50x slower for the same epsilon (to ~1e-10).
    steps_of: dict[tuple[float, float], int] = {}
    for q, sigma, steps in params:
        if steps > 0 and q > 0:
            steps_of[(sigma, q)] = steps_of.get((sigma, q), 0) + steps
    history = [(sigma, q, steps) for (sigma, q), steps in steps_of.items()]
    if not history:
        return 0.0, 0.0, 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf, math.inf, math.inf
    acc = PRVAccountant()
    acc.history = history
    delta_error = delta / 1000  # Opacus' own default in get_epsilon
    # q = 1: log(0) on a masked branch. Opacus sizes the PRV domain from an RDP bound and
    # warns when that bound's best order is at the end of its range (a large sigma): the
    # domain is still safe, and the audit's user has nothing to act on.
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        dprv = acc._get_dprv(eps_error=PRV_EPS_ERROR, delta_error=delta_error)
        low, est, high = dprv.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
    return float(low), float(est), float(high)


def replay_example_level(events: Sequence[ExampleDpEvent], delta: float | None = None,
                         *, with_pld: bool = True) -> dict[str, PartnerReplay]:
    """Per partner, cumulative epsilon after each of its events (in the given order), by
    the analysis each event's claim names (`accountant`: 'pld' -> PRV, 'rdp' -> RDP)."""
    out: dict[str, PartnerReplay] = {}
    params: dict[str, list[tuple[float, float, int]]] = {}
    for e in events:
        d = e.delta if delta is None else delta
        rep = out.setdefault(e.partner, PartnerReplay(e.partner, d))
        rep.rounds.append(e.round)
        rep.methods.append("prv" if e.accountant == "pld" else "rdp")
        params.setdefault(e.partner, []).append(_replay_params(e.mechanism.sampled_gaussian))
    for partner, rep in out.items():
        history = tuple(params[partner])
        rep.rdp_epsilons = list(_cumulative_rdp(history, rep.delta))
        for k, method in enumerate(rep.methods):
            if method == "prv":
                low, est, _ = prv_epsilon(history[:k + 1], rep.delta)
                rep.epsilons.append(est)
                rep.lower_bounds.append(low)
            else:
                rep.epsilons.append(rep.rdp_epsilons[k])
                rep.lower_bounds.append(None)
        if with_pld:
            rep.pld_epsilon = _cached_pld(history, rep.delta)
    return out


def _replay_params(m: SampledGaussian) -> tuple[float, float, int]:
    """(sample_rate, noise_multiplier, steps): the replay's parameter order."""
    return float(m.sample_rate), float(m.noise_multiplier), int(m.steps)


def replay_sampled_gaussians(mechanisms: Sequence[SampledGaussian], delta: float,
                             accountant: str) -> tuple[float | None, float]:
    """(PRV lower bound or None, independent estimate) of the epsilon of a composition,
    replayed in the family of a claim made with `accountant` (a partner's signed refusal
    states its lifetime spend this way)."""
    params = tuple(_replay_params(m) for m in mechanisms)
    if accountant == "pld":
        low, est, _ = prv_epsilon(params, delta)
        return low, est
    return None, (_cumulative_rdp(params, delta)[-1] if params else 0.0)


@functools.lru_cache(maxsize=256)
def _cached_pld(params: tuple[tuple[float, float, int], ...], delta: float) -> float | None:
    return pld_epsilon([_sampled_gaussian(*p) for p in params], delta)


def pld_epsilon(events: Sequence[dp_accounting.DpEvent], delta: float) -> float | None:
    """PLD epsilon of the composition, or None when PLD cannot do it (then RDP stands)."""
    try:
        acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
        acc.compose(grouped_events(events))
        return _epsilon(acc, delta)
    except Exception as exc:  # a second opinion must never break the audit
        log.warning("PLD accountant failed (%s); reporting RDP only", exc)
        return None


# -- client-level -----------------------------------------------------------------------

ClientReplayFn = Callable[[Sequence[Any], Sequence[ClientDpEvent], float], list[float]]


def _gaussian_fixed_clipping(mechanisms: Sequence[ClientLevelGaussian],
                             events: Sequence[ClientDpEvent], delta: float) -> list[float]:
    # the amplification the mechanism claims (1.0 = none, as flwr's NO_AMPLIFICATION;
    # earlier versions: Poisson at sampled / population); nothing sampled: nothing released
    params = tuple((0.0 if m.composes_nothing else m.amplification_rate, m.noise_multiplier)
                   for m in mechanisms)
    if all(e.accountant == "pld" for e in events):
        return [_tight_client_epsilon(params[:k + 1], delta) for k in range(len(params))]
    return list(_cumulative_client_rdp(params, delta))


def _distributed_discrete_gaussian(mechanisms: Sequence[DistributedDiscreteGaussian],
                                   events: Sequence[ClientDpEvent], delta: float
                                   ) -> list[float]:
    return DISTRIBUTED_DG_RDP.cumulative(mechanisms, delta)


def _tight_client_epsilon(params: tuple[tuple[float, float], ...], delta: float) -> float:
    released = [(q, sigma) for q, sigma in params if q > 0]
    if not released:
        return 0.0
    if any(sigma == 0 for _, sigma in released):
        return math.inf
    if all(q >= 1.0 for q, _ in released):
        return gaussian_epsilon(math.sqrt(sum(1 / sigma ** 2 for _, sigma in released)),
                                delta)
    return prv_epsilon(tuple((q, sigma, 1) for q, sigma in released), delta)[1]


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a mu-GDP mechanism (a Gaussian release of sensitivity 1 and noise
    1/mu): the smallest eps with Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) <= delta."""
    from scipy.stats import norm

    def delta_of(eps: float) -> float:
        return float(norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2))

    if delta_of(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        low, high = high, 2 * high
        if high > 1e6:
            return math.inf
    while high - low > 1e-9 * max(1.0, high):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


@functools.lru_cache(maxsize=256)
def _cumulative_client_rdp(params: tuple[tuple[float, float], ...], delta: float
                           ) -> tuple[float, ...]:
    acc = rdp.RdpAccountant()  # dp-accounting default orders, as flwr's RdpAccountant
    out: list[float] = []
    for q, sigma in params:
        if q == 0:
            out.append(out[-1] if out else 0.0)
            continue
        if sigma == 0:
            acc.compose(dp_accounting.NonPrivateDpEvent())
        elif q >= 1.0:
            acc.compose(dp_accounting.GaussianDpEvent(sigma))
        else:
            acc.compose(dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(sigma)))
        out.append(_epsilon(acc, delta))
    return tuple(out)


class ClientReplays:
    """Mechanism class -> its replay: (the mechanisms, their ledger events, delta) ->
    cumulative epsilon after each. A new client-level mechanism registers its own."""

    def __init__(self) -> None:
        self._fns: dict[type[Mechanism], ClientReplayFn] = {
            ClientLevelGaussian: _gaussian_fixed_clipping,
            DistributedDiscreteGaussian: _distributed_discrete_gaussian}

    def register(self, cls: type[Mechanism], fn: ClientReplayFn) -> None:
        self._fns[cls] = fn

    def get(self, mechanism: Mechanism) -> ClientReplayFn:
        """The replay of `mechanism`'s class; UnknownMechanism naming it if none."""
        try:
            return self._fns[type(mechanism)]
        except KeyError:
            raise UnknownMechanism(
                f"no replay accountant for client-level mechanism {mechanism.kind!r} "
                f"(known: {sorted(c.KIND for c in self._fns)})") from None


CLIENT_REPLAYS = ClientReplays()


@dataclass
class ClientReplay:
    """Cumulative client-level epsilon after each CLIENT_DP event."""

    rounds: list[int] = field(default_factory=list)
    epsilons: list[float] = field(default_factory=list)

    @property
    def final(self) -> float | None:
        return self.epsilons[-1] if self.epsilons else None

    def after_round(self, round_: int) -> float | None:
        eps = None
        for r, e in zip(self.rounds, self.epsilons, strict=True):
            if r <= round_:
                eps = e
        return eps


def replay_client_level(events: Sequence[ClientDpEvent], delta: float | None = None,
                        registry: ClientReplays | None = None) -> ClientReplay:
    """Cumulative client-level epsilon. All events of a run must use one mechanism (mixing
    would need a common accountant; refused rather than guessed). UnknownMechanism if
    no replay is registered for it."""
    out = ClientReplay()
    if not events:
        return out
    kinds = {e.mechanism.kind for e in events}
    if len(kinds) > 1:
        raise UnknownMechanism(f"client-level events mix mechanisms {sorted(kinds)}")
    fn = (registry or CLIENT_REPLAYS).get(events[0].mechanism)
    d = events[0].delta if delta is None else delta
    out.rounds = [e.round for e in events]
    out.epsilons = [float(x) for x in fn([e.mechanism for e in events], list(events), d)]
    if len(out.epsilons) != len(events):
        raise ValueError(f"replay of {events[0].mechanism!r} returned {len(out.epsilons)} "
                         f"epsilons for {len(events)} events")
    return out
