"""The shared-noise mode's server step, end to end in one process: its defaults make the
server take central DP-SGD's Adam step (bias correction, the classifier head at its own
rate) on the released sum, through the real Federation and ClientApp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.config import SHARED_NOISE_DEFAULTS
from confide.model import HEAD_MARKER
from confide.server.federation import Federation
from tests.inprocess import InProcessGrid, tiny_secure_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_first_shared_round_moves_every_weight_by_its_adam_rate(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_secure_config(out, clients=3, rounds=1, seed=5)
    assert cfg.example_dp_noise == "shared" and cfg.server_bias_correction
    fed = Federation.open(InProcessGrid(3), cfg, out)
    before = {k: v.astype(np.float64) for k, v in fed.global_state.items()}
    assert fed.run()["rounds_completed"] == 1
    # Bias-corrected Adam's first step is lr * d / (|d| + tau) for the round's noisy mean
    # gradient d (= m / (1 - beta1) after one step): every weight moves by its rate, but
    # for the few coordinates where |d| is not far above tau (1e-8).
    rates = {True: SHARED_NOISE_DEFAULTS["server-head-learning-rate"],
             False: SHARED_NOISE_DEFAULTS["server-learning-rate"]}
    assert rates[True] != rates[False]
    optimizer, tau = fed.inner.optimizer, SHARED_NOISE_DEFAULTS["server-tau"]
    heads = set()
    for name, value in fed.global_state.items():
        heads.add(HEAD_MARKER in name)
        d = np.abs(optimizer.m[name]) / (1.0 - cfg.server_momentum)
        moved = np.abs(value.astype(np.float64) - before[name])
        np.testing.assert_allclose(moved, rates[HEAD_MARKER in name] * d / (d + tau),
                                   rtol=1e-4, atol=1e-8, err_msg=name)
        assert np.median(moved) == pytest.approx(rates[HEAD_MARKER in name], rel=1e-4)
    assert heads == {True, False}
