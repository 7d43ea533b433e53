"""Recompute every epsilon of a run from its ledger events with Google's dp-accounting.

Independent of Opacus' accountant (which the partners use) and of whatever the server's
strategy used: only the recorded mechanism events go in.

* Example-level, per partner: each round's EXAMPLE_DP event is
  PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier)) composed `steps`
  times; rounds compose. RDP accountant with Opacus' default orders (so the two
  accountants differ only in their implementations, not their order grids); a PLD
  accountant gives a second (tighter) opinion on the final epsilon, reported alongside.
* Client-level: dispatched on the event's `mechanism` through a small registry.
  "gaussian_fixed_clipping" is PoissonSampled(q, Gaussian(sigma)) per round, q =
  params["sample_rate"] when recorded (1.0 = no amplification), else sampled / population,
  with the dp-accounting default orders (those of flwr's RdpAccountant).
  "distributed_discrete_gaussian" is provided by confide.privacy.secagg.ddg_accounting
  (imported on first use; see `_load_plugin`).

Orders: for large sampling rates and small noise Opacus 1.6's fractional-order series does
not converge and reports a *smaller* epsilon than dp-accounting (up to 2.6x at q=0.3,
sigma=0.5). The audit found this; the partners' accountant therefore uses integer orders
only, where both analyses are exact, and the replay uses the same grid.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import dp_accounting
from dp_accounting import pld, rdp

from confide.privacy.ledger_events import (
    DISTRIBUTED_DISCRETE_GAUSSIAN,
    GAUSSIAN_FIXED_CLIPPING,
    ClientDpEvent,
    ExampleDpEvent,
)

# The RDP orders of the partners' accountant (confide.privacy.accountant.RDP_ORDERS):
# integer orders, where both Opacus' and dp-accounting's analyses are exact.
OPACUS_RDP_ORDERS: list[float] = [float(a) for a in [*range(2, 65), 80, 96, 128, 192, 256]]
PLD_DISCRETIZATION = 1e-3

log = logging.getLogger(__name__)


class UnknownMechanism(LookupError):
    """No replay is registered for a client-level mechanism."""


def _epsilon(accountant: dp_accounting.PrivacyAccountant, delta: float) -> float:
    eps = float(accountant.get_epsilon(delta))
    return eps if not math.isnan(eps) else math.inf


@dataclass
class PartnerReplay:
    """Cumulative epsilon of one partner after each round it trained in."""

    partner: str
    delta: float
    rounds: list[int] = field(default_factory=list)
    epsilons: list[float] = field(default_factory=list)  # cumulative, RDP
    pld_epsilon: float | None = None  # final, PLD (second opinion)

    @property
    def final(self) -> float:
        return self.epsilons[-1] if self.epsilons else 0.0

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


def replay_example_level(events: Sequence[ExampleDpEvent], delta: float | None = None,
                         *, with_pld: bool = True) -> dict[str, PartnerReplay]:
    """Per partner, cumulative epsilon after each of its events (in the given order)."""
    out: dict[str, PartnerReplay] = {}
    params: dict[str, list[tuple[float, float, int]]] = {}
    for e in events:
        d = e.delta if delta is None else delta
        rep = out.setdefault(e.partner, PartnerReplay(e.partner, d))
        rep.rounds.append(e.round)
        params.setdefault(e.partner, []).append((e.sample_rate, e.noise_multiplier, e.steps))
    for partner, rep in out.items():
        rep.epsilons = list(_cumulative_rdp(tuple(params[partner]), rep.delta))
        if with_pld:
            rep.pld_epsilon = _cached_pld(tuple(params[partner]), rep.delta)
    return out


@functools.lru_cache(maxsize=256)
def _cached_pld(params: tuple[tuple[float, float, int], ...], delta: float) -> float | None:
    return pld_epsilon([_sampled_gaussian(*p) for p in params], delta)


def pld_epsilon(events: Sequence[dp_accounting.DpEvent], delta: float) -> float | None:
    """PLD epsilon of the composition, or None when PLD cannot do it (then RDP stands)."""
    try:
        acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
        acc.compose(dp_accounting.ComposedDpEvent(list(events)))
        return _epsilon(acc, delta)
    except Exception as exc:  # a second opinion must never break the audit
        log.warning("PLD accountant failed (%s); reporting RDP only", exc)
        return None


# -- client-level -----------------------------------------------------------------------

ClientReplayFn = Callable[[Sequence[ClientDpEvent], float], list[float]]


def _gaussian_fixed_clipping(events: Sequence[ClientDpEvent], delta: float) -> list[float]:
    # params["sample_rate"], when recorded, is the amplification the mechanism claims
    # (1.0 = none, as flwr's NO_AMPLIFICATION); else Poisson at sampled / population.
    return list(_cumulative_client_rdp(
        tuple((float(e.params.get("sample_rate", e.sampled / e.population)) if e.sampled
               else 0.0, e.noise_multiplier) for e in events), delta))


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


class ClientMechanismRegistry:
    """Mechanism name -> replay function (events of that mechanism, delta) -> cumulative
    epsilons after each event. Plugins may call `register` at import time."""

    # Modules that provide a mechanism's replay: on first use the module is imported and
    # its `ledger_replay(events, delta) -> list[float]` (or a `register` call made at
    # its import) supplies the function.
    PLUGINS: ClassVar[dict[str, str]] = {
        DISTRIBUTED_DISCRETE_GAUSSIAN: "confide.privacy.secagg.ddg_accounting"}

    def __init__(self) -> None:
        self._fns: dict[str, ClientReplayFn] = {GAUSSIAN_FIXED_CLIPPING: _gaussian_fixed_clipping}

    def register(self, mechanism: str, fn: ClientReplayFn) -> None:
        self._fns[mechanism] = fn

    def get(self, mechanism: str) -> ClientReplayFn:
        if mechanism not in self._fns and mechanism in self.PLUGINS:
            self._load_plugin(mechanism)
        try:
            return self._fns[mechanism]
        except KeyError:
            raise UnknownMechanism(
                f"no replay accountant for client-level mechanism {mechanism!r} "
                f"(known: {sorted(set(self._fns) | set(self.PLUGINS))})") from None

    def _load_plugin(self, mechanism: str) -> None:
        name = self.PLUGINS[mechanism]
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise UnknownMechanism(f"replay of {mechanism!r} needs {name}, which cannot be "
                                   f"imported: {exc}") from None
        fn = getattr(module, "ledger_replay", None)
        if mechanism not in self._fns and callable(fn):
            self._fns[mechanism] = fn


CLIENT_MECHANISMS = ClientMechanismRegistry()


def register_client_mechanism(mechanism: str, fn: ClientReplayFn) -> None:
    CLIENT_MECHANISMS.register(mechanism, fn)


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
                        registry: ClientMechanismRegistry | None = None) -> ClientReplay:
    """Cumulative client-level epsilon. All events of a run must use one mechanism (mixing
    would need a common accountant; refused rather than guessed). UnknownMechanism if
    no replay is registered for it."""
    out = ClientReplay()
    if not events:
        return out
    mechanisms = {e.mechanism for e in events}
    if len(mechanisms) > 1:
        raise UnknownMechanism(f"client-level events mix mechanisms {sorted(mechanisms)}")
    fn = (registry or CLIENT_MECHANISMS).get(events[0].mechanism)
    d = events[0].delta if delta is None else delta
    out.rounds = [e.round for e in events]
    out.epsilons = [float(x) for x in fn(list(events), d)]
    if len(out.epsilons) != len(events):
        raise ValueError(f"replay of {events[0].mechanism!r} returned {len(out.epsilons)} "
                         f"epsilons for {len(events)} events")
    return out
