"""Privacy accounting: the claims, the budget guard and their second opinion.

What is accounted is a list of mechanism events (confide.privacy.mechanisms), never just an
epsilon, so anyone can replay it; the audit does, with independent implementations
(confide.privacy.replay). Each analysis composes a list of mechanisms through one rule per
mechanism class (`pld_event`, `rdp_curve`: functools.singledispatch, so a new mechanism
registers its rule next to the others and the callers never ask which kind an event is):

* **PLD** (privacy loss distributions, Koskela et al. 2020 / Doroshenko et al. 2022, Google's
  `dp-accounting`, pessimistic discretisation): tight. It calibrates the noise, makes every
  example-level claim and the claim of client-level DP with fixed clipping, and drives the
  budget guard, so the claim and the guard can never disagree.
* **RDP** (Mironov et al. 2019, integer orders): looser (measured: 8.00 where PLD gives 7.07
  for the same events), kept as a second opinion that anyone can check by hand
  (`PARTNER_RDP`); and the claim of the distributed discrete Gaussian, for which no tight
  accountant exists (`DISTRIBUTED_DG_RDP`: KLS21's bound at its own orders).

`PartnerAccountant` is one partner's cumulative accountant and budget guard. Flower's Opacus
example rebuilds the PrivacyEngine every round and so reports per-round epsilon; here the
history persists across rounds (node state in simulation, a file on the partner's disk in
deployment) and the budget guard refuses a round before it is spent.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import pld
from opacus.accountants.analysis import rdp as rdp_analysis

from confide.privacy import json_fields as F
from confide.privacy.mechanisms import (
    ClientLevelGaussian,
    DistributedDiscreteGaussian,
    Mechanism,
    SampledGaussian,
    SharedNoiseSampledGaussian,
)
from confide.privacy.secagg.ddg_accounting import (
    DEFAULT_ORDERS as DDG_ORDERS,
)
from confide.privacy.secagg.ddg_accounting import (
    ddg_params_of,
    rdp_to_epsilon,
    round_rdp,
)

PLD = "pld"
RDP = "rdp"
ACCOUNTANTS = (PLD, RDP)
# What a claim made with each accountant is, in words (summary.json, the report).
ACCOUNTANT_NAMES = {
    PLD: "PLD (dp-accounting privacy loss distributions, pessimistic discretisation "
         "1e-3): tight upper bound",
    RDP: "RDP (integer orders 2..256): looser upper bound",
}

# Integer orders only. Opacus 1.6's series for fractional orders does not always converge
# and can then under-state epsilon (measured: 90 instead of 126 at q=0.3, sigma=0.5, 100
# steps); for integer orders its closed form is exact and agrees with dp-accounting to the
# last digit. The audit's replay uses the same grid.
RDP_ORDERS: list[float] = [float(a) for a in [*range(2, 65), 80, 96, 128, 192, 256]]
# Loss-value grid of the PLD. Pessimistic rounding keeps it an upper bound at any interval;
# 1e-3 agrees with 1e-4 to the 4th digit on this project's settings at a tenth of the time.
PLD_DISCRETIZATION = 1e-3


class NoRule(LookupError):
    """An analysis has no rule for a mechanism class (e.g. PLD for the distributed discrete
    Gaussian)."""


# -- the rule of each mechanism class, per analysis -------------------------------------

def dp_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The dp-accounting event of `steps` Poisson-subsampled Gaussian steps."""
    if steps == 0 or sample_rate == 0:
        return dp_accounting.NoOpDpEvent()
    if noise_multiplier == 0:
        return dp_accounting.NonPrivateDpEvent()
    step: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        step = dp_accounting.PoissonSampledDpEvent(sample_rate, step)
    return dp_accounting.SelfComposedDpEvent(step, steps)


@functools.singledispatch
def pld_event(mechanism: Mechanism) -> dp_accounting.DpEvent:
    """The dp-accounting event that PLD composes for `mechanism`."""
    raise NoRule(f"the PLD accountant has no rule for {mechanism.kind} mechanisms")


