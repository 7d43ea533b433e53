"""The example-level half of a privacy mode: no example-level DP, local noise (each
partner's DP-SGD adds all of its noise) or shared noise (each partner adds a share inside
the secure sum). Each mode object owns its noise calibration, the ledger event it records
and its pre-flight estimate; the node's update producer and the server's decoding are the
node's and the server's, picked by `ExampleNoise` (confide.clients, confide.server).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from confide.config import RunConfig
from confide.logs import plural
from confide.modes import EXAMPLE_DP, PLD, ExampleNoise
from confide.privacy.mode_rules.estimates import (
    CANNOT_LEARN,
    FEW_PASSES,
    MIN_SHARED_ROUNDS,
    OK,
    SEVERITY,
    SHARED_RATE,
    SHARED_ROUNDS_DEFAULT,
    UNKNOWN,
    WEAK,
    MechanismEstimate,
    calibrated,
    consequence,
    fewer_parameters,
    over_run,
    partner_sigmas,
    plan,
    verdict_of,
)
from confide.privacy.sampling import poisson_rate


class NoExampleDp:
    """Records are not protected one by one: nothing calibrated, recorded or estimated."""

    noise = ExampleNoise.OFF
    ledger_events: tuple[str, ...] = ()

    def noise_multiplier(self, cfg: RunConfig, sample_rate: float, steps_per_round: int,
                         accountant: str = PLD) -> float:
        return 0.0

    def estimate(self, cfg: RunConfig, d: int, n: int, sizes: Sequence[int] | None
                 ) -> MechanismEstimate | None:
        return None


class LocalNoise:
    """Each partner's DP-SGD adds all of its noise: `steps` Poisson steps per round at the
    rate of its own plan (`confide.privacy.sampling.plan_round`)."""

    noise = ExampleNoise.LOCAL
    ledger_events = (EXAMPLE_DP,)

    def noise_multiplier(self, cfg: RunConfig, sample_rate: float, steps_per_round: int,
                         accountant: str = PLD) -> float:
        return _run_noise_multiplier(cfg, sample_rate, steps_per_round, accountant)

    def estimate(self, cfg: RunConfig, d: int, n: int, sizes: Sequence[int] | None
                 ) -> MechanismEstimate | None:
        return _local_example_dp(cfg, d, n, sizes)


class SharedNoise:
    """Each partner adds a share of the noise inside the secure sum: one noisy gradient per
    round on the union of the records, every partner sampled at the federation's common
    rate batch-size / (all partners' records), one step per round."""

    noise = ExampleNoise.SHARED
    ledger_events = (EXAMPLE_DP,)

    def noise_multiplier(self, cfg: RunConfig, sample_rate: float, steps_per_round: int = 1,
                         accountant: str = PLD) -> float:
        return _run_noise_multiplier(cfg, sample_rate, steps_per_round, accountant)

    def estimate(self, cfg: RunConfig, d: int, n: int, sizes: Sequence[int] | None
                 ) -> MechanismEstimate | None:
        return _shared_example_dp(cfg, d, n, sizes)


def _run_noise_multiplier(cfg: RunConfig, sample_rate: float, steps_per_round: int,
                          accountant: str) -> float:
    # imported when asked: the secure-aggregation stages read the rules without paying for
    # dp-accounting and torch
    from confide.privacy.calibration import run_noise_multiplier

    return run_noise_multiplier(cfg, sample_rate, steps_per_round, accountant)


ExampleLevelRule = NoExampleDp | LocalNoise | SharedNoise
EXAMPLE_LEVEL: dict[ExampleNoise, ExampleLevelRule] = {
    rule.noise: rule for rule in (NoExampleDp(), LocalNoise(), SharedNoise())}


# -- the estimates ----------------------------------------------------------------------

def _example_ratio(cfg: RunConfig, sizes: Sequence[int], d: int, n: int,
                   sigmas: np.ndarray, batch_size: int | None = None
                   ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate per-round ratio, and per partner: B, steps, per-round ratio."""
    rows = np.asarray(sizes, dtype=float)
    plans = [plan(cfg, int(r), batch_size) for r in rows]
    batch = np.array([q * r for (q, _), r in zip(plans, rows, strict=True)])
    steps = np.array([s for _, s in plans], dtype=float)
    per_partner = sigmas * math.sqrt(d) / (batch * np.sqrt(steps))
    # weights of the server's mean: example counts (capped inside a weighted secure sum), or
    # 1 each with distributed DP
    if not cfg.privacy_mode.secure:
        w = rows
    elif cfg.secure_sum_weighted:
        w = np.minimum(rows, cfg.secagg_max_weight)
    else:
        w = np.ones_like(rows)
    # a sample of n partners: sum over the sample ~ n * mean over all partners
    with np.errstate(invalid="ignore"):
        agg = math.sqrt(n * float(np.mean(w ** 2 * per_partner ** 2))) / (n * float(np.mean(w)))
    return agg, batch, steps, per_partner


def _shared_example_dp(cfg: RunConfig, d: int, n: int, sizes: Sequence[int] | None
                       ) -> MechanismEstimate:
    """Shared noise: one noisy gradient per round on the union, central DP-SGD's step. The
    sum of clipped gradients of the expected batch B = q N (N: all records, q = batch / N)
    carries noise std sigma*C per coordinate; divided by B: ratio sigma*sqrt(d)/B.

    Two schedules are flagged (weak) whatever the ratio, because the ratio cannot see them:
    q reaching 1 (batch-size >= N: every round's gradient is over every record, no sampling
    amplification, and the mode's defaults were measured at q <= 0.34) and fewer than
    MIN_SHARED_ROUNDS rounds (each round is one server-optimizer step)."""
    name, C, R = "example-dp (shared noise)", cfg.max_grad_norm, cfg.rounds
    if not sizes:
        return MechanismEstimate(
            name, UNKNOWN, None, None, cfg.noise_multiplier or None, C, d, n,
            reason="estimated once the partners report their record counts (the server "
                   "learns them before round 1)",
            unknown=("partners' training rows",))
    total = sum(int(s) for s in sizes if s > 0)
    q = poisson_rate(cfg.batch_size, total)
    sigma = cfg.noise_multiplier or calibrated(cfg.target_epsilon, cfg.delta, q, R)
    # only the sampled share of the records contributes when fraction-train < 1
    B = q * total * min(1.0, n / max(1, len(sizes)))
    ratio = sigma * math.sqrt(d) / B if math.isfinite(sigma) else math.inf
    verdict = verdict_of(ratio, R)
    passes = R * B / total  # expected times each record is in a round's gradient
    reason = (f"one noisy gradient per round on the union of the records: rate q = "
              f"{q:.3g} for every partner, expected batch {B:.0f} of {total:,} records, "
              f"sigma {sigma:.3f}, d = {d:,}: noise/signal {ratio:.2f} per round; "
              f"{passes:.1f} passes over the records in {plural(R, 'round')}")
    reason += consequence(verdict, ratio, R)
    suggestions: list[str] = []
    if verdict != OK:
        suggestions = [f"a larger batch-size (the federation's expected batch): about "
                       f"{math.ceil(B * ratio):,} would bring the ratio to 1",
                       "a larger target-epsilon", fewer_parameters(d, ratio)]
    schedule = _shared_schedule(cfg, q, total)
    if schedule:
        verdict = max(verdict, WEAK, key=SEVERITY.__getitem__)
        reason += "".join(f" {why}" for why, _ in schedule)
        suggestions = [fix for _, fix in schedule] + suggestions
    elif verdict == OK and passes < FEW_PASSES and not cfg.noise_multiplier:
        # Signal-dominated rounds but few of them: compute-bound, not noise-bound.
        suggestions = [f"more rounds if compute allows: {passes:.1f} passes over the records "
                       f"is few; at the same epsilon sigma grows slowly with rounds at this "
                       f"rate ({_more_rounds_hint(cfg, q, sigma, passes)}). Measured (SST-2, "
                       "20,000 records, batch 1,024, epsilon 8, this mode's defaults): "
                       "a 60-round run (3.1 passes) reached 83.6%, where the 30-round "
                       "default (1.5 passes) reached 79.1% with an earlier server step "
                       "(benchmarks/results/shared_noise_search.md, utility_sst2.md)"]
    return MechanismEstimate(name, verdict, ratio, over_run(ratio, R), sigma, C, d, n,
                             expected_batch=B, steps_per_round=1, ratio_per_step=ratio,
                             reason=reason, suggestions=tuple(suggestions))


def _shared_schedule(cfg: RunConfig, q: float, total: int) -> list[tuple[str, str]]:
    """(what is wrong, what would fix it) for a shared-noise schedule that the noise ratio
    does not see: q = 1, or too few server steps."""
    out: list[tuple[str, str]] = []
    if q >= 1.0:
        batch = max(1, round(total * SHARED_RATE))
        at = ""
        if not cfg.noise_multiplier:
            sigma = calibrated(cfg.target_epsilon, cfg.delta, batch / total, cfg.rounds)
            at = f" (sigma {sigma:.3f} at the same epsilon)"
        out.append((
            f"The common rate q = batch-size / records reached 1: batch-size "
            f"{cfg.batch_size:,} >= the federation's {total:,} records, so every round's "
            "gradient is over every record, without the privacy amplification of sampling "
            f"(this mode's defaults were measured at q = {SHARED_RATE:.2g} and below).",
            f"a smaller batch-size: about {batch:,} (q = {SHARED_RATE:.2g}){at}, or more "
            f"records than {cfg.batch_size:,} across the partners"))
    if cfg.rounds < MIN_SHARED_ROUNDS:
        out.append((
            f"With {plural(cfg.rounds, 'round')} the server optimizer takes "
            f"{plural(cfg.rounds, 'step')} (one per round in this mode): too few to learn (the "
            f"fewest measured to learn: {MIN_SHARED_ROUNDS} rounds reached 74.2% on SST-2, "
            "benchmarks/results/shared_noise_search.md).",
            f"more rounds: at least {MIN_SHARED_ROUNDS} (this mode's default is "
            f"{SHARED_ROUNDS_DEFAULT}); at the same epsilon sigma grows only slowly with "
            "rounds"))
    return out


def _more_rounds_hint(cfg: RunConfig, q: float, sigma: float, passes: float) -> str:
    rounds = math.ceil(cfg.rounds * FEW_PASSES / passes)
    more = calibrated(cfg.target_epsilon, cfg.delta, q, rounds)
    return f"{rounds} rounds would make {FEW_PASSES:g} passes with sigma {more:.3f} instead of " \
           f"{sigma:.3f}"


def _local_example_dp(cfg: RunConfig, d: int, n: int, sizes: Sequence[int] | None
                      ) -> MechanismEstimate:
    """Local noise: each partner's own DP-SGD round (sigma by `run_noise_multiplier` for its
    plan), averaged by the server (module docstring of confide.privacy.preflight)."""
    name, C, R = "example-dp", cfg.max_grad_norm, cfg.rounds
    if not sizes:
        sigma = cfg.noise_multiplier or None
        best = (f"; with noise multiplier {sigma:g} and at most batch-size = "
                f"{cfg.batch_size} rows per step, one step's ratio is at least "
                f"{sigma * math.sqrt(d) / cfg.batch_size:.2f}" if sigma else "")
        return MechanismEstimate(
            name, UNKNOWN, None, None, sigma, C, d, n,
            reason="partners' row counts are not known to the server in deployment (each "
                   "partner's node log shows its sigma and steps per round)" + best,
            suggestions=("each partner's node log shows its sigma and steps per round; "
                         "the ratio per step is sigma * sqrt(d) / expected batch",),
            unknown=("partners' training rows (the server sees them only in simulation)",))
    sizes = [int(s) for s in sizes if s > 0]
    sigmas = partner_sigmas(cfg, sizes)
    agg, batch, steps, per_partner = _example_ratio(cfg, sizes, d, n, sigmas)
    mid = int(np.argsort(sizes)[len(sizes) // 2])
    sigma, B, k = float(sigmas[mid]), float(batch[mid]), int(steps[mid])
    per_step = sigma * math.sqrt(d) / B
    if not math.isfinite(agg):
        return MechanismEstimate(
            name, CANNOT_LEARN, None, None, None, C, d, n, reason=(
                f"target-epsilon {cfg.target_epsilon:g} cannot be reached with "
                f"{k * R} steps at sampling rate {poisson_rate(cfg.batch_size, sizes[mid]):.3g}"
                ": the nodes would refuse to train."),
            suggestions=("a larger target-epsilon, fewer rounds or local epochs",))
    verdict = verdict_of(agg, R)
    weighting = ("equal weights: distributed DP" if cfg.privacy_mode.secure
                 and not cfg.secure_sum_weighted else "weighted by example counts")
    reason = (f"each partner adds noise std sigma*C per coordinate to a step's gradient sum "
              f"and divides by its expected batch: median partner sigma {sigma:.3f}, "
              f"B = {B:.0f} rows, {k} steps per round, d = {d:,}: noise/signal "
              f"{per_step:.2f} per step, {per_step / math.sqrt(k):.2f} per round; the mean "
              f"of {n} partners ({weighting}) gives {agg:.2f} per round")
    reason += consequence(verdict, agg, R)
    suggestions: list[str] = []
    if verdict != OK:
        suggestions = _example_suggestions(cfg, sizes, d, n, sigmas, agg, mid, per_partner)
    return MechanismEstimate(
        name, verdict, agg, over_run(agg, R), sigma, C, d, n, expected_batch=B,
        steps_per_round=k, ratio_per_step=per_step, reason=reason,
        suggestions=tuple(suggestions))


def _example_suggestions(cfg: RunConfig, sizes: list[int], d: int, n: int,
                         sigmas: np.ndarray, agg: float, mid: int,
                         per_partner: np.ndarray) -> list[str]:
    out = [f"more partners per round: the ratio falls as 1/sqrt(n); about "
           f"{math.ceil(n * agg ** 2)} partners per round would bring it to 1"]
    rows = sizes[mid]
    one = [rows]  # recalibrate only the median partner: each calibration costs seconds
    if cfg.noise_multiplier == 0:
        bigger = 2 * cfg.target_epsilon
        s2 = float(partner_sigmas(cfg, one, target_epsilon=bigger)[0])
        if math.isfinite(s2):
            out.append(f"a larger budget: target-epsilon {bigger:g} would give about "
                       f"{agg * s2 / float(sigmas[mid]):.2f}")
    else:
        out.append("a smaller noise-multiplier (a larger epsilon): the ratio scales with it")
    if cfg.batch_size < rows:
        batch = min(rows, 4 * cfg.batch_size)
        s4 = float(partner_sigmas(cfg, one, batch_size=batch)[0])
        q, steps = plan(cfg, rows, batch)
        new = s4 * math.sqrt(d) / (q * rows * math.sqrt(steps))
        if math.isfinite(new):
            out.append(f"larger batches: batch-size {batch} would give about "
                       f"{agg * new / float(per_partner[mid]):.2f}")
    out.append(fewer_parameters(d, agg))
    return out
