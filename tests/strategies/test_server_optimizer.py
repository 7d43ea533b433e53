import math

import numpy as np
import pytest

from confide import wire as W
from confide.strategies.client_level_dp import ClientLevelDp
from confide.strategies.delta_fedavg import DeltaFedAvg
from confide.strategies.server_optimizer import ServerOptimizer
from tests.strategies.conftest import reply


def state() -> dict[str, np.ndarray]:
    return {"w": np.array([1.0, -0.5, 3.0], np.float32), "b": np.array([0.25], np.float32)}


def delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=3), "b": rng.normal(size=1)}


def test_sgd_momentum_zero_is_fedavg_bit_for_bit() -> None:
    opt = ServerOptimizer("sgd", learning_rate=0.7, momentum=0.0)
    g = state()
    for seed in range(3):
        d = delta(seed)
        expected = {k: (v + 0.7 * d[k]).astype(np.float32) for k, v in g.items()}
        g = opt.step(g, d)
        for k in g:
            assert g[k].dtype == np.float32
            assert g[k].tobytes() == expected[k].tobytes()
    assert opt.state_dict()["arrays"] == {}  # FedAvg remembers nothing


def test_heavy_ball_momentum_accumulates_velocity() -> None:
    opt = ServerOptimizer("sgd", learning_rate=0.5, momentum=0.9)
    g = {"w": np.zeros(1, np.float32)}
    g = opt.step(g, {"w": np.array([1.0])})       # v = 1
    g = opt.step(g, {"w": np.array([1.0])})       # v = 1.9
    assert g["w"][0] == pytest.approx(0.5 * 1 + 0.5 * 1.9, rel=1e-6)


def test_fedadam_step_matches_hand_computation() -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = ServerOptimizer("adam", learning_rate=lr, momentum=b1, beta2=b2, tau=tau)
    g = {"w": np.array([1.0, 1.0], np.float32)}
    d1, d2 = [0.5, -2.0], [0.1, 0.3]
    g = opt.step(g, {"w": np.array(d1)})
    g = opt.step(g, {"w": np.array(d2)})
    for i in range(2):
        m = (1 - b1) * d1[i]
        v = b2 * tau**2 + (1 - b2) * d1[i] ** 2
        x = 1.0 + lr * m / (math.sqrt(v) + tau)
        m = b1 * m + (1 - b1) * d2[i]
        v = b2 * v + (1 - b2) * d2[i] ** 2
        x = x + lr * m / (math.sqrt(v) + tau)
        assert g["w"][i] == pytest.approx(x, rel=1e-6)
    # first step of Adam without bias correction at b1 = 0.9, b2 = 0.99 is lr * sign(d)
    # up to tau: the moment ratio is 0.1 / sqrt(0.01)
    first = ServerOptimizer("adam", learning_rate=lr, momentum=b1, beta2=b2, tau=tau)
    out = first.step({"w": np.zeros(1, np.float32)}, {"w": np.array([-4.0])})
    assert out["w"][0] == pytest.approx(-lr, rel=5e-3)


def test_fedyogi_second_moment_grows_additively() -> None:
    b2, tau = 0.99, 1e-3
    opt = ServerOptimizer("yogi", learning_rate=1.0, momentum=0.0, beta2=b2, tau=tau)
    opt.step({"w": np.zeros(1, np.float32)}, {"w": np.array([0.5])})
    v = tau**2 - (1 - b2) * 0.25 * np.sign(tau**2 - 0.25)
    assert opt.v["w"][0] == pytest.approx(v)
    opt.step({"w": np.zeros(1, np.float32)}, {"w": np.array([0.0])})
    # d = 0: v - d^2 > 0 but the change (1-b2) d^2 is 0: Yogi keeps v (Adam would shrink it)
    assert opt.v["w"][0] == pytest.approx(v)


@pytest.mark.parametrize("kind", ["sgd", "adam", "yogi"])
def test_state_round_trips_and_resume_continues_identically(kind: str) -> None:
    def make() -> ServerOptimizer:
        return ServerOptimizer(kind, learning_rate=0.3, momentum=0.8, beta2=0.9, tau=1e-2)

    straight, first = make(), make()
    g1 = g2 = state()
    for seed in range(2):
        g1 = straight.step(g1, delta(seed))
        g2 = first.step(g2, delta(seed))
    saved = first.state_dict()
    assert set(saved["arrays"]) >= {"m/w", "m/b"}
    resumed = make()
    resumed.load_state_dict({"meta": dict(saved["meta"]),
                             "arrays": {k: v.copy() for k, v in saved["arrays"].items()}})
    assert resumed.steps == 2
    for seed in range(2, 4):
        g1 = straight.step(g1, delta(seed))
        g2 = resumed.step(g2, delta(seed))
    for k in g1:
        assert g1[k].tobytes() == g2[k].tobytes()
    with pytest.raises(ValueError, match="state is for"):
        ServerOptimizer("sgd" if kind != "sgd" else "adam").load_state_dict(saved)


