"""What every mode's pre-flight estimate shares: the verdict scale, the estimate record,
and the cached calibration the estimates ask for (the mechanism math itself is each mode's:
`example_level.py`, `client_level.py`; the report and the check are
`confide.privacy.preflight`'s)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from confide.config import SHARED_NOISE_DEFAULTS, RunConfig
from confide.privacy.sampling import plan_round

OK, WEAK, CANNOT_LEARN, UNKNOWN = "ok", "weak", "cannot-learn", "unknown"
SEVERITY = {OK: 0, UNKNOWN: 1, WEAK: 2, CANNOT_LEARN: 3}
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


@lru_cache(maxsize=64)
def calibrated(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    # cached: the simulation driver and the ServerApp check the same run in one process
    from confide.privacy.accountant import calibrate_noise  # dp-accounting: only when asked

    try:
        return float(calibrate_noise(target_epsilon, delta, q, steps))
    except ValueError:  # unreachable target: the node would refuse to train
        return math.inf


def plan(cfg: RunConfig, rows: int, batch_size: int | None = None) -> tuple[float, int]:
    """(q, steps per round) exactly as the node plans them (clients.local_round.node_round)."""
    plan = plan_round(batch_size or cfg.batch_size, rows, cfg.local_epochs)
    return plan.sample_rate, plan.steps


def partner_sigmas(cfg: RunConfig, sizes: Sequence[int], target_epsilon: float | None = None,
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
        q, steps = plan(cfg, rows, batch_size)
        values.append(calibrated(eps, cfg.delta, q, steps * cfg.rounds))
    if len(anchors) == 1 or not all(map(math.isfinite, values)):
        lookup = dict(zip(anchors, values, strict=True))
        if all(s in lookup for s in sizes):
            return np.array([lookup[s] for s in sizes])
        return np.full(len(sizes), values[0] if len(values) == 1 else max(values))
    return np.exp(np.interp(np.log(sizes), np.log(anchors), np.log(values)))




def verdict_of(ratio: float | None, rounds: int) -> str:
    if ratio is None:
        return UNKNOWN
    if ratio <= WEAK_ABOVE:
        return OK
    return CANNOT_LEARN if ratio / math.sqrt(rounds) > CANNOT_LEARN_ABOVE else WEAK


def over_run(ratio: float | None, rounds: int) -> float | None:
    return None if ratio is None else ratio / math.sqrt(rounds)


def fewer_parameters(d: int, ratio: float) -> str:
    return (f"fewer trainable parameters: the ratio scales with sqrt(d); about "
            f"{max(1, int(d / ratio ** 2)):,} instead of {d:,} would bring it to 1 "
            "(fine-tune = 'head', a lower lora-rank or fewer lora-targets)")


def consequence(verdict: str, ratio: float, rounds: int) -> str:
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
