"""Pre-flight check: can this configuration learn at all, before any budget is spent?

From the configuration alone (plus what the server knows: the number of trainable
parameters d, the partners sampled per round n and, in simulation, each partner's number of
training rows) this estimates, for each active DP mechanism, the **norm of the noise on one
round's aggregated update relative to the largest possible signal** of that update. It is an
order-of-magnitude estimate, not a utility prediction:

* example-level DP (DP-SGD on each partner): one step adds Gaussian noise of std sigma*C per
  coordinate to the sum of clipped per-example gradients and divides by the expected batch
  B = q * rows, so a step's noise norm is sigma*C*sqrt(d)/B against a largest mean gradient
  of C: ratio sigma*sqrt(d)/B per step. Over the `steps` local steps of a round the signal
  can add coherently (at most steps*C) while independent noise adds as sqrt(steps), so the
  **reported per-round ratio** is sigma*sqrt(d)/(B*sqrt(steps)) per partner. The server's
  mean (weights w_i: example counts in plain FedAvg, equal inside secure aggregation)
  divides the noise by about sqrt(n): sqrt(sum w_i^2 r_i^2) / sum w_i. sigma is what the
  node calibrates (`calibrate_noise` over steps * rounds), or `noise-multiplier`. Local
  optimizers (Adam) rescale steps, and the model moves between steps: order of magnitude.
* client-level DP (`client-dp`, central Gaussian): clip C_c per client, noise std
  sigma_c*C_c/n per coordinate on the equal-weight mean: ratio sigma_c*sqrt(d)/n.
* distributed DP (`distributed-dp` inside secure aggregation): each client adds noise of std
  sigma_c*C_c/sqrt(m) so that any m = min_survivors clients (the fewest the SecAgg threshold
  allows) carry the total sigma_c*C_c; with all n of the cohort surviving the mean has noise
  std sigma_c*C_c/sqrt(m*n): ratio sigma_c*sqrt(d)/sqrt(m*n) (>= the client-level ratio at
  the same n), and sigma_c*sqrt(d)/m if only m survive.

"Largest possible signal" is generous: clipped per-example gradients point in different
directions and real mean updates are usually a fraction of the clip norm, so a real run is
noisier than these ratios say.

Verdicts, per mechanism, on the per-round ratio rho and the number of rounds R:

* ``ok``: rho <= 1. Each round's aggregate can be signal-dominated.
* ``weak``: rho > 1 but rho/sqrt(R) <= 3. Each round is noise-dominated; only averaging
  over rounds can recover the signal, so learning is slow and capped.
* ``cannot-learn``: rho/sqrt(R) > 3. Even if every round pushed the same way at the full
  clip norm (signal adds as R, noise as sqrt(R)), the whole run's accumulated noise would
  exceed the largest accumulated signal 3x; the factor 3 (half an order of magnitude) keeps a
  rough estimate from refusing a run that is merely poor.
* ``unknown``: a needed number is not known to the server (partners' row counts in
  deployment with local noise; with shared noise a deployed server learns them before round
  1 and checks then). Printed as one line.

Shared noise is also ``weak`` whatever its ratio when q = batch / N reaches 1 or the run has
fewer than MIN_SHARED_ROUNDS rounds (server steps): schedules the ratio cannot see.

The overall verdict is the worst mechanism's. Pure and transport-free: no Flower imports.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from confide.config import SHARED_NOISE_DEFAULTS, ConfigError, RunConfig
from confide.logs import plural
from confide.modes import ClientLevel
from confide.privacy.accountant import calibrate_noise
from confide.privacy.sampling import plan_round, poisson_rate
from confide.privacy.secagg.config import SecAggConfig
from confide.privacy.secagg.errors import SecAggValidationError

MODES = ("warn", "error", "off")
OK, WEAK, CANNOT_LEARN, UNKNOWN = "ok", "weak", "cannot-learn", "unknown"
_SEVERITY = {OK: 0, UNKNOWN: 1, WEAK: 2, CANNOT_LEARN: 3}
WEAK_ABOVE = 1.0  # per-round ratio above which a round is noise-dominated
CANNOT_LEARN_ABOVE = 3.0  # ratio / sqrt(rounds) above which the whole run is noise-dominated
# Shared noise: fewer expected passes over the records than this, with signal-dominated
# rounds, and the run is compute-bound (benchmarks/results/utility_sst2.md, 20,000 rows)
FEW_PASSES = 3.0
# Shared noise: each round is one server-optimizer step; 6 rounds (6 steps) at the mode's
# defaults reached 74.2% on 3,000 SST-2 records, the fewest measured to learn
# (benchmarks/results/shared_noise_search.md); fewer is flagged.
MIN_SHARED_ROUNDS = 6
# Shared noise: the rate the mode's defaults were measured at (1,024 of 3,000 records); a
# batch-size that makes q = 1 is pointed here.
SHARED_RATE = 1024 / 3000
SHARED_ROUNDS_DEFAULT = int(SHARED_NOISE_DEFAULTS["rounds"])
NOTE = ("order-of-magnitude estimate: noise norm on one round's aggregated update / the "
        "largest possible signal (clip norm; local steps add signal coherently, noise as "
        "sqrt(steps)); real updates are smaller than the clip norm, so real runs are noisier")


class PreflightRefused(ConfigError):
    """preflight = 'error' and the configuration cannot learn: the run does not start."""


@dataclass(frozen=True)
class MechanismEstimate:
    """Noise-to-signal estimate of one DP mechanism (None: not applicable or unknown)."""

    mechanism: str  # 'example-dp', 'client-dp' or 'distributed-dp'
    verdict: str
    ratio: float | None  # per round, on the aggregate
    ratio_over_run: float | None  # ratio / sqrt(rounds): best case over the whole run
    noise_multiplier: float | None  # example DP: the median partner's
    clipping_norm: float
    trainable_parameters: int
    partners_per_round: int
    expected_batch: float | None = None  # example DP: median partner's B = q * rows
    steps_per_round: int | None = None  # example DP: median partner's local steps
    ratio_per_step: float | None = None  # example DP: median partner, one step
    min_survivors: int | None = None  # distributed DP: the noise is calibrated for these
    ratio_if_min_survivors: float | None = None  # distributed DP: only m survive
    reason: str = ""
    suggestions: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreflightReport:
    """What the pre-flight check found, for the log, the console and summary.json."""

    mode: str
    verdict: str
    rounds: int
    trainable_parameters: int
    partners_per_round: int
    partition_rows_known: bool
    mechanisms: tuple[MechanismEstimate, ...] = ()
    thresholds: dict[str, float] = field(default_factory=lambda: {
        "weak_above_ratio": WEAK_ABOVE, "cannot_learn_above_ratio_over_run":
        CANNOT_LEARN_ABOVE})
    note: str = NOTE

    @property
    def cannot_learn(self) -> bool:
        return self.verdict == CANNOT_LEARN

    @property
    def needs_attention(self) -> bool:
        return self.verdict in (WEAK, CANNOT_LEARN)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite numbers become null) for summary.json."""
        return _json_safe(dataclasses.asdict(self))

    def headline(self) -> str:
        if not self.mechanisms:
            return "pre-flight: no DP noise in this configuration (nothing to check)"
        parts = [f"{m.mechanism} {_fmt(m.ratio)}" for m in self.mechanisms]
        return (f"pre-flight: {self.verdict.upper()}: noise/signal per round "
                f"{', '.join(parts)} (d = {self.trainable_parameters:,}, "
                f"{self.partners_per_round} partners per round, {plural(self.rounds, 'round')})")

    def lines(self) -> list[str]:
        """Plain lines for the log and the console: numbers, reason, what would help. A
        mechanism the server cannot estimate (partners' rows unknown) takes one line; a
        report with nothing estimated is that one line alone."""
        known = [m for m in self.mechanisms if m.verdict != UNKNOWN]
        unknown = [m for m in self.mechanisms if m.verdict == UNKNOWN]
        if not known and unknown:
            return ["pre-flight: not estimated: " + "; ".join(
                f"{m.mechanism}: {m.reason}" for m in unknown)]
        out = [self.headline()]
        for m in self.mechanisms:
            out.append(f"  {m.mechanism} [{m.verdict}]: {m.reason}")
            if m.verdict != UNKNOWN:
                out.extend(f"    would help: {s}" for s in m.suggestions)
        if known:
            out.append(f"  ({self.note}; silence with preflight = 'off')")
        return out


