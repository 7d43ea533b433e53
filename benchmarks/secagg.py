"""Secure aggregation cost, measured side by side in one run.

Section 1 (default): round time through Flower's simulation runtime (Ray backend, 2 actors),
so exchange costs count equally for all three ways of aggregating a float32 vector of
length d from n nodes (no training; apps in `benchmarks/_secagg_apps.py`):
  plain   Message API, one exchange, the server averages the float32 deltas;
  ours    Confide's secure path (`SecureRounds.run_round` + `secure_client.secure_reply`,
          the product's adapters; 2 exchanges a round once set up);
  flower  Flower 1.41 legacy FedAvg + DefaultWorkflow(SecAggPlusWorkflow) + secaggplus_mod
          (4 exchanges a round), num_shares = our k + 1, threshold = our t, clip 1.0,
          modulus 2^32 (our ring: 32 bits, clip 1.0).
Each cell is one process (`run_simulation`), run in the order plain, ours, flower, repeated
`--repeats` times (interleaved: background load hits all three alike). s/round: one warm-up
round (ours: includes the two key-setup exchanges), then (end of the last of R rounds -
start of the first) / R, measured in the ServerApp. upload/fp32: our bytes uploaded per
client per round (masked vector + key shares + unmask shares) / (4 d).

Section 2 (`--protocol`): protocol arithmetic only, no transport (the former table): one
in-process round of our core with messages serialised, against a float sum.

    python benchmarks/secagg.py --quick          # n = 10, LoRA d (~3 min on 2 cores)
    python benchmarks/secagg.py                  # n in {10, 50} x LoRA d, n = 10 x full d
    python benchmarks/secagg.py --full-50        # also n = 50 x full d (needs ~20 GiB)
    python benchmarks/secagg.py --protocol       # section 2 only
    python benchmarks/secagg.py --baseline REV --cell 10,74498 --cell 50,74498
                                                 # ours now vs ours at git revision REV

Vector lengths: 74,498 = trainable parameters of the default model (MiniLM, LoRA + head,
mean pooling; `count_trainable(build_model(ModelSpec('minilm', 2)))`); 22,566,146 = all
parameters of that model. Data: random uniform updates (no data set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from confide.privacy.secagg import SecAggConfig
from confide.privacy.secagg.inprocess import RoundTrace, run_round

LORA = 74_498
FULL = 22_566_146
APPS = Path(__file__).with_name("_secagg_apps.py")
MODES = ("plain", "ours", "flower")


def plain_round(updates: dict[int, np.ndarray]) -> float:
    t0 = time.perf_counter()
    total = None
    for u in updates.values():
        wire = u.astype(np.float32).tobytes()  # what travels
        v = np.frombuffer(wire, dtype=np.float32).astype(np.float64)
        total = v if total is None else total + v
    return time.perf_counter() - t0


def secure_round(n: int, d: int, updates: dict[int, np.ndarray], dp: bool) -> tuple[float, float]:
    cfg = SecAggConfig(
        os.urandom(16),
        num_clients=n,
        vector_length=d,
        l2_clip=1.0 if dp else None,
        noise_stddev=1.0 if dp else None,
    )
    trace = RoundTrace()
    t0 = time.perf_counter()
    run_round(cfg, updates, serialize=True, trace=trace)
    seconds = time.perf_counter() - t0
    per_client = float(np.mean(list(trace.upload_bytes.values())))
    return seconds, per_client / (4 * d)


def protocol_table(cases: list[tuple[int, int]], repeats: int, dp: bool) -> None:
    print("protocol only (in-process, no transport):")
    print(
        f"{'n':>4} {'d':>11} {'secure s':>9} {'plain s':>9} {'secure/plain':>13} "
        f"{'upload/fp32':>12}"
    )
    for n, d in cases:
        rng = np.random.default_rng(0)
        updates = {c: rng.uniform(-0.01, 0.01, d) for c in range(1, n + 1)}
        sec, pl, up = [], [], 0.0
        for _ in range(repeats):  # alternate, so drift hits both sides alike
            s, up = secure_round(n, d, updates, dp)
            sec.append(s)
            pl.append(plain_round(updates))
        s_med, p_med = float(np.median(sec)), float(np.median(pl))
        print(
            f"{n:>4} {d:>11,} {s_med:>9.2f} {p_med:>9.3f} {s_med / p_med:>13.1f} {up:>12.3f}",
            flush=True,
        )


def simulate(mode: str, n: int, d: int, rounds: int, dp: bool, timeout: float,
             tree: Path | None = None) -> dict | None:
    """One cell in a fresh process (Ray started and stopped with it). ``tree``: another
    checkout of the project whose package runs the cell under this harness (copied into
    it, and run from it: Ray's workers import from the driver's folder)."""
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    apps = APPS
    if tree is not None:
        apps = tree / "benchmarks" / APPS.name
        shutil.copyfile(APPS, apps)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(apps),
            mode,
            str(n),
            str(d),
            str(out),
            "--rounds",
            str(rounds),
        ] + (["--dp"] if dp and mode == "ours" else [])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=env, cwd=tree)
        except subprocess.TimeoutExpired:
            print(f"  {mode} n={n} d={d}: over {timeout:.0f} s, not measured", flush=True)
            return None
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-8:])
            print(f"  {mode} n={n} d={d}: failed (rc {proc.returncode})\n{tail}", flush=True)
            return None
        return json.loads(out.read_text())


def baseline_table(cases: list[tuple[int, int]], rounds: int, repeats: int, dp: bool,
                   timeout: float, rev: str) -> None:
    """Our secure round now against our secure round at git revision ``rev`` (a worktree),
    interleaved: the cost of a change to the secure path."""
    tree = Path(tempfile.mkdtemp(prefix="confide-baseline-"))
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), rev], check=True,
                   capture_output=True, cwd=APPS.parent)
    try:
        print(f"ours now vs ours at {rev}, R={rounds} timed rounds after 1 warm-up, median of "
              f"{repeats} interleaved run(s)" + (", distributed DP" if dp else ""))
        print(f"{'n':>4} {'d':>11} {'baseline s/r':>13} {'now s/r':>9} {'now/baseline':>13}",
              flush=True)
        for n, d in cases:
            now: list[float] = []
            then: list[float] = []
            for _ in range(repeats):
                for runs, where in ((then, tree), (now, None)):
                    r = simulate("ours", n, d, rounds, dp, timeout, where)
                    if r is not None:
                        runs.append(r["s_per_round"])
            b = float(np.median(then)) if then else float("nan")
            c = float(np.median(now)) if now else float("nan")
            print(f"{n:>4} {d:>11,} {b:>13.3f} {c:>9.3f} {c / b:>13.2f}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)],
                       capture_output=True, cwd=APPS.parent)


def round_table(
    cases: list[tuple[int, int]], rounds: int, repeats: int, dp: bool, timeout: float
) -> None:
    print(
        f"round time through flwr.simulation.run_simulation (Ray, 2 actors), R={rounds} "
        f"timed rounds after 1 warm-up, median of {repeats} interleaved run(s)"
        + (", ours with distributed DP" if dp else "")
    )
    print(
        f"{'n':>4} {'d':>11} {'plain s/r':>10} {'ours s/r':>9} {'flower s/r':>11} "
        f"{'ours/plain':>11} {'ours/flower':>12} {'upload/fp32':>12}",
        flush=True,
    )
    for n, d in cases:
        runs: dict[str, list[float]] = {m: [] for m in MODES}
        upload = float("nan")
        for _ in range(repeats):
            for mode in MODES:
                r = simulate(mode, n, d, rounds, dp, timeout)
                if r is not None:
                    runs[mode].append(r["s_per_round"])
                    if mode == "ours":
                        upload = r["upload_per_client"] / (4 * d)
        med = {m: float(np.median(v)) if v else float("nan") for m, v in runs.items()}
        print(
            f"{n:>4} {d:>11,} {med['plain']:>10.3f} {med['ours']:>9.3f} "
            f"{med['flower']:>11.3f} {med['ours'] / med['plain']:>11.2f} "
            f"{med['ours'] / med['flower']:>12.2f} {upload:>12.3f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="n = 10, LoRA d only")
    parser.add_argument("--full-50", action="store_true", help="also n = 50 x full d")
    parser.add_argument(
        "--protocol", action="store_true", help="only the protocol-only table (no transport)"
    )
    parser.add_argument(
        "--cell",
        action="append",
        default=[],
        metavar="N,D",
        help="run only these cells, e.g. --cell 50,74498 (repeatable)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds R")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    parser.add_argument("--dp", action="store_true", help="distributed discrete Gaussian on")
    parser.add_argument("--baseline", metavar="REV",
                        help="only: our secure round now vs at git revision REV")
    args = parser.parse_args()
    if args.protocol:
        cases = [(n, d) for d in (LORA, FULL) for n in (10, 50)]
        protocol_table(cases, max(args.repeats, 2), args.dp)
        return
    cases = [(10, LORA)] if args.quick else [(10, LORA), (50, LORA), (10, FULL)]
    if args.full_50:
        cases.append((50, FULL))
    if args.cell:
        cases = [(int(c.split(",")[0]), int(c.split(",")[1])) for c in args.cell]
    if args.baseline:
        baseline_table(cases, args.rounds, args.repeats, args.dp, args.timeout, args.baseline)
        return
    round_table(cases, args.rounds, args.repeats, args.dp, args.timeout)


if __name__ == "__main__":
    main()