@pld_event.register
def _(m: SampledGaussian) -> dp_accounting.DpEvent:
    return dp_event(float(m.noise_multiplier), float(m.sample_rate), int(m.steps))


@pld_event.register
def _(m: SharedNoiseSampledGaussian) -> dp_accounting.DpEvent:
    return pld_event(m.sampled_gaussian)


@pld_event.register
def _(m: ClientLevelGaussian) -> dp_accounting.DpEvent:
    # one release of the noised mean: a Gaussian, sampled at the rate the claim takes
    return dp_event(float(m.noise_multiplier), float(m.amplification_rate), 1)


@functools.singledispatch
def rdp_curve(mechanism: Mechanism, orders: Sequence[float]) -> np.ndarray:
    """The Renyi DP of `mechanism` at each of `orders` (integers)."""
    raise NoRule(f"the RDP accountant has no rule for {mechanism.kind} mechanisms")


@rdp_curve.register
def _(m: SampledGaussian, orders: Sequence[float]) -> np.ndarray:
    return rdp_analysis.compute_rdp(q=float(m.sample_rate), noise_multiplier=float(
        m.noise_multiplier), steps=int(m.steps), orders=list(orders))


@rdp_curve.register
def _(m: SharedNoiseSampledGaussian, orders: Sequence[float]) -> np.ndarray:
    return rdp_curve(m.sampled_gaussian, orders)


@rdp_curve.register
def _(m: ClientLevelGaussian, orders: Sequence[float]) -> np.ndarray:
    return rdp_analysis.compute_rdp(q=float(m.amplification_rate), noise_multiplier=float(
        m.noise_multiplier), steps=1, orders=list(orders))


@rdp_curve.register
def _(m: DistributedDiscreteGaussian, orders: Sequence[float]) -> np.ndarray:
    # an unreleased round adds zeros but still counts (see DistributedDiscreteGaussian)
    return int(m.released) * round_rdp(ddg_params_of(m), m.sampling_rate,
                                       [int(a) for a in orders])


# -- the analyses ------------------------------------------------------------------------

def _counted(mechanisms: Sequence[Mechanism]) -> tuple[Mechanism, ...]:
    return tuple(m for m in mechanisms if not m.composes_nothing)


def grouped_events(events: Sequence[dp_accounting.DpEvent]) -> dp_accounting.DpEvent:
    """One event composing `events`, repeats of one step folded into one self-composition.

    Composition is commutative, so k rounds of the same (sigma, q) step are that step
    self-composed k x steps times. dp-accounting's PLD takes a self-composition as one FFT
    power instead of one convolution per event: a 90-round shared-noise history (one event
    per round) costs 0.3 s instead of 22 s, and a partner's budget check runs every round.
    The epsilon is the same to ~1e-9 relative (both are pessimistic upper bounds of the
    same discretised composition)."""
    counts: dict[dp_accounting.DpEvent, int] = {}
    for event in events:
        if isinstance(event, dp_accounting.SelfComposedDpEvent):
            counts[event.event] = counts.get(event.event, 0) + int(event.count)
        else:
            counts[event] = counts.get(event, 0) + 1
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(event, count) for event, count in counts.items()])


