"""The client-level half of a privacy mode: none, central (the server clips and noises the
mean: a trusted server) or distributed (discrete Gaussian shares inside the secure sum).
Each mode object owns the accountant its epsilon is composed with, the ledger event it
records and its pre-flight estimate; the server's release is the server's
(`confide.strategies.client_level_dp`, the secure round's distributed-DP accounting).
"""

from __future__ import annotations

import math

from confide.config import RunConfig
from confide.modes import CLIENT_DP, PLD, RDP, ClientLevel
from confide.privacy.mode_rules.estimates import (
    OK,
    UNKNOWN,
    MechanismEstimate,
    consequence,
    fewer_parameters,
    over_run,
    verdict_of,
)
from confide.privacy.secagg.config import SecAggConfig
from confide.privacy.secagg.errors import SecAggValidationError


class NoClientDp:
    level = ClientLevel.OFF
    accountant: str | None = None
    ledger_events: tuple[str, ...] = ()

    def estimate(self, cfg: RunConfig, d: int, n: int, example: MechanismEstimate | None
                 ) -> MechanismEstimate | None:
        return None


class CentralClientDp:
    """The server's Gaussian noise on the clipped mean, composed by PLD."""

    level = ClientLevel.CENTRAL
    accountant: str | None = PLD
    ledger_events = (CLIENT_DP,)

    def estimate(self, cfg: RunConfig, d: int, n: int, example: MechanismEstimate | None
                 ) -> MechanismEstimate | None:
        return _client_level(cfg, d, n, example, distributed=False)


class DistributedClientDp:
    """Discrete Gaussian shares inside the secure sum, composed by RDP (no tight
    accountant covers sums of discrete Gaussians)."""

    level = ClientLevel.DISTRIBUTED
    accountant: str | None = RDP
    ledger_events = (CLIENT_DP,)

    def estimate(self, cfg: RunConfig, d: int, n: int, example: MechanismEstimate | None
                 ) -> MechanismEstimate | None:
        return _client_level(cfg, d, n, example, distributed=True)


ClientLevelRule = NoClientDp | CentralClientDp | DistributedClientDp
CLIENT_LEVEL: dict[ClientLevel, ClientLevelRule] = {
    rule.level: rule for rule in (NoClientDp(), CentralClientDp(), DistributedClientDp())}


# -- the estimate -----------------------------------------------------------------------

def min_survivors(cfg: RunConfig, cohort: int, d: int) -> int:
    """The secure round's min_survivors for a cohort of `cohort` partners (the threshold
    rule of `confide.clients.secure_client.session_config`, repeated here because a core
    may not import the node; a test keeps the two equal)."""
    base = SecAggConfig(bytes(16), num_clients=cohort, vector_length=max(1, d),
                        degree=cfg.secagg_neighbours or None, bits=cfg.secagg_bits,
                        coord_clip=cfg.secagg_clip)
    k = int(base.degree)  # type: ignore[arg-type]  # resolved to an int in __post_init__
    t = min(k + 1, max(2, math.ceil(cfg.secagg_threshold * (k + 1))))
    return math.ceil(cohort * t / (k + 1))


def _client_level(cfg: RunConfig, d: int, n: int, example: MechanismEstimate | None, *,
                  distributed: bool) -> MechanismEstimate:
    sigma, C, R = cfg.client_dp_noise_multiplier, cfg.client_dp_clipping_norm, cfg.rounds
    name = "distributed-dp" if distributed else "client-dp"
    m: int | None = None
    worst: float | None = None
    if distributed:
        try:
            m = min_survivors(cfg, n, d)
        except SecAggValidationError as exc:
            return MechanismEstimate(name, UNKNOWN, None, None, sigma, C, d, n,
                                     reason=f"the secure-aggregation settings are invalid "
                                            f"({exc})", unknown=("min_survivors",))
        ratio = sigma * math.sqrt(d) / math.sqrt(m * n)
        worst = sigma * math.sqrt(d) / m
        how = (f"each of the {n} partners adds discrete Gaussian noise std sigma*C/sqrt(m) "
               f"so that any m = {m} survivors (the fewest the secagg-threshold allows) carry "
               f"sigma*C; with all {n} surviving the mean has noise std "
               f"sigma*C/sqrt({m}*{n}) per coordinate")
    else:
        ratio = sigma * math.sqrt(d) / n
        how = (f"the server adds noise std sigma*C/n per coordinate to the mean of {n} "
               "clipped updates")
    verdict = verdict_of(ratio, R)
    reason = (f"{how}: with noise multiplier {sigma:g}, clip C = {C:g} and d = {d:,} "
              f"trainable parameters the noise norm is {ratio:.1f}x the largest possible "
              f"signal (C) per round")
    if worst is not None:
        reason += f" ({worst:.1f}x if only {m} survive)"
    reason += consequence(verdict, ratio, R)
    suggestions: list[str] = []
    if verdict != OK:
        suggestions = _client_suggestions(cfg, d, n, sigma, ratio, distributed, example)
    return MechanismEstimate(
        name, verdict, ratio, over_run(ratio, R), sigma, C, d, n, min_survivors=m,
        ratio_if_min_survivors=worst, reason=reason, suggestions=tuple(suggestions))


def _client_suggestions(cfg: RunConfig, d: int, n: int, sigma: float, ratio: float,
                        distributed: bool, example: MechanismEstimate | None) -> list[str]:
    def at(partners: int) -> float:
        if not distributed:
            return sigma * math.sqrt(d) / partners
        return sigma * math.sqrt(d) / math.sqrt(min_survivors(cfg, partners, d) * partners)

    out = []
    more = max(100, 10 ** math.ceil(math.log10(n + 1)))
    needed = math.ceil(sigma * math.sqrt(d))  # client level: ratio 1 at n = sigma*sqrt(d)
    if distributed:  # m/n is about the threshold fraction: search upward
        needed = n
        while at(needed) > 1 and needed < 10 ** 7:
            needed *= 2
        lo = needed // 2
        while needed - lo > max(1, needed // 100):
            mid = (lo + needed) // 2
            lo, needed = (mid, needed) if at(mid) > 1 else (lo, mid)
    out.append(f"more partners per round: with {more} partners per round the ratio would "
               f"be {at(more):.1f}; about {needed:,} bring it to 1")
    drop = "client-dp = false" if not distributed else "distributed-dp = false"
    if example is not None and example.ratio is not None:
        out.append(f"example-level DP instead ({drop}): its ratio here is "
                   f"{example.ratio:.2f} per round")
    else:
        out.append(f"example-level DP instead ({drop}, example-dp = true): its noise is "
                   "divided by each partner's batch, not by the number of partners")
    key = "client-dp-noise-multiplier"
    out.append(f"a larger budget: {key} {sigma / ratio:.3g} instead of {sigma:g} would bring "
               "it to 1 (a much larger client-level epsilon: a weaker guarantee)")
    if distributed:
        m = min_survivors(cfg, n, d)
        if m < n:
            out.append(f"a higher secagg-threshold: noise is calibrated for {m} of {n} "
                       f"survivors; calibrated for all {n} the ratio would be "
                       f"{sigma * math.sqrt(d) / n:.1f}")
    out.append(fewer_parameters(d, ratio))
    return out
