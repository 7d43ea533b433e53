"""The same runs on this checkout and on an earlier revision, side by side: every epsilon
the ledger records, its events, the accuracy and the final model, per privacy mode.

A change that only restructures code must leave all of them identical: the same
configuration and seed give the same partitions, plans, noise multipliers and claims. The
noise itself is drawn from secure randomness (it must not be reproducible), and a secure
sum rounds each update randomly before masking, so the accuracy and the final model of a
noised or secure run differ between any two runs; they are printed for reading, and the
model is compared exactly only for the plain run without DP, which draws nothing.

    python benchmarks/side_by_side.py --baseline 654d2d3

Each run: the tiny random-init model, the synthetic demo corpus, 3 partners, 2 rounds (about
a minute per run on 2 cores). The baseline runs from a `git worktree` of REV with this
virtual environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"model": "tiny", "clients": 3, "rounds": 2, "seed": 7, "batch-size": 16,
          "max-train-examples": 300, "max-eval-examples": 100}
# name -> the privacy keys of the mode (everything else: COMMON)
MODES: dict[str, dict[str, Any]] = {
    "no DP": {"example-dp": False},
    "no DP, secure sum": {"example-dp": False, "secure-aggregation": True},
    "local noise": {},
    "local noise, secure sum": {"secure-aggregation": True, "example-dp-noise": "local"},
    "shared noise": {"secure-aggregation": True, "batch-size": 64},
    "client-level DP (server)": {"example-dp": False, "client-dp": True},
    "distributed DP": {"example-dp": False, "secure-aggregation": True,
                       "distributed-dp": True},
}
DETERMINISTIC = {"no DP"}


def run(tree: Path, keys: dict[str, Any], out: Path, timeout: float) -> tuple[float, str]:
    """`confide simulate` from `tree` (its package first on the path) into `out`."""
    argv = [sys.executable, "-m", "confide.cli", "simulate", "--out", str(out)]
    for key, value in {**COMMON, **keys}.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        argv += ["--set", f"{key}={text}"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True,
                          timeout=timeout)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-6:])
    return time.perf_counter() - start, "" if proc.returncode == 0 else tail


def facts(run_dir: Path) -> dict[str, Any]:
    """What must not change: each privacy claim of the ledger (example-level receipts by
    partner and round, client-level claims by round), the sequence of entry types, and the
    final model's digest and accuracy."""
    entries = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()
               if line.strip()]
    claims: list[tuple[Any, ...]] = []
    for entry in entries:
        payload = entry["payload"]
        # partners' pseudonyms are fresh keys in every simulation: compared without them
        if entry["type"] == "example_dp":
            claims.append(("example", payload["round"], payload["epsilon_claimed"],
                           payload.get("noise_multiplier"), payload.get("sample_rate"),
                           payload.get("steps")))
        elif entry["type"] == "client_dp":
            claims.append(("client", payload["round"], payload.get("epsilon_claimed"),
                           payload.get("noise_multiplier")))
    digests = [e["payload"]["sha256"] for e in entries if e["type"] == "model_digest"]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"claims": sorted(claims, key=repr), "types": [e["type"] for e in entries],
            "model": digests[-1] if digests else None,
            "accuracy": summary.get("final_metrics", {}).get("accuracy")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", metavar="REV", required=True,
                        help="git revision to compare this checkout with")
    parser.add_argument("--mode", action="append", choices=sorted(MODES),
                        help="only these modes (repeatable; default: all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    args = parser.parse_args()
    tree = Path(tempfile.mkdtemp(prefix="confide-baseline-"))
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(tree), args.baseline],
                   check=True, capture_output=True, cwd=ROOT)
    failed = 0
    try:
        print(f"this checkout vs {args.baseline}: tiny model, synthetic corpus, "
              f"{COMMON['clients']} partners, {COMMON['rounds']} rounds, seed {COMMON['seed']}")
        print(f"{'mode':<26} {'claims':>7} {'same claims':>12} {'same entries':>13} "
              f"{'same model':>11} {'acc then':>9} {'acc now':>8} {'s then':>7} {'s now':>6}")
        for name in args.mode or list(MODES):
            with tempfile.TemporaryDirectory() as tmp:
                out: dict[str, Any] = {}
                seconds: dict[str, float] = {}
                for label, where in (("then", tree), ("now", ROOT)):
                    folder = Path(tmp) / label
                    seconds[label], error = run(where, MODES[name], folder, args.timeout)
                    if error:
                        print(f"{name}: the {label} run failed:\n{error}")
                        break
                    out[label] = facts(folder)
                if len(out) < 2:
                    failed += 1
                    continue
            then, now = out["then"], out["now"]
            same_claims = then["claims"] == now["claims"]
            same_types = then["types"] == now["types"]
            same_model = then["model"] == now["model"]
            ok = same_claims and same_types and (same_model or name not in DETERMINISTIC)
            failed += not ok
            model = ("yes" if same_model else "no") + ("" if name in DETERMINISTIC else "*")
            print(f"{name:<26} {len(now['claims']):>7} {same_claims!s:>12} "
                  f"{same_types!s:>13} {model:>11} {then['accuracy']:>9.3f} "
                  f"{now['accuracy']:>8.3f} {seconds['then']:>7.0f} {seconds['now']:>6.0f}",
                  flush=True)
        print("* noise drawn from secure randomness, or a secure sum's random rounding: the "
              "model and accuracy differ between any two runs; claims and entries must not")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)],
                       capture_output=True, cwd=ROOT)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
