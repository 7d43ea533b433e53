import numpy as np
import pytest

from confide import wire as W
from confide.privacy.mechanisms import ClientLevelGaussian
from confide.strategies.client_level_dp import ClientLevelDp, clip_l2
from confide.strategies.delta_fedavg import DeltaFedAvg
from tests.strategies.conftest import reply


def strategy_with_global(lr: float = 1.0) -> DeltaFedAvg:
    s = DeltaFedAvg(server_learning_rate=lr)
    s.global_state = {"w": np.array([1.0, 2.0], np.float32), "b": np.zeros(1, np.float32)}
    return s


def test_weighted_mean_of_deltas_applied_with_server_lr() -> None:
    s = strategy_with_global(lr=0.5)
    replies = [reply(1, {"w": np.array([2.0, 0.0], np.float32), "b": np.ones(1, np.float32)}, 1),
               reply(2, {"w": np.array([-1.0, 3.0], np.float32), "b": np.ones(1, np.float32)}, 3)]
    arrays, metrics = s.aggregate_train(1, replies)
    new = W.from_array_record(arrays)
    mean_w = (np.array([2.0, 0.0]) * 1 + np.array([-1.0, 3.0]) * 3) / 4
    np.testing.assert_allclose(new["w"], np.array([1.0, 2.0]) + 0.5 * mean_w, rtol=1e-6)
    np.testing.assert_allclose(new["b"], [0.5])
    assert metrics["num-aggregated"] == 2


@pytest.mark.parametrize(("delta", "examples", "needle"), [
    ({"w": np.array([np.nan, 0], np.float32), "b": np.zeros(1, np.float32)}, 1, "NaN or inf"),
    ({"w": np.array([np.inf, 0], np.float32), "b": np.zeros(1, np.float32)}, 1, "NaN or inf"),
    ({"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)}, 1, "has shape (3,)"),
    ({"w": np.zeros(2, np.float32)}, 1, "missing ['b']"),
    ({"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}, 0, "not a positive"),
    ({"w": np.zeros(2, np.float32), "b": np.zeros(1, np.float32)}, float("nan"),
     "not a positive"),
])
def test_bad_updates_are_rejected_and_round_goes_on(delta, examples, needle) -> None:
    s = strategy_with_global()
    good = reply(1, {"w": np.ones(2, np.float32), "b": np.ones(1, np.float32)}, 2)
    arrays, _ = s.aggregate_train(1, [good, reply(9, delta, examples)])
    assert len(s.rejected) == 1 and s.rejected[0][0] == 9
    assert needle in s.rejected[0][1]
    np.testing.assert_allclose(W.from_array_record(arrays)["w"], [2.0, 3.0])


def test_all_rejected_leaves_no_update() -> None:
    s = strategy_with_global()
    bad = reply(3, {"w": np.array([np.nan, 0], np.float32), "b": np.zeros(1, np.float32)}, 1)
    assert s.aggregate_train(1, [bad]) == (None, None)


def test_client_level_dp_clips_and_noises_with_the_right_scale() -> None:
    inner = DeltaFedAvg()
    inner.global_state = {"w": np.zeros(20000, np.float32)}
    dp = ClientLevelDp(inner, noise_multiplier=0.5, clipping_norm=1.0, population=10,
                       delta=1e-5, seed=0)
    big = {"w": np.full(20000, 10.0, np.float32)}  # norm >> clip
    arrays, _ = dp.aggregate_train(1, [reply(i, big, 100 * (i + 1)) for i in range(4)])
    w = W.from_array_record(arrays)["w"]
    clipped_mean = 1.0 / np.sqrt(20000)  # each update clipped to norm 1, equal weights
    assert abs(w.mean() - clipped_mean) < 4 * 0.125 / np.sqrt(20000)  # 4 std errors
    assert w.std() == pytest.approx(0.5 * 1.0 / 4, rel=0.03)
    assert dp.last_release == ClientLevelGaussian(noise_multiplier=0.5, clipping_norm=1.0,
                                                  population=10, sampled=4, sample_rate=1.0)
    eps1 = dp.epsilon()
    dp.aggregate_train(2, [reply(i, big, 1) for i in range(4)])
    assert dp.epsilon() > eps1 > 0
    # tight: two releases at sigma 0.5 are one Gaussian release at sigma 0.5 / sqrt(2)
    from confide.privacy.replay import gaussian_epsilon

    assert dp.epsilon() == pytest.approx(gaussian_epsilon(np.sqrt(2) / 0.5, 1e-5), rel=1e-3)
    restored = ClientLevelDp(inner, noise_multiplier=0.5, clipping_norm=1.0, population=10,
                             delta=1e-5)
    restored.load_state_dict(dp.state_dict())
    assert restored.epsilon() == dp.epsilon()


def test_clip_l2_keeps_small_updates() -> None:
    small = {"a": np.array([0.3, 0.4])}
    clipped, norm = clip_l2(small, 1.0)
    assert norm == pytest.approx(0.5)
    np.testing.assert_array_equal(clipped["a"], small["a"])
