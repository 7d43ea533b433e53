"""The privacy tax: what each privacy layer costs in time and accuracy, side by side.

Real rounds of the real app (`confide simulate`, Flower's simulation engine, the default
model: all-MiniLM-L6-v2 with LoRA) on SST-2 rows, at N partners (Dirichlet alpha 1 split),
for five settings:
  none      no privacy (example-dp = false)
  dp        example-level DP-SGD on every partner (eps --epsilon, delta 1e-5, PLD-calibrated)
  dp+sa     the same, with secure aggregation (SecAgg+, the server sees only the sum)
  dp+sa+dd  the same, with distributed DP (clients add discrete Gaussian noise in the sum)
  dp+sa+shared  example DP with the noise shared inside the secure sum (the default with
            secure aggregation): one gradient of the federation's expected batch per round
            (the mode's own defaults: batch-size 1024, server Adam), so a round is one
            exchange of a different size; compare seconds to reach an accuracy, not per round
Each cell is one `confide simulate` process; cells run in the order above, repeated
`--repeats` times (interleaved, so background load hits all settings alike). Seconds per
round come from metrics.jsonl (measured in the ServerApp): round 1 separately (the secure
path adds its two key-setup exchanges there), then the mean of rounds 2..R, which is what a
long run pays per round. Ratio = that mean / the same for `none` at the same N.

    python benchmarks/privacy_tax.py                          # N = 10 and 50 (long on 2 cores)
    python benchmarks/privacy_tax.py --partners 10 --rows 1000 --rounds 2   # quick look
    python benchmarks/privacy_tax.py --markdown benchmarks/results/privacy_tax.md

Data: a seeded subset of ../shared/data/sst2/train.csv (--rows), evaluated on the full
SST-2 dev set (872 rows). Accuracy after a few rounds shows whether a layer breaks learning
(distributed DP at N = 10 does: see the pre-flight warning it prints); the recipe search
(benchmarks/dp_recipe_search.py) is where accuracy is tuned.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sst2_subset import SST2, write_subset

SETTINGS: dict[str, dict[str, object]] = {
    "none": {"example-dp": False},
    "dp": {},
    "dp+sa": {"secure-aggregation": True, "example-dp-noise": "local"},
    "dp+sa+dd": {"secure-aggregation": True, "distributed-dp": True},
    "dp+sa+shared": {"secure-aggregation": True, "example-dp-noise": "shared"},
}


def run_cell(setting: str, partners: int, args: argparse.Namespace, train: Path, out: Path
             ) -> dict[str, object]:
    values: dict[str, object] = {
        "rounds": args.rounds, "clients": partners, "data": str(train),
        "eval-data": str(SST2 / "dev.csv"), "partitioner": "dirichlet",
        "dirichlet-alpha": 1.0, "target-epsilon": args.epsilon,
        "max-epsilon": args.epsilon, "preflight": "warn", **SETTINGS[setting]}
    cmd = [sys.executable, "-m", "confide.cli", "simulate", "--out", str(out)]
    for key, value in values.items():
        cmd += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{setting} N={partners} failed:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    eps = summary["privacy"]["example_level"]
    return {"setting": setting, "partners": partners,
            "first": rows[0]["seconds"],
            "later": statistics.mean(r["seconds"] for r in rows[1:]) if len(rows) > 1
            else rows[0]["seconds"],
            "accuracy": summary["final_metrics"]["accuracy"],
            "epsilon": max(eps.values()) if eps and values.get("example-dp", True) else None,
            "client_epsilon": summary["privacy"]["client_level_epsilon"],
            "wall": wall}


def table(cells: list[dict[str, object]], args: argparse.Namespace) -> str:
    lines = [f"Privacy tax: SST-2, {args.rows} train rows (seed {args.seed}), dev 872 rows; "
             f"minilm LoRA defaults; Dirichlet 1.0; {args.rounds} rounds; eps "
             f"{args.epsilon:g}, delta 1e-5; {args.repeats} interleaved repeat(s); "
             f"{os.cpu_count()} CPU cores", "",
             "| N | setting | s/round (round 1) | s/round (rounds 2..R) | ratio to none | "
             "accuracy | seconds to that accuracy (run) | example eps (max) | client eps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in sorted({int(c["partners"]) for c in cells}):  # type: ignore[call-overload]
        by: dict[str, list[dict[str, object]]] = {}
        for c in cells:
            if c["partners"] == n:
                by.setdefault(str(c["setting"]), []).append(c)
        # without a `none` cell (a --settings subset) there is no ratio to state
        base = statistics.mean(float(c["later"]) for c in by["none"]) \
            if by.get("none") else None  # type: ignore[arg-type]
        for setting in SETTINGS:
            got = by.get(setting)
            if not got:
                continue
            first = statistics.mean(float(c["first"]) for c in got)  # type: ignore[arg-type]
            later = statistics.mean(float(c["later"]) for c in got)  # type: ignore[arg-type]
            acc = statistics.mean(float(c["accuracy"]) for c in got)  # type: ignore[arg-type]
            wall = statistics.mean(float(c["wall"]) for c in got)  # type: ignore[arg-type]
            eps = got[-1]["epsilon"]
            client = got[-1]["client_epsilon"]
            lines.append(
                f"| {n} | {setting} | {first:.1f} | {later:.1f} | "
                f"{'-' if base is None else f'{later / base:.2f}x'} | "
                f"{acc:.4f} | {wall:.0f} | {'-' if eps is None else f'{eps:.2f}'} | "
                f"{'-' if client is None else f'{client:.1f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partners", default="10,50", help="comma-separated N values")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="also write the table (with the command) here")
    args = p.parse_args(argv)
    if not SST2.exists():
        print(f"SST-2 not found at {SST2} (../shared/data beside the checkout)")
        return 2
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    cells: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        train = write_subset(args.rows, args.seed, Path(tmp) / "train.csv")
        for n in (int(x) for x in args.partners.split(",")):
            for rep in range(args.repeats):
                for setting in settings:
                    out = Path(tmp) / f"{setting}-{n}-{rep}"
                    cell = run_cell(setting, n, args, train, out)
                    cells.append(cell)
                    print(json.dumps(cell), flush=True)
    text = table(cells, args)
    print("\n" + text)
    if args.markdown:
        command = "python benchmarks/privacy_tax.py " + " ".join(argv or sys.argv[1:])
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(f"# Privacy tax\n\n`{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