# -- inputs the server knows --------------------------------------------------------------

def partners_per_round(cfg: RunConfig) -> int:
    """Partners sampled per round, as the server samples them (Flower's FedAvg sampling:
    max(int(clients * fraction), min-clients); the secure cohort needs at least 2)."""
    n = max(int(cfg.clients * cfg.fraction_train), cfg.min_clients)
    if cfg.privacy_mode.secure:
        n = max(2, n)
    return max(1, min(n, cfg.clients))


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


@lru_cache(maxsize=64)
def _calibrated(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    # cached: the simulation driver and the ServerApp check the same run in one process
    try:
        return float(calibrate_noise(target_epsilon, delta, q, steps))
    except ValueError:  # unreachable target: the node would refuse to train
        return math.inf


def _plan(cfg: RunConfig, rows: int, batch_size: int | None = None) -> tuple[float, int]:
    """(q, steps per round) exactly as the node plans them (local_round._train_round)."""
    plan = plan_round(batch_size or cfg.batch_size, rows, cfg.local_epochs)
    return plan.sample_rate, plan.steps


def _sigmas(cfg: RunConfig, sizes: Sequence[int], target_epsilon: float | None = None,
            batch_size: int | None = None) -> np.ndarray:
    """Each partner's noise multiplier. Calibration costs seconds, so at most three partner
    sizes (smallest, median, largest; only the median when all are within 10%) are
    calibrated and the others interpolated in log(sigma) over log(rows): smooth in between,
    and enough for an order of magnitude."""
    if cfg.noise_multiplier > 0:
        return np.full(len(sizes), cfg.noise_multiplier)
    eps = target_epsilon or cfg.target_epsilon
    distinct = sorted(set(sizes))
    if distinct[-1] <= 1.1 * distinct[0]:  # near-equal partitions (IID): one calibration
        anchors = [distinct[len(distinct) // 2]]
    elif len(distinct) <= 3:
        anchors = distinct
    else:
        anchors = sorted({distinct[0], distinct[len(distinct) // 2], distinct[-1]})
    values = []
    for rows in anchors:
        q, steps = _plan(cfg, rows, batch_size)
        values.append(_calibrated(eps, cfg.delta, q, steps * cfg.rounds))
    if len(anchors) == 1 or not all(map(math.isfinite, values)):
        lookup = dict(zip(anchors, values, strict=True))
        if all(s in lookup for s in sizes):
            return np.array([lookup[s] for s in sizes])
        return np.full(len(sizes), values[0] if len(values) == 1 else max(values))
    return np.exp(np.interp(np.log(sizes), np.log(anchors), np.log(values)))


# -- the three mechanisms -----------------------------------------------------------------

def _verdict(ratio: float | None, rounds: int) -> str:
    if ratio is None:
        return UNKNOWN
    if ratio <= WEAK_ABOVE:
        return OK
    return CANNOT_LEARN if ratio / math.sqrt(rounds) > CANNOT_LEARN_ABOVE else WEAK


def _over_run(ratio: float | None, rounds: int) -> float | None:
    return None if ratio is None else ratio / math.sqrt(rounds)


def _example_ratio(cfg: RunConfig, sizes: Sequence[int], d: int, n: int,
                   sigmas: np.ndarray, batch_size: int | None = None
                   ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate per-round ratio, and per partner: B, steps, per-round ratio."""
    rows = np.asarray(sizes, dtype=float)
    plans = [_plan(cfg, int(r), batch_size) for r in rows]
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
    sigma = cfg.noise_multiplier or _calibrated(cfg.target_epsilon, cfg.delta, q, R)
    # only the sampled share of the records contributes when fraction-train < 1
    B = q * total * min(1.0, n / max(1, len(sizes)))
    ratio = sigma * math.sqrt(d) / B if math.isfinite(sigma) else math.inf
    verdict = _verdict(ratio, R)
    passes = R * B / total  # expected times each record is in a round's gradient
    reason = (f"one noisy gradient per round on the union of the records: rate q = "
              f"{q:.3g} for every partner, expected batch {B:.0f} of {total:,} records, "
              f"sigma {sigma:.3f}, d = {d:,}: noise/signal {ratio:.2f} per round; "
              f"{passes:.1f} passes over the records in {plural(R, 'round')}")
    reason += _consequence(verdict, ratio, R)
    suggestions: list[str] = []
    if verdict != OK:
        suggestions = [f"a larger batch-size (the federation's expected batch): about "
                       f"{math.ceil(B * ratio):,} would bring the ratio to 1",
                       "a larger target-epsilon", _fewer_parameters(d, ratio)]
    schedule = _shared_schedule(cfg, q, total)
    if schedule:
        verdict = max(verdict, WEAK, key=_SEVERITY.__getitem__)
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
    return MechanismEstimate(name, verdict, ratio, _over_run(ratio, R), sigma, C, d, n,
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
            sigma = _calibrated(cfg.target_epsilon, cfg.delta, batch / total, cfg.rounds)
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
    more = _calibrated(cfg.target_epsilon, cfg.delta, q, rounds)
    return f"{rounds} rounds would make {FEW_PASSES:g} passes with sigma {more:.3f} instead of " \
           f"{sigma:.3f}"


def _example_dp(cfg: RunConfig, d: int, n: int, sizes: Sequence[int] | None
                ) -> MechanismEstimate:
    if cfg.privacy_mode.shared_noise:
        return _shared_example_dp(cfg, d, n, sizes)
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
    sigmas = _sigmas(cfg, sizes)
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
    verdict = _verdict(agg, R)
    weighting = ("equal weights: distributed DP" if cfg.privacy_mode.secure
                 and not cfg.secure_sum_weighted else "weighted by example counts")
    reason = (f"each partner adds noise std sigma*C per coordinate to a step's gradient sum "
              f"and divides by its expected batch: median partner sigma {sigma:.3f}, "
              f"B = {B:.0f} rows, {k} steps per round, d = {d:,}: noise/signal "
              f"{per_step:.2f} per step, {per_step / math.sqrt(k):.2f} per round; the mean "
              f"of {n} partners ({weighting}) gives {agg:.2f} per round")
    reason += _consequence(verdict, agg, R)
    suggestions: list[str] = []
    if verdict != OK:
        suggestions = _example_suggestions(cfg, sizes, d, n, sigmas, agg, mid, per_partner)
    return MechanismEstimate(
        name, verdict, agg, _over_run(agg, R), sigma, C, d, n, expected_batch=B,
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
        s2 = float(_sigmas(cfg, one, target_epsilon=bigger)[0])
        if math.isfinite(s2):
            out.append(f"a larger budget: target-epsilon {bigger:g} would give about "
                       f"{agg * s2 / float(sigmas[mid]):.2f}")
    else:
        out.append("a smaller noise-multiplier (a larger epsilon): the ratio scales with it")
    if cfg.batch_size < rows:
        batch = min(rows, 4 * cfg.batch_size)
        s4 = float(_sigmas(cfg, one, batch_size=batch)[0])
        q, steps = _plan(cfg, rows, batch)
        new = s4 * math.sqrt(d) / (q * rows * math.sqrt(steps))
        if math.isfinite(new):
            out.append(f"larger batches: batch-size {batch} would give about "
                       f"{agg * new / float(per_partner[mid]):.2f}")
    out.append(_fewer_parameters(d, agg))
    return out


def _fewer_parameters(d: int, ratio: float) -> str:
    return (f"fewer trainable parameters: the ratio scales with sqrt(d); about "
            f"{max(1, int(d / ratio ** 2)):,} instead of {d:,} would bring it to 1 "
            "(fine-tune = 'head', a lower lora-rank or fewer lora-targets)")


def _consequence(verdict: str, ratio: float, rounds: int) -> str:
    if verdict == OK:
        return "."
    if verdict == WEAK:
        return (f". Each round's aggregate is noise-dominated; only averaging over the "
                f"{rounds} rounds (best case {ratio / math.sqrt(rounds):.2f}) can recover "
                "the signal: expect slow, limited learning.")
    every = "the one round" if rounds == 1 else f"all {rounds} rounds"
    return (f". Even if {every} pushed the same way at the full clip norm, the "
            f"noise would still be {ratio / math.sqrt(rounds):.1f}x the signal: this "
            "configuration cannot learn.")


def _client_level(cfg: RunConfig, d: int, n: int, example: MechanismEstimate | None
                  ) -> MechanismEstimate:
    sigma, C, R = cfg.client_dp_noise_multiplier, cfg.client_dp_clipping_norm, cfg.rounds
    distributed = cfg.privacy_mode.client is ClientLevel.DISTRIBUTED
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
    verdict = _verdict(ratio, R)
    reason = (f"{how}: with noise multiplier {sigma:g}, clip C = {C:g} and d = {d:,} "
              f"trainable parameters the noise norm is {ratio:.1f}x the largest possible "
              f"signal (C) per round")
    if worst is not None:
        reason += f" ({worst:.1f}x if only {m} survive)"
    reason += _consequence(verdict, ratio, R)
    suggestions: list[str] = []
    if verdict != OK:
        suggestions = _client_suggestions(cfg, d, n, sigma, ratio, distributed, example)
    return MechanismEstimate(
        name, verdict, ratio, _over_run(ratio, R), sigma, C, d, n, min_survivors=m,
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
    out.append(_fewer_parameters(d, ratio))
    return out


# -- the check ---------------------------------------------------------------------------

def check(cfg: RunConfig, trainable_parameters: int,
          partition_rows: Sequence[int] | None = None) -> PreflightReport:
    """Estimate noise/signal of the aggregate for every active mechanism of `cfg`.

    `partition_rows`: each partner's number of training rows, when the caller knows them
    (simulation); None in deployment, where example-level DP is then reported as unknown.
    Never changes the configuration; `preflight = 'off'` is the caller's to honour."""
    d = int(trainable_parameters)
    n = partners_per_round(cfg)
    mechanisms: list[MechanismEstimate] = []
    example = _example_dp(cfg, d, n, partition_rows) if cfg.privacy_mode.example_dp else None
    if example is not None:
        mechanisms.append(example)
    if cfg.privacy_mode.client_level:
        mechanisms.append(_client_level(cfg, d, n, example))
    verdict = max((m.verdict for m in mechanisms), key=_SEVERITY.__getitem__, default=OK)
    return PreflightReport(mode=cfg.preflight, verdict=verdict, rounds=cfg.rounds,
                           trainable_parameters=d, partners_per_round=n,
                           partition_rows_known=partition_rows is not None,
                           mechanisms=tuple(mechanisms))


def refusal_message(report: PreflightReport) -> str:
    """The error of preflight = 'error' (one paragraph: numbers, reason, what would help)."""
    return ("this configuration cannot learn, so no round was run and no privacy "
            "budget was spent (preflight = 'error'; set preflight = 'warn' to run anyway):\n"
            + "\n".join(report.lines()))


def _fmt(ratio: float | None) -> str:
    return "unknown" if ratio is None else f"{ratio:.2f}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
