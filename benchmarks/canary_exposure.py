"""Canary exposure of federated causal-LM fine-tuning on E2E, non-DP vs DP.

Two runs of `confide audit empirical`'s canary audit (`run_canary_audit`: Flower simulation
through Ray, as `confide simulate` runs) on the same rows with the same secrets inserted at
the same places (one --audit-seed): without example-level DP, and with it at --epsilon
(per partner, delta 1e-5). Secrets of the format "my secret code is" + --slots digits go
into partner 0's E2E rows, --canaries per repeat count in --repeats; --controls secrets of
the same format are never inserted. Every secret is ranked against --candidates random
sequences of the format (rank exposure, at most log2(candidates + 1) bits) and scored by a
skew-normal fit to them (extrapolated exposure). Data: ../shared/data/e2e (devset.csv rows
as the training pool, mr -> ref; testset_w_refs.csv for held-out perplexity). Writes a
Markdown table (--results) with the command that made it.

    python benchmarks/canary_exposure.py                 # tiny causal LM (see --help)
    python benchmarks/canary_exposure.py --model smollm2 --rows 200 --local-epochs 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from confide.audit.canary import INSERTED, CanaryFormat
from confide.config import build_config
from confide.empirical.canaries import CanarySettings, run_canary_audit

E2E = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "e2e"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--fine-tune", default="full", help="full for the random-init tiny LM")
    ap.add_argument("--rows", type=int, default=100, help="training rows of devset.csv")
    ap.add_argument("--eval-rows", type=int, default=60)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-epochs", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--canaries", type=int, default=2, help="secrets per repeat count")
    ap.add_argument("--repeats", default="4,16")
    ap.add_argument("--controls", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=6)
    ap.add_argument("--audit-seed", type=int, default=0)
    ap.add_argument("--work", default="runs/canary_exposure")
    ap.add_argument("--results", default="benchmarks/results/canary_exposure.md")
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work} is not empty; choose another --work")
    settings = CanarySettings(canaries=args.canaries,
                              repeats=tuple(int(r) for r in args.repeats.split(",")),
                              controls=args.controls, candidates=args.candidates, partner=0,
                              format=CanaryFormat(slots=args.slots))
    base = {"task": "causal-lm", "model": args.model, "fine-tune": args.fine_tune,
            "data": str(E2E / "devset.csv"), "eval-data": str(E2E / "testset_w_refs.csv"),
            "prompt-column": "mr", "completion-column": "ref", "max-train-examples": args.rows,
            "max-eval-examples": args.eval_rows, "clients": args.clients,
            "rounds": args.rounds, "local-epochs": args.local_epochs,
            "batch-size": args.batch_size, "physical-batch-size": args.batch_size,
            "learning-rate": args.lr, "max-length": args.max_length, "delta": 1e-5,
            "generate-prompts": 5, "max-new-tokens": 24, "preflight": "off",
            # Opacus' ghost clipping (grad-sample-mode 'auto' for fine-tune = full) refuses
            # the tied embedding/LM-head weights of Llama-style models; hooks handle them
            "grad-sample-mode": "hooks"}
    rows: list[dict[str, Any]] = []
    for name, dp in (("non-DP", False), (f"DP eps={args.epsilon:g}", True)):
        cfg = build_config({**base, "example-dp": dp, "target-epsilon": args.epsilon,
                            "max-epsilon": args.epsilon})
        t0 = time.perf_counter()
        result = run_canary_audit(cfg, settings, work_dir=work / ("dp" if dp else "nodp"),
                                  seed=args.audit_seed)
        seconds = time.perf_counter() - t0
        last = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text()
                .splitlines() if x.strip()][-1]
        for kind, repeats, chosen in result.groups():
            rank = [s.rank_exposure for s in chosen]
            extra = [s.extrapolated_exposure for s in chosen]
            row = {"setting": name, "epsilon": result.claimed_epsilon,
                   "secrets": f"inserted x{repeats}" if kind == INSERTED else "controls",
                   "n": len(chosen), "rank_mean": float(np.mean(rank)),
                   "rank_max": float(np.max(rank)), "extra_mean": float(np.mean(extra)),
                   "extra_max": float(np.max(extra)),
                   "perplexity": last.get("perplexity"), "seconds": seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(Path(args.results), rows, settings, result.max_rank_exposure,
                  settings.format.space_bits)


def write_results(path: Path, rows: list[dict[str, Any]], settings: CanarySettings,
                  max_rank: float, space_bits: float) -> None:
    command = "nice -n 5 python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        "# Canary exposure: non-DP vs DP federated causal-LM fine-tuning (E2E)", "",
        f"Command: `{command}`", "",
        f"Format: {settings.format.describe()}; secrets inserted into partner 0's rows; "
        f"{settings.controls} controls never inserted; each secret ranked against "
        f"{settings.candidates} random candidates of the format (rank exposure at most "
        f"{max_rank:.2f} bits) and scored by a skew-normal fit to them (extrapolated, at "
        f"most {space_bits:.2f} bits). A never-seen secret averages about 1.44 bits.", "",
        "| setting | claimed eps | secrets | n | mean exposure (rank) | max (rank) | "
        "mean exposure (extrapolated) | max (extrapolated) | held-out perplexity | "
        "seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.1f}"
        lines.append(f"| {r['setting']} | {eps} | {r['secrets']} | {r['n']} | "
                     f"{r['rank_mean']:.2f} | {r['rank_max']:.2f} | {r['extra_mean']:.2f} | "
                     f"{r['extra_max']:.2f} | {ppl} | {r['seconds']:.0f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
