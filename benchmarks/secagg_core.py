"""Time per stage of the transport-free SecAgg+ core with distributed DP, and upload size.

Runs full in-process rounds (messages serialised to bytes as a transport would) with
distributed discrete Gaussian noise, 10% of clients dropping after sharing keys, and prints
per-stage times (client stages: mean per client; server stages: total) and the upload bytes
per client relative to sending the fp32 update. Vector lengths: ~150k (LoRA adapter of
all-MiniLM-L6-v2) and 22.7M (the full model). Synthetic updates (uniform noise): the cost
does not depend on the values.

    python benchmarks/secagg_core.py --quick     # n in {10, 50} x 150k, n = 10 x 22.7M
    python benchmarks/secagg_core.py             # all four combinations
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from confide.privacy.secagg import SecAggConfig
from confide.privacy.secagg.inprocess import RoundTrace, run_round

LORA_D = 147_456  # rank-8 LoRA on q,v of 6 layers x 384 dims (+ head) ~ 150k
FULL_D = 22_713_216  # all-MiniLM-L6-v2


def bench(n: int, d: int, bits: int) -> dict[str, float]:
    cfg = SecAggConfig(
        os.urandom(16), num_clients=n, vector_length=d, bits=bits, l2_clip=1.0, noise_stddev=1.0
    )
    rng = np.random.default_rng(0)
    base = rng.uniform(-1e-3, 1e-3, d).astype(np.float32)
    updates = {c: base for c in range(1, n + 1)}  # one array shared: memory, not realism
    drop = list(range(1, max(1, n // 10) + 1))
    trace = RoundTrace()
    t0 = time.perf_counter()
    result, _ = run_round(cfg, updates, drop={"masked_input": drop}, trace=trace)
    wall = time.perf_counter() - t0
    survivors = n - len(drop)
    err = float(np.max(np.abs(result.weighted_sum - survivors * base.astype(np.float64))))
    per_client = {k: v / (n if k.startswith("client") else 1) for k, v in trace.seconds.items()}
    senders = [c for c in trace.upload_bytes if c not in drop]
    upload = float(np.mean([trace.upload_bytes[c] for c in senders]))
    return {
        "n": n,
        "d": d,
        "k": cfg.degree,
        "t": cfg.threshold,
        "m": cfg.min_survivors,
        **per_client,
        "wall": wall,
        "upload_ratio": upload / (4 * d),
        "upload_MB": upload / 1e6,
        "max_abs_err": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip n=50 x 22.7M")
    ap.add_argument("--bits", type=int, default=32)
    args = ap.parse_args()
    cases = [(10, LORA_D), (50, LORA_D), (10, FULL_D)]
    if not args.quick:
        cases.append((50, FULL_D))
    cols = [
        ("client advertise_keys", "adv/cl ms", 1e3),
        ("client share_keys", "share/cl ms", 1e3),
        ("client masked_input", "mask/cl s", 1),
        ("server sum masked inputs", "srv sum s", 1),
        ("client unmask", "unmask/cl ms", 1e3),
        ("server unmask+decode", "srv unmask s", 1),
    ]
    head = f"{'n':>3} {'d':>10} {'k':>3} {'t':>3} " + " ".join(f"{c[1]:>12}" for c in cols)
    head += f" {'wall s':>8} {'up MB/cl':>9} {'up/fp32':>8} {'max err':>9}"
    print(f"SecAgg+ core, b={args.bits}, DDG noise on, 10% drop after share_keys, 2 cores")
    print(head)
    for n, d in cases:
        r = bench(n, d, args.bits)
        row = f"{r['n']:>3} {r['d']:>10} {r['k']:>3} {r['t']:>3} "
        row += " ".join(f"{r.get(key, 0.0) * mult:>12.3f}" for key, _, mult in cols)
        row += f" {r['wall']:>8.1f} {r['upload_MB']:>9.2f} {r['upload_ratio']:>8.3f}"
        row += f" {r['max_abs_err']:>9.2e}"
        print(row, flush=True)
    print("max err: |decoded - plaintext sum| per coordinate, includes the DP noise (sigma=1).")


if __name__ == "__main__":
    main()
