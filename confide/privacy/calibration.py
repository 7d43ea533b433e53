"""The one rule that sets a run's example-level noise multiplier, for everyone who needs it:
the node (local noise), the server (shared noise: one sigma for the whole federation), the
pre-flight estimate and the white-box audit.

`noise-multiplier` when the configuration sets one; otherwise the smallest sigma whose
`steps_per_round * rounds` Poisson-sampled steps at `sample_rate` stay within
`target-epsilon` at `delta`, as if the partner were sampled every round (the conservative
choice when `fraction-train` < 1). Calibration bisects on `accountant.epsilon_of`, the
same function the node's claim and budget guard use, rather than dp-accounting's
`calibrate_dp_mechanism`: the three can then never disagree by a rounding of the search.
"""

from __future__ import annotations

from confide.config import RunConfig
from confide.privacy.accountant import PLD, calibrate_noise


def run_noise_multiplier(cfg: RunConfig, sample_rate: float, steps_per_round: int,
                         accountant: str = PLD) -> float:
    """The example-level noise multiplier of a run whose rounds each take
    `steps_per_round` noisy steps at `sample_rate` (local noise: the node's plan; shared
    noise: one step at the federation's common rate). 0 without example-level DP; a
    ValueError when no finite sigma reaches the target."""
    if not cfg.privacy_mode.example_dp:
        return 0.0
    if cfg.noise_multiplier > 0:
        return float(cfg.noise_multiplier)
    return float(calibrate_noise(cfg.target_epsilon, cfg.delta, sample_rate,
                                 steps_per_round * cfg.rounds, accountant=accountant))
