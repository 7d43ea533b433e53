"""Server optimizers on the aggregated delta (FedOpt: Reddi et al. 2021, "Adaptive
Federated Optimization", Algorithm 2; FedAvgM: Hsu et al. 2019).

The server treats the (noised, clipped, securely summed) mean delta of a round as a
pseudo-gradient and takes one optimizer step on the global weights. This is
post-processing of an already private release, so it costs no privacy.

    sgd   v = momentum v + d;                               x += lr v  (momentum 0: FedAvg)
    adam  m = b1 m + (1-b1) d;  v = b2 v + (1-b2) d^2;             x += lr m / (sqrt(v) + tau)
    yogi  m = b1 m + (1-b1) d;  v = v - (1-b2) d^2 sign(v - d^2);  x += lr m / (sqrt(v) + tau)

As in the paper: no bias correction, m starts at 0 and v at tau^2 (Algorithm 2 asks for
v_{-1} >= tau^2), tau (the adaptivity) defaults to 1e-3, and b1 is `momentum`. With
`bias_correction` adam/yogi are Kingma & Ba's: m and v start at 0 and the step is
lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + tau), exactly torch.optim.Adam's with eps = tau.
That is the step of central DP-SGD with Adam, which the shared-noise mode's sums are: at
SST-2 3,000 rows, batch 256, 36 steps it reached 80.5% where FedAdam's form reached 78.6%
(benchmarks/results/shared_noise_search.md).

`name_learning_rates` gives parameters whose name contains a marker their own rate (first
match; e.g. a classifier head that can take larger steps than the adapters).

`schedule = "cosine"` decays lr over `schedule_steps` steps (lr_t = lr (1 + cos(pi t / T)) / 2,
then 0): with one noisy gradient per round the last steps' noise is what the final model
keeps, and a decaying step averages it out (post-processing as well).
Pure numpy, so the strategy, the secure-aggregation path and benchmarks share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

KINDS = ("sgd", "adam", "yogi")
SCHEDULES = ("constant", "cosine")


def scheduled_learning_rate(base: float, schedule: str, step: int, total: int) -> float:
    """The learning rate of 0-based `step` of `total` under `schedule`."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    raise _unknown_schedule(schedule)


def _unknown_schedule(schedule: str) -> ValueError:
    return ValueError(f"server learning-rate schedule {schedule!r}: expected one of "
                      f"{', '.join(SCHEDULES)}")


