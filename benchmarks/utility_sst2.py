"""SST-2 dev accuracy: central non-DP vs federated non-DP vs federated DP (epsilon 3 and 8).

Data: ../shared/data/sst2 (GLUE SST-2): a seeded random subset of train.csv of --train-size
rows (stated in the table), the full dev.csv (872 rows) for evaluation. Same model, fine-tune
mode, optimizer and sequence length for every row. Federated rows run the real Confide app in
Flower's simulation engine with 10 partners and a Dirichlet(alpha=1.0) label split; DP rows
use delta 1e-5 and per-partner noise calibrated to the target epsilon over all rounds.

    python benchmarks/utility_sst2.py                 # the full table (long on 2 CPU cores)
    python benchmarks/utility_sst2.py --quick         # a smaller subset, fewer rounds
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from confide.clients.dp_training import evaluate, train_dp
from confide.config import build_config
from confide.data import read_text_file
from confide.encoding import encode
from confide.model import ModelSpec, build_model, load_tokenizer

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def write_subset(rows: int, seed: int, out: Path) -> Path:
    data = read_text_file(SST2 / "train.csv", num_labels=2)
    idx = np.random.default_rng(seed).permutation(len(data))[:rows]
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in sorted(idx):
            w.writerow([data.texts[i], int(data.labels[i])])
    return out


def central(args: argparse.Namespace, train_file: Path) -> float:
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model)
    train = encode(read_text_file(train_file, num_labels=2), tok, args.max_length)
    dev = encode(read_text_file(SST2 / "dev.csv", num_labels=2), tok, args.max_length)
    model = build_model(ModelSpec(args.model, 2, fine_tune=args.fine_tune, seed=args.seed))
    # Same number of passes over the data as the federated runs: rounds x local epochs.
    train_dp(model, train, noise_multiplier=0.0, max_grad_norm=1.0, batch_size=args.batch_size,
             physical_batch_size=args.batch_size, epochs=args.rounds * args.local_epochs,
             optimizer=args.optimizer, learning_rate=args.lr, seed=args.seed, dp=False,
             head_learning_rate=args.head_lr or None)
    return evaluate(model, dev, 256)[0]


def federated(args: argparse.Namespace, train_file: Path, out: Path, epsilon: float | None
              ) -> tuple[float, float | None]:
    from confide.simulation.runner import simulate

    values = {
        "model": args.model, "fine-tune": args.fine_tune, "rounds": args.rounds,
        "clients": args.clients, "data": str(train_file), "eval-data": str(SST2 / "dev.csv"),
        "partitioner": "dirichlet", "dirichlet-alpha": 1.0, "seed": args.seed,
        "max-length": args.max_length, "batch-size": args.batch_size,
        "physical-batch-size": min(args.batch_size, 64), "local-epochs": args.local_epochs,
        "optimizer": args.optimizer, "learning-rate": args.lr, "out": str(out),
        "delta": 1e-5, "max-grad-norm": args.clip,
        "server-learning-rate": args.server_lr, "head-learning-rate": args.head_lr,
    }
    if epsilon is None:
        values["example-dp"] = False
    else:
        values.update({"target-epsilon": epsilon, "max-epsilon": epsilon,
                       "learning-rate": args.dp_lr})
    _, summary = simulate(build_config(values))
    eps = summary["privacy"]["example_level"]
    return summary["final_metrics"]["accuracy"], (max(eps.values()) if eps else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--fine-tune", default="lora")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--dp-lr", type=float, default=1e-2)
    p.add_argument("--head-lr", type=float, default=2e-2,
                   help="learning rate of the classifier head (0 = same as the rest)")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2000 rows, 3 rounds")
    p.add_argument("--only", default="central,fed,dp8,dp3")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if not SST2.exists():
        print(f"SST-2 not found at {SST2} (../shared/data beside the checkout)")
        return 2
    if args.quick:
        args.train_size, args.rounds = 2000, 3
    rows: list[tuple[str, float, float | None, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        train_file = write_subset(args.train_size, args.seed, Path(tmp) / "train.csv")
        todo = args.only.split(",")
        if "central" in todo:
            t = time.perf_counter()
            rows.append(("central, non-DP", central(args, train_file), None,
                         time.perf_counter() - t))
        for name, eps in (("fed", None), ("dp8", 8.0), ("dp3", 3.0)):
            if name in todo:
                t = time.perf_counter()
                acc, spent = federated(args, train_file, Path(tmp) / name, eps)
                label = "federated, non-DP" if eps is None else f"federated, DP eps {eps:g}"
                rows.append((label, acc, spent, time.perf_counter() - t))
    print(f"\nSST-2 dev accuracy (872 rows); train subset {args.train_size} rows of "
          f"train.csv (seed {args.seed}); model {args.model}, fine-tune {args.fine_tune}, "
          f"{args.clients} partners, Dirichlet 1.0, {args.rounds} rounds x "
          f"{args.local_epochs} local epochs, batch {args.batch_size}, "
          f"max-length {args.max_length}, delta 1e-5")
    base = rows[0][1] if rows and rows[0][0].startswith("central") else None
    print(f"{'setting':<26}{'accuracy':>10}{'vs central':>12}{'epsilon':>10}{'seconds':>10}")
    for label, acc, eps, secs in rows:
        diff = f"{100 * (acc - base):+.1f} pt" if base is not None else "-"
        eps_s = f"{eps:.2f}" if eps is not None else "-"
        print(f"{label:<26}{acc:>10.4f}{diff:>12}{eps_s:>10}{secs:>10.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
