"""How one round samples a partner's records: the one rule every party plans with.

A partner with `rows` records (its public, rounded count under DP) Poisson-samples each
record at rate q = min(1, batch_size / rows) and takes steps = max(1, round(epochs / q))
steps a round, so a round is `epochs` passes in expectation. The node trains with it, the
server's pre-flight estimate and the empirical audits plan with it, and the shared-noise
mode's common rate is the same rule over all partners' records with one step a round.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundSampling:
    sample_rate: float  # q, the Poisson rate of each record
    steps: int  # DP-SGD steps in the round


def poisson_rate(batch_size: float, rows: int) -> float:
    """q = min(1, batch_size / rows): the expected batch over the records."""
    if rows < 1:
        raise ValueError(f"a sampling rate needs at least one record, got rows = {rows}")
    return min(1.0, batch_size / rows)


def plan_round(batch_size: float, rows: int, epochs: float) -> RoundSampling:
    """The rate and the steps of one round of `epochs` expected passes over `rows`."""
    q = poisson_rate(batch_size, rows)
    return RoundSampling(q, max(1, round(epochs / q)))