class ServerOptimizer:
    """One optimizer step per round on `global_state` along `mean_delta`."""

    def __init__(self, kind: str = "sgd", *, learning_rate: float = 1.0,
                 momentum: float = 0.0, beta2: float = 0.99, tau: float = 1e-3,
                 schedule: str = "constant", schedule_steps: int = 0,
                 bias_correction: bool = False,
                 name_learning_rates: Sequence[tuple[str, float]] = ()) -> None:
        if kind not in KINDS:
            raise ValueError(f"server optimizer {kind!r}: expected one of {', '.join(KINDS)}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server momentum {momentum}: expected 0 <= x < 1")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"server beta2 {beta2}: expected 0 <= x < 1")
        if not tau > 0.0:
            raise ValueError(f"server tau {tau}: expected x > 0")
        if schedule not in SCHEDULES:
            raise _unknown_schedule(schedule)
        if schedule != "constant" and schedule_steps < 1:
            raise ValueError(f"server learning-rate schedule {schedule!r} needs the number of "
                             f"rounds it spans (got {schedule_steps})")
        for marker, rate in name_learning_rates:
            if not marker or not rate > 0.0:
                raise ValueError(f"server learning rate {rate} for names containing "
                                 f"{marker!r}: expected a marker and a rate > 0")
        self.schedule = schedule
        self.schedule_steps = int(schedule_steps)
        self.bias_correction = bool(bias_correction)
        self.name_learning_rates = tuple((str(m), float(r)) for m, r in name_learning_rates)
        self.kind = kind
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        self.steps = 0
        # first moment (sgd: heavy-ball velocity) and second moment, float64, per name
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    @property
    def stateless(self) -> bool:
        """Plain FedAvg with a server learning rate: nothing to remember between rounds."""
        return self.kind == "sgd" and self.momentum == 0.0 and self.schedule == "constant"

    @property
    def current_learning_rate(self) -> float:
        """The learning rate the next step uses (names without a rate of their own)."""
        return self.learning_rate_of("")

    def learning_rate_of(self, name: str) -> float:
        """The learning rate the next step uses for parameter `name`."""
        base = next((r for m, r in self.name_learning_rates if m in name), self.learning_rate)
        return scheduled_learning_rate(base, self.schedule, self.steps, self.schedule_steps)

    def step(self, global_state: dict[str, np.ndarray], mean_delta: dict[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
        """New global weights (same names and dtypes as `global_state`)."""
        missing = sorted(set(global_state) - set(mean_delta))[:3]
        if missing:
            raise ValueError(f"server optimizer: mean delta lacks {missing}")
        if self.stateless:
            # exactly the FedAvg expression used before optimizers existed (bit-for-bit)
            averaged = {k: (g + self.learning_rate_of(k) * mean_delta[k]).astype(g.dtype)
                        for k, g in global_state.items()}
            self.steps += 1
            return averaged
        if self.m and set(self.m) != set(global_state):
            raise ValueError("server optimizer: parameter names differ from its moments")
        b1, b2, tau = self.momentum, self.beta2, self.tau
        t = self.steps + 1
        # bias correction: m and v start at 0 and are rescaled (Kingma & Ba)
        m_scale, v_scale = ((1.0 - b1 ** t, 1.0 - b2 ** t) if self.bias_correction
                            else (1.0, 1.0))
        v_start = 0.0 if self.bias_correction else tau * tau
        new: dict[str, np.ndarray] = {}
        for k, g in global_state.items():
            lr = self.learning_rate_of(k)
            d = np.asarray(mean_delta[k], dtype=np.float64)
            if d.shape != g.shape:
                raise ValueError(f"server optimizer: {k} has shape {d.shape}, "
                                 f"expected {g.shape}")
            if self.kind == "sgd":
                m = self.m.get(k)
                m = d.copy() if m is None else b1 * m + d
                self.m[k] = m
                update = lr * m
            else:
                m = self.m.get(k, np.zeros_like(d))
                v = self.v.get(k)
                if v is None:
                    v = np.full_like(d, v_start)
                m = b1 * m + (1.0 - b1) * d
                d2 = d * d
                if self.kind == "adam":
                    v = b2 * v + (1.0 - b2) * d2
                else:  # yogi: additive, sign-controlled change of v (slower to forget)
                    v = v - (1.0 - b2) * d2 * np.sign(v - d2)
                self.m[k], self.v[k] = m, v
                update = (lr / m_scale) * m / (np.sqrt(v) / math.sqrt(v_scale) + tau)
            new[k] = (g.astype(np.float64) + update).astype(g.dtype)
        self.steps += 1
        return new

    # -- checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{"meta": JSON-able facts, "arrays": flat name -> array ("m/<name>", "v/<name>")}."""
        arrays = {f"m/{k}": v for k, v in self.m.items()}
        arrays.update({f"v/{k}": v for k, v in self.v.items()})
        return {"meta": {"kind": self.kind, "learning_rate": self.learning_rate,
                         "momentum": self.momentum, "beta2": self.beta2, "tau": self.tau,
                         "schedule": self.schedule, "schedule_steps": self.schedule_steps,
                         "bias_correction": self.bias_correction,
                         "steps": self.steps},
                "arrays": arrays}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = state["meta"]
        if meta["kind"] != self.kind:
            raise ValueError(f"server optimizer state is for {meta['kind']!r}, "
                             f"this run uses {self.kind!r}")
        saved_schedule = (meta.get("schedule", "constant"), int(meta.get("schedule_steps", 0)))
        if saved_schedule != (self.schedule, self.schedule_steps):
            raise ValueError(f"server optimizer state has schedule {saved_schedule[0]!r} over "
                             f"{saved_schedule[1]} rounds, this run uses {self.schedule!r} over "
                             f"{self.schedule_steps}")
        if bool(meta.get("bias_correction", False)) != self.bias_correction:
            raise ValueError("server optimizer state was made with bias_correction = "
                             f"{bool(meta.get('bias_correction', False))}, this run uses "
                             f"{self.bias_correction}")
        self.steps = int(meta["steps"])
        self.m, self.v = {}, {}
        for key, value in state["arrays"].items():
            which, _, name = key.partition("/")
            if which not in ("m", "v") or not name:
                raise ValueError(f"server optimizer state: unexpected entry {key!r}")
            (self.m if which == "m" else self.v)[name] = np.asarray(value, np.float64).copy()
