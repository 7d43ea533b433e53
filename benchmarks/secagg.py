"""Secure aggregation cost, measured side by side in one run (alternating secure / plain).

Protocol cost only (dummy client computation, no training): one round of our SecAgg+ core
with every message serialised as the Flower adapter carries it, against a plain round that
serialises each float32 update and sums them (what FedAvg's server does). Also: upload bytes
per client per round relative to the trainable fp32 bytes.

    python benchmarks/secagg.py --quick      # n in {10, 50} x LoRA-sized vector (~222k)
    python benchmarks/secagg.py              # also the full-model vector (22.7M)

Vector lengths: 221,954 ~ LoRA (rank 8, query/value) + classifier of all-MiniLM-L6-v2;
22,713,216 ~ all parameters of the model. Data: random uniform updates (no data set).
Not done here: the comparison with Flower's SecAggPlusWorkflow (see the report).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from confide.privacy.secagg import SecAggConfig
from confide.privacy.secagg.inprocess import RoundTrace, run_round

LORA = 221_954
FULL = 22_713_216


def plain_round(updates: dict[int, np.ndarray]) -> float:
    t0 = time.perf_counter()
    total = None
    for u in updates.values():
        wire = u.astype(np.float32).tobytes()  # what travels
        v = np.frombuffer(wire, dtype=np.float32).astype(np.float64)
        total = v if total is None else total + v
    return time.perf_counter() - t0


def secure_round(n: int, d: int, updates: dict[int, np.ndarray], dp: bool
                 ) -> tuple[float, float]:
    cfg = SecAggConfig(os.urandom(16), num_clients=n, vector_length=d,
                       l2_clip=1.0 if dp else None, noise_stddev=1.0 if dp else None)
    trace = RoundTrace()
    t0 = time.perf_counter()
    run_round(cfg, updates, serialize=True, trace=trace)
    seconds = time.perf_counter() - t0
    per_client = float(np.mean(list(trace.upload_bytes.values())))
    return seconds, per_client / (4 * d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="LoRA-sized vectors only")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dp", action="store_true", help="distributed discrete Gaussian on")
    args = parser.parse_args()
    cases = [(n, d) for d in ([LORA] if args.quick else [LORA, FULL]) for n in (10, 50)]
    print(f"{'n':>4} {'d':>11} {'secure s':>9} {'plain s':>9} {'secure/plain':>13} "
          f"{'upload/fp32':>12}")
    for n, d in cases:
        rng = np.random.default_rng(0)
        updates = {c: rng.uniform(-0.01, 0.01, d) for c in range(1, n + 1)}
        sec, pl, up = [], [], 0.0
        for _ in range(args.repeats):  # alternate, so drift hits both sides alike
            s, up = secure_round(n, d, updates, args.dp)
            sec.append(s)
            pl.append(plain_round(updates))
        s_med, p_med = float(np.median(sec)), float(np.median(pl))
        print(f"{n:>4} {d:>11,} {s_med:>9.2f} {p_med:>9.3f} {s_med / p_med:>13.1f} "
              f"{up:>12.3f}", flush=True)


if __name__ == "__main__":
    main()