def test_cosine_schedule_decays_each_step_to_zero_and_resumes_in_place() -> None:
    total = 4
    opt = ServerOptimizer("sgd", learning_rate=0.8, schedule="cosine", schedule_steps=total)
    assert not opt.stateless  # the step count is state
    g = {"w": np.zeros(1)}
    taken = []
    for _ in range(total + 1):
        before = g["w"][0]
        g = opt.step(g, {"w": np.array([1.0])})
        taken.append(g["w"][0] - before)
    expected = [0.8 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)] + [0.0]
    np.testing.assert_allclose(taken, expected, atol=1e-12)
    assert taken[0] == pytest.approx(0.8) and taken[1] < taken[0]

    first = ServerOptimizer("adam", learning_rate=0.3, momentum=0.9, schedule="cosine",
                            schedule_steps=total)
    straight = ServerOptimizer("adam", learning_rate=0.3, momentum=0.9, schedule="cosine",
                               schedule_steps=total)
    g1 = g2 = state()
    for seed in range(2):
        g1, g2 = straight.step(g1, delta(seed)), first.step(g2, delta(seed))
    resumed = ServerOptimizer("adam", learning_rate=0.3, momentum=0.9, schedule="cosine",
                              schedule_steps=total)
    resumed.load_state_dict(first.state_dict())
    assert resumed.current_learning_rate == straight.current_learning_rate < 0.3
    g1, g2 = straight.step(g1, delta(2)), resumed.step(g2, delta(2))
    for k in g1:
        assert g1[k].tobytes() == g2[k].tobytes()
    with pytest.raises(ValueError, match="schedule 'cosine' over 4 rounds"):
        ServerOptimizer("adam", momentum=0.9).load_state_dict(first.state_dict())


def test_bias_corrected_adam_is_torch_adam_step_for_step_with_a_head_rate() -> None:
    import torch

    rng = np.random.default_rng(3)
    shapes = {"body.lora_A": (4, 3), "classifier.weight": (2, 4)}
    start = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
    reference = torch.optim.Adam(
        [{"params": [params["body.lora_A"]], "lr": 0.01},
         {"params": [params["classifier.weight"]], "lr": 0.02}],
        betas=(0.9, 0.999), eps=1e-8)
    ours = ServerOptimizer("adam", learning_rate=0.01, momentum=0.9, beta2=0.999, tau=1e-8,
                           bias_correction=True, name_learning_rates=[("classifier.", 0.02)])
    g = dict(start)
    for _ in range(5):
        grads = {k: rng.normal(size=s) * 1e-3 for k, s in shapes.items()}
        for k, p in params.items():
            p.grad = torch.tensor(grads[k], dtype=torch.float32)
        reference.step()
        g = ours.step(g, {k: -v for k, v in grads.items()})  # the delta is the descent
    for k, p in params.items():
        np.testing.assert_allclose(g[k], p.detach().numpy(), rtol=1e-5, atol=1e-7)
    # the first step of bias-corrected Adam moves every coordinate by ~lr (sign of the grad)
    first = ServerOptimizer("adam", learning_rate=0.01, momentum=0.9, beta2=0.999, tau=1e-8,
                            bias_correction=True).step(state(), {"w": np.array([3e-4, -2.0,
                                                                                5.0]),
                                                                 "b": np.array([1e-5])})
    moved = np.concatenate([first["w"] - state()["w"], first["b"] - state()["b"]])
    np.testing.assert_allclose(np.abs(moved), 0.01, rtol=1e-3)
    with pytest.raises(ValueError, match="bias_correction"):
        ServerOptimizer("adam", momentum=0.9).load_state_dict(ours.state_dict())


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"kind": "adagrad"}, "expected one of"), ({"momentum": 1.0}, "momentum"),
    ({"beta2": -0.1}, "beta2"), ({"tau": 0.0}, "tau"),
    ({"schedule": "step"}, "schedule 'step'"),
    ({"schedule": "cosine"}, "needs the number of rounds"),
    ({"name_learning_rates": [("classifier.", 0.0)]}, "expected a marker and a rate")])
def test_bad_settings_are_refused(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ServerOptimizer(**kwargs)


def test_delta_fedavg_and_client_level_dp_step_through_the_optimizer() -> None:
    d = {"w": np.array([0.5, -2.0, 1.0], np.float32), "b": np.array([0.1], np.float32)}
    plain = DeltaFedAvg(server_learning_rate=0.5)  # default: sgd, momentum 0
    plain.global_state = state()
    arrays, _ = plain.aggregate_train(1, [reply(1, d, 3)])
    for k, v in W.from_array_record(arrays).items():  # the pre-optimizer FedAvg expression
        expected = (state()[k] + 0.5 * d[k].astype(np.float64)).astype(np.float32)
        assert v.tobytes() == expected.tobytes()

    adam = ServerOptimizer("adam", learning_rate=0.1, momentum=0.9)
    inner = DeltaFedAvg(server_optimizer=adam)
    inner.global_state = state()
    dp = ClientLevelDp(inner, noise_multiplier=1e-9, clipping_norm=100.0, population=2,
                       delta=1e-5, seed=0)
    arrays, _ = dp.aggregate_train(1, [reply(1, d, 1)])
    assert adam.steps == 1 and set(adam.m) == {"w", "b"}
    expected = ServerOptimizer("adam", learning_rate=0.1, momentum=0.9).step(state(), d)
    for k, v in W.from_array_record(arrays).items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-5)