@functools.lru_cache(maxsize=4096)
def _pld(mechanisms: tuple[Mechanism, ...], delta: float) -> float:
    # Cached: the budget guard checks, then records, the same history every round.
    if any(m.noiseless for m in mechanisms):
        return math.inf
    acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(grouped_events([pld_event(m) for m in mechanisms]))
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def pld_epsilon(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """(epsilon, delta)-DP of the composition of `mechanisms` via PLD (tight; pure)."""
    counted = _counted(mechanisms)
    return _pld(counted, float(delta)) if counted else 0.0


@dataclass(frozen=True)
class RdpAnalysis:
    """Composition by Renyi DP: the mechanisms' curves at `orders` add up, and
    `to_epsilon(orders, total, delta)` converts the total to (epsilon, delta)-DP."""

    orders: tuple[float, ...]
    to_epsilon: Callable[[Sequence[float], np.ndarray, float], float]

    def epsilon(self, mechanisms: Sequence[Mechanism], delta: float) -> float:
        """Epsilon of the composition of `mechanisms` (pure)."""
        counted = _counted(mechanisms)
        return self.cumulative(counted, delta, every=False)[-1] if counted else 0.0

    def cumulative(self, mechanisms: Sequence[Mechanism], delta: float, *,
                   every: bool = True) -> list[float]:
        """Epsilon after each of `mechanisms` (pure); `every=False`: only after the last."""
        out: list[float] = []
        total: np.ndarray | None = None
        noiseless = False
        for k, m in enumerate(mechanisms):
            if not m.composes_nothing and not noiseless:
                noiseless = m.noiseless
                if not noiseless:
                    curve = rdp_curve(m, self.orders)
                    total = curve if total is None else total + curve
            if every or k == len(mechanisms) - 1:
                out.append(math.inf if noiseless else 0.0 if total is None
                           else self.to_epsilon(self.orders, total, delta))
        return out


def _opacus_epsilon(orders: Sequence[float], rdp: np.ndarray, delta: float) -> float:
    with warnings.catch_warnings():
        # "optimal order is the smallest alpha": true for tiny noise, and harmless: the
        # bound is still valid, only not the tightest RDP could give (PLD is the claim).
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


# The partners' RDP: their second opinion (and the claims of earlier versions).
PARTNER_RDP = RdpAnalysis(tuple(RDP_ORDERS), _opacus_epsilon)
# The claim of the distributed discrete Gaussian (ddg_accounting: KLS21 at its orders,
# converted by Canonne, Kamath, Steinke 2020), replayed the same way by the audit.
DISTRIBUTED_DG_RDP = RdpAnalysis(DDG_ORDERS,
                                 lambda orders, rdp, delta: rdp_to_epsilon(orders, rdp, delta)[0])


def rdp_epsilon(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """(epsilon, delta)-DP of the composition of `mechanisms` via the partners' RDP (pure)."""
    return PARTNER_RDP.epsilon(mechanisms, delta)


def epsilon_of(mechanisms: Sequence[Mechanism], delta: float, accountant: str = PLD
               ) -> float:
    """Epsilon of `mechanisms` with the named accountant ('pld' or 'rdp')."""
    if accountant == PLD:
        return pld_epsilon(mechanisms, delta)
    if accountant == RDP:
        return rdp_epsilon(mechanisms, delta)
    raise ValueError(f"unknown accountant {accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = PLD, tolerance: float = 1e-3) -> float:
    """Smallest noise multiplier (to a relative `tolerance` in sigma) that keeps `steps`
    steps at rate `sample_rate` within `target_epsilon` by the named accountant, by
    bisection on this module's own epsilon, so calibration, claim and budget guard can
    never disagree. The result always satisfies epsilon <= target_epsilon."""

    def eps(sigma: float) -> float:
        return epsilon_of([SampledGaussian(sigma, sample_rate, steps)], delta,
                          accountant)

    if not target_epsilon > 0:
        raise ValueError(f"target-epsilon must be > 0, got {target_epsilon}")
    # RDP is never tighter than PLD, so RDP's (cheap) sigma brackets PLD's from above. Only
    # the accountant itself may raise the lower end: RDP above the target at sigma does not
    # mean PLD is (that mistake returned sigma = 1.001 where PLD needs less, i.e. epsilon
    # 2.62 for a target of 3 at q = 0.05 over 45 steps).
    high = 1.0
    low = 0.0
    bracket = RDP if accountant == PLD else accountant
    while epsilon_of([SampledGaussian(high, sample_rate, steps)], delta,
                     bracket) > target_epsilon:
        if bracket == accountant or eps(high) > target_epsilon:
            low = high
        high = 2 * high
        if high > 1e4:
            raise ValueError(f"target-epsilon {target_epsilon} is unreachable with "
                             f"{steps} steps at sampling rate {sample_rate}")
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


class BudgetExhausted(RuntimeError):
    """The next round would take a partner past its max-epsilon."""

    def __init__(self, spent: float, would_be: float, max_epsilon: float) -> None:
        super().__init__(f"privacy budget exhausted: spent epsilon {spent:.4f}, this round "
                         f"would reach {would_be:.4f} > max-epsilon {max_epsilon:.4f}")
        self.spent = spent
        self.would_be = would_be
        self.max_epsilon = max_epsilon


@dataclass(frozen=True)
class Spend:
    """One entry of a partner's history: the mechanism its accountant composes, and the
    round and run (the server's ledger key) it was spent in. A shared-noise round is
    recorded as the sampled Gaussian it amounts to, so that the history keeps the layout of
    earlier versions in the node's state file and in its signed refusals."""

    mechanism: SampledGaussian
    round: int = 0
    run: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**self.mechanism.to_json(), "round": self.round, "run": self.run}

    @classmethod
    def from_json(cls, data: Any, where: str = "spend") -> Spend:
        if not isinstance(data, Mapping):
            raise F.PayloadError(f"{where} = {data!r} is not an object")
        run = data.get("run", "")  # "": a spend outside any federation run
        if not isinstance(run, str):
            raise F.PayloadError(f"{where}.run = {run!r} is not a string")
        return cls(SampledGaussian.from_json(data, where),
                   F.integer(where, "round", data.get("round", 0)), run)


class PartnerAccountant:
    """Cumulative accountant + budget guard of one partner.

    The budget is the partner's, over all runs on its data: `check` composes every spend
    the node ever recorded. `epsilon(run)` is one run's share, what that run reports. One
    accountant (`accountant`, PLD by default) makes every claim and every budget decision;
    `epsilon_rdp` is the second opinion."""

    def __init__(self, delta: float, max_epsilon: float, accountant: str = PLD) -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; allowed: "
                             f"{', '.join(ACCOUNTANTS)}")
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.accountant = accountant
        self.history: list[Spend] = []

    def _mechanisms(self, run: str | None) -> list[SampledGaussian]:
        return [s.mechanism for s in self.history if run is None or s.run == run]

    def epsilon(self, run: str | None = None) -> float:
        return epsilon_of(self._mechanisms(run), self.delta, self.accountant)

    def epsilon_rdp(self, run: str | None = None) -> float:
        return rdp_epsilon(self._mechanisms(run), self.delta)

    def epsilon_if(self, spend: Spend) -> float:
        return epsilon_of([*self._mechanisms(None), spend.mechanism], self.delta,
                          self.accountant)

    def check(self, spend: Spend) -> float:
        """Raise BudgetExhausted if `spend` would pass max-epsilon; return the new epsilon.

        Called before training, with the planned steps: training spends at most these.
        """
        would_be = self.epsilon_if(spend)
        if would_be > self.max_epsilon:
            raise BudgetExhausted(self.epsilon(), would_be, self.max_epsilon)
        return would_be

    def record(self, spend: Spend) -> float:
        """Add a spend; return the cumulative epsilon of its run."""
        self.history.append(spend)
        return self.epsilon(spend.run)

    def rounds(self) -> list[int]:
        return [s.round for s in self.history]

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "max_epsilon": self.max_epsilon,
                "accountant": self.accountant,
                "history": [s.to_json() for s in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["delta"]) != self.delta:
            # A different delta would silently change every epsilon already reported.
            raise ValueError(f"saved accountant used delta={state['delta']}, "
                             f"this run uses delta={self.delta}")
        # A node never forgets spent budget: a lower max-epsilon may be set, history stays.
        # The accountant is a way of reading the history, not part of it: a node saved
        # with RDP is read with this accountant's (tighter, still valid) analysis.
        self.history = [Spend.from_json(s, "history entry") for s in state["history"]]

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], max_epsilon: float | None = None
                        ) -> PartnerAccountant:
        acc = cls(float(state["delta"]), float(max_epsilon or state["max_epsilon"]),
                  str(state.get("accountant", PLD)))
        acc.load_state_dict(state)
        return acc
