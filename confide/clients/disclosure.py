"""What a node's reply may say about its partner's records.

Under any DP mode of a run (example-level DP, local or shared noise; client-level DP;
distributed DP) a reply carries no un-noised statistic of the partner's records: no training
loss and no timing (the time of a round grows with its Poisson samples). What it does carry
is public by construction:

* the mechanism it ran (noise multiplier, sampling rate, steps: fixed before the round from
  public values, the numbers of its signed receipt) and its claimed epsilon;
* its **public row count**: the number of records it trains on rounded up to two
  significant digits, and at least 100 (4,873 -> 4,900; 37 -> 100). It is what the reply's
  `num-examples` and the shared-noise info exchange report, and the node computes its
  sampling rate (batch-size / that count) and its update's divisor from it, never from the
  exact count: neither its receipts nor its update reveal more than the rounded count. The
  rounded count itself is disclosed, not protected by DP (adding or removing one record
  changes it only across a rounding boundary).

Runs without any DP keep the exact count, the loss and the time: there is no guarantee to
protect. This module imports nothing heavy (the secure-aggregation stages use it).
"""

from __future__ import annotations

from confide import wire as W
from confide.config import RunConfig
from confide.privacy.mechanisms import ExampleLevelMechanism
from confide.privacy.mode_rules import rules_of

PUBLIC_ROWS_DIGITS = 2  # significant digits of the public row count
PUBLIC_ROWS_FLOOR = 100  # the smallest public row count


def dp_run(cfg: RunConfig) -> bool:
    """Whether the run promises any DP guarantee (then replies carry no raw statistics)."""
    return cfg.privacy_mode.any_dp


def public_rows(n: int) -> int:
    """`n` records, rounded up to PUBLIC_ROWS_DIGITS significant digits, at least
    PUBLIC_ROWS_FLOOR."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"a row count must be an integer >= 0, got {n!r}")
    if n <= PUBLIC_ROWS_FLOOR:
        return PUBLIC_ROWS_FLOOR
    unit = 10 ** (len(str(n)) - PUBLIC_ROWS_DIGITS)
    return -(-n // unit) * unit


def reported_rows(cfg: RunConfig, n: int) -> int:
    """The row count a node reports and computes its rate from: the public (rounded) one
    under DP, the exact one otherwise."""
    return public_rows(n) if dp_run(cfg) else n


def reply_metrics(cfg: RunConfig, *, rows: int, epsilon: float,
                  mechanism: ExampleLevelMechanism, train_loss: float | None = None,
                  train_seconds: float | None = None) -> dict[str, float | int]:
    """A training reply's metrics: the fields the run's mode allows (`ModeRules.reply_fields`:
    the loss and the time only without DP, module docstring). `rows`: `reported_rows`."""
    values: dict[str, float | int | None] = {
        W.NUM_EXAMPLES: rows, W.EPSILON: epsilon, W.STEPS: mechanism.steps,
        W.SAMPLE_RATE: mechanism.sample_rate, W.NOISE_MULTIPLIER: mechanism.noise_multiplier,
        W.TRAIN_LOSS: None if train_loss is None else float(train_loss),
        W.TRAIN_SECONDS: None if train_seconds is None else float(train_seconds)}
    allowed = rules_of(cfg.privacy_mode).reply_fields
    return {key: value for key, value in values.items()
            if key in allowed and value is not None}
