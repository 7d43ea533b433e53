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
  node calibrates (`confide.privacy.calibration`), or `noise-multiplier`. Local optimizers
  (Adam) rescale steps, and the model moves between steps: order of magnitude.
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

The overall verdict is the worst mechanism's. Each mechanism's estimate belongs to its mode
(`confide.privacy.mode_rules`); this module holds the report and the check. Pure and
transport-free: no Flower imports.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confide.config import ConfigError, RunConfig
from confide.logs import plural
from confide.privacy.mode_rules import rules_of
from confide.privacy.mode_rules.client_level import min_survivors
from confide.privacy.mode_rules.estimates import (
    CANNOT_LEARN,
    CANNOT_LEARN_ABOVE,
    NOTE,
    OK,
    SEVERITY,
    UNKNOWN,
    WEAK,
    WEAK_ABOVE,
    MechanismEstimate,
    verdict_of,
)

MODES = ("warn", "error", "off")


class PreflightRefused(ConfigError):
    """preflight = 'error' and the configuration cannot learn: the run does not start."""


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


# -- the check ---------------------------------------------------------------------------

def check(cfg: RunConfig, trainable_parameters: int,
          partition_rows: Sequence[int] | None = None) -> PreflightReport:
    """Estimate noise/signal of the aggregate for every active mechanism of `cfg`.

    `partition_rows`: each partner's number of training rows, when the caller knows them
    (simulation); None in deployment, where example-level DP is then reported as unknown.
    Never changes the configuration; `preflight = 'off'` is the caller's to honour."""
    d = int(trainable_parameters)
    n = partners_per_round(cfg)
    mechanisms = rules_of(cfg.privacy_mode).estimates(cfg, d, n, partition_rows)
    verdict = max((m.verdict for m in mechanisms), key=SEVERITY.__getitem__, default=OK)
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


__all__ = ["CANNOT_LEARN", "MODES", "OK", "UNKNOWN", "WEAK", "MechanismEstimate",
           "PreflightRefused", "PreflightReport", "check", "min_survivors", "partners_per_round",
           "refusal_message", "verdict_of"]
