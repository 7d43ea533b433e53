"""SST-2 dev accuracy: central vs federated, each without DP and with DP at epsilon 8 and 3.

The table separates the two costs: *cost of federation* (federated minus central at the
same privacy setting) and *cost of privacy* (DP minus non-DP in the same setting).

Data: ../shared/data/sst2 (GLUE SST-2): a seeded random subset of train.csv of --train-size
rows (stated in the table), the full dev.csv (872 rows) for evaluation. Same model, fine-tune
mode and sequence length for every row.
* Federated rows run the real Confide app (`confide.simulation.runner.simulate`, Flower's
  simulation engine) with 10 partners and a Dirichlet(alpha=1.0) label split; DP rows use
  delta 1e-5 and per-partner noise calibrated to the target epsilon over all rounds. Their
  defaults are the best recipe of benchmarks/dp_recipe_search.py (see
  benchmarks/results/dp_recipe_search.md).
* Shared-noise rows ("federated, shared noise") run the real app with
  `secure-aggregation = true` and `example-dp-noise = "shared"`: one central DP-SGD step per
  round on the union of the sampled records, its noise summed from the partners' shares
  inside secure aggregation. Only the mode is chosen; its rounds, expected batch and server
  optimizer are the mode's defaults (`confide.config.SHARED_NOISE_DEFAULTS`).
* Central rows train one model on all rows in-process with the same trainer
  (`confide.clients.dp_training.train_dp`): non-DP with a small batch, DP (Opacus, same
  epsilon, delta, rows) tuned for DP: a large expected batch (--central-dp-batch) and
  several epochs, noise from `confide.privacy.accountant.calibrate_noise`.

    python benchmarks/utility_sst2.py                 # the full table (long on 2 CPU cores)
    python benchmarks/utility_sst2.py --quick         # a smaller subset
    python benchmarks/utility_sst2.py --only central,central-dp8   # some rows only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from sst2_subset import SST2, write_subset

from confide.clients.dp_training import train_dp
from confide.clients.opacus_compat import resolve_grad_sample_mode
from confide.config import build_config
from confide.data import read_text_file
from confide.encoding import encode
from confide.model import ModelSpec, load_tokenizer
from confide.tasks import build_model
from confide.tasks.classification import evaluate


def _sorted(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Row order does not matter to Poisson sampling or evaluation; sorted rows let the
    # trainer's padding trim work on every physical batch (~3x faster on CPU).
    order = torch.argsort(tensors["attention_mask"].sum(1), stable=True)
    return {k: v[order] for k, v in tensors.items()}


def central(args: argparse.Namespace, train_file: Path, epsilon: float | None = None
            ) -> tuple[float, float | None]:
    from confide.privacy.accountant import calibrate_noise

    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model)
    train = _sorted(encode(read_text_file(train_file, num_labels=2), tok, args.max_length))
    dev = _sorted(encode(read_text_file(SST2 / "dev.csv", num_labels=2), tok,
                         args.max_length))
    model = build_model(ModelSpec(args.model, 2, fine_tune=args.fine_tune, seed=args.seed,
                                  lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank,
                                  lora_targets=args.lora_targets,
                                  lora_freeze_a=args.lora_freeze_a))
    if epsilon is None:
        train_dp(model, train, noise_multiplier=0.0, max_grad_norm=1.0,
                 batch_size=args.central_batch, physical_batch_size=16,
                 epochs=args.central_epochs, optimizer=args.optimizer, learning_rate=args.lr,
                 seed=args.seed, dp=False, head_learning_rate=args.head_lr or None)
        return evaluate(model, dev, 64)[0], None
    n = len(train["labels"])
    q = min(1.0, args.central_dp_batch / n)
    steps = max(1, round(args.central_dp_epochs / q))
    sigma = calibrate_noise(epsilon, 1e-5, q, steps)
    train_dp(model, train, noise_multiplier=sigma, max_grad_norm=args.clip,
             batch_size=args.central_dp_batch, physical_batch_size=16,
             epochs=args.central_dp_epochs, optimizer=args.optimizer,
             learning_rate=args.central_dp_lr, seed=args.seed, dp=True,
             head_learning_rate=args.central_dp_head_lr or None,
             # as the ClientApp resolves 'auto': full fine-tuning clips without hooks
             grad_sample_mode=resolve_grad_sample_mode("auto", args.fine_tune, model))
    return evaluate(model, dev, 64)[0], epsilon


def _common_values(args: argparse.Namespace, train_file: Path, out: Path
                    ) -> dict[str, object]:
    """What every federated row has in common: data, split, model and delta."""
    return {
        "model": args.model, "fine-tune": args.fine_tune, "clients": args.clients,
        "data": str(train_file), "eval-data": str(SST2 / "dev.csv"),
        "partitioner": "dirichlet", "dirichlet-alpha": 1.0, "seed": args.seed,
        "max-length": args.max_length, "out": str(out), "delta": 1e-5,
        "lora-rank": args.lora_rank, "lora-alpha": 2.0 * args.lora_rank,
        "lora-targets": args.lora_targets, "lora-freeze-a": args.lora_freeze_a,
    }


def _simulate(values: dict[str, object]) -> tuple[float, float | None]:
    from confide.simulation.runner import simulate

    _, summary = simulate(build_config(values))
    eps = summary["privacy"]["example_level"]
    dp = summary["privacy"]["example_dp"] and eps
    return summary["final_metrics"]["accuracy"], (max(eps.values()) if dp else None)


def federated(args: argparse.Namespace, train_file: Path, out: Path, epsilon: float | None
              ) -> tuple[float, float | None]:
    values = {
        **_common_values(args, train_file, out), "rounds": args.rounds,
        "batch-size": args.batch_size, "physical-batch-size": min(args.batch_size, 64),
        "local-epochs": args.local_epochs, "optimizer": args.optimizer,
        "learning-rate": args.lr, "max-grad-norm": args.clip, "head-learning-rate": args.head_lr,
        "server-optimizer": args.server_optimizer, "server-learning-rate": args.server_lr,
    }
    if args.server_momentum is not None:  # else what a user gets
        values["server-momentum"] = args.server_momentum
    if epsilon is None:
        values["example-dp"] = False
    else:
        values.update({"target-epsilon": epsilon, "max-epsilon": epsilon,
                       "learning-rate": args.dp_lr, "head-learning-rate": args.dp_head_lr})
    return _simulate(values)


def shared(args: argparse.Namespace, train_file: Path, out: Path, epsilon: float
           ) -> tuple[float, float | None]:
    """Federated DP with the noise shared inside secure aggregation, through the real app.

    Only the mode is chosen (plus the data, model and epsilon every row shares): rounds,
    expected batch and server optimizer are the mode's own defaults
    (`confide.config.SHARED_NOISE_DEFAULTS`), which is what a user gets.
    """
    values = {**_common_values(args, train_file, out), "secure-aggregation": True,
              "example-dp-noise": "shared", "target-epsilon": epsilon, "max-epsilon": epsilon}
    if args.shared_rounds:
        values["rounds"] = args.shared_rounds
    return _simulate(values)


ROWS = {  # --only name -> (setting, epsilon)
    "central": ("central", None), "central-dp8": ("central", 8.0),
    "central-dp3": ("central", 3.0), "fed": ("federated", None), "dp8": ("federated", 8.0),
    "dp3": ("federated", 3.0), "sh8": ("shared", 8.0), "sh3": ("shared", 3.0),
}


def table(rows: dict[tuple[str, float | None], tuple[float, float | None, float]],
          args: argparse.Namespace) -> str:
    """Rows = privacy setting, columns = central / federated / cost of federation; the cost
    of privacy is each DP cell minus the non-DP cell above it."""
    out = [f"SST-2 dev accuracy (872 rows); train subset {args.train_size} rows of train.csv "
           f"(seed {args.seed}); model {args.model}, fine-tune {args.fine_tune}; federated: "
           f"{args.clients} partners, Dirichlet 1.0, {args.rounds} rounds x "
           f"{args.local_epochs:g} local epochs, batch {args.batch_size}; delta 1e-5",
           "", "| privacy | central | federated, local noise | federated, shared noise | "
           "cost of federation (local / shared) | cost of privacy (central) | cost of privacy "
           "(federated, local / shared) | seconds (central / local / shared) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(key: tuple[str, float | None]) -> str:
        return f"{100 * rows[key][0]:.1f}%" if key in rows else "-"

    def diff(a: tuple[str, float | None], b: tuple[str, float | None]) -> str:
        return (f"{100 * (rows[a][0] - rows[b][0]):+.1f} pt" if a in rows and b in rows
                else "-")

    plain = ("federated", None)
    for eps in (None, 8.0, 3.0):
        c, f, s = ("central", eps), ("federated", eps), ("shared", eps)
        if c not in rows and f not in rows and s not in rows:
            continue
        label = "non-DP" if eps is None else f"DP eps {eps:g}"
        secs = " / ".join(f"{rows[k][2]:.0f}" if k in rows else "-" for k in (c, f, s))
        fed_cost = f"{diff(f, c)} / {diff(s, c)}" if eps else diff(f, c)
        priv_cost = f"{diff(f, plain)} / {diff(s, plain)}" if eps else "-"
        out.append(f"| {label} | {cell(c)} | {cell(f)} | {cell(s)} | {fed_cost} | "
                   f"{diff(c, ('central', None)) if eps else '-'} | {priv_cost} | {secs} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--fine-tune", default="lora")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="query,value")
    p.add_argument("--lora-freeze-a", action="store_true")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=2e-3, help="non-DP learning rate")
    p.add_argument("--head-lr", type=float, default=1e-2,
                   help="non-DP learning rate of the classifier head (0 = --lr)")
    p.add_argument("--dp-lr", type=float, default=1e-2)
    p.add_argument("--dp-head-lr", type=float, default=2e-2)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--server-optimizer", default="sgd")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--server-momentum", type=float, default=None,
                   help="server momentum of the federated rows (default: the product's)")
    p.add_argument("--central-batch", type=int, default=32)
    p.add_argument("--central-epochs", type=float, default=3.0)
    p.add_argument("--central-dp-batch", type=int, default=256,
                   help="expected batch of the central DP row (256 at 3,000 rows: 35 steps)")
    p.add_argument("--central-dp-epochs", type=float, default=3.0)
    p.add_argument("--central-dp-lr", type=float, default=1e-2)
    p.add_argument("--central-dp-head-lr", type=float, default=2e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2000 rows")
    p.add_argument("--shared-rounds", type=int, default=0,
                   help="rounds of the shared-noise rows (0 = the mode's default)")
    p.add_argument("--only", default="central,central-dp8,central-dp3,fed,dp8,dp3,sh8,sh3")
    p.add_argument("--json", help="write the rows here after each one; rows already in it "
                   "are not rerun")
    args = p.parse_args(argv)
    if not SST2.exists():
        print(f"SST-2 not found at {SST2} (../shared/data beside the checkout)")
        return 2
    if args.quick:
        args.train_size = 2000
    rows: dict[tuple[str, float | None], tuple[float, float | None, float]] = {}
    done = Path(args.json) if args.json else None
    if done is not None and done.exists():
        # Rows already measured (same file, same arguments) are kept, not rerun: a long
        # table can be built over several invocations.
        for r in json.loads(done.read_text()):
            rows[(r["setting"], r["epsilon_target"])] = (r["accuracy"], r["epsilon"],
                                                         r["seconds"])
    with tempfile.TemporaryDirectory() as tmp:
        train_file = write_subset(args.train_size, args.seed, Path(tmp) / "train.csv")
        for name in args.only.split(","):
            setting, eps = ROWS[name]
            if (setting, eps) in rows:
                continue
            t = time.perf_counter()
            if setting == "central":
                acc, spent = central(args, train_file, eps)
            elif setting == "shared":
                assert eps is not None
                acc, spent = shared(args, train_file, Path(tmp) / name, eps)
            else:
                acc, spent = federated(args, train_file, Path(tmp) / name, eps)
            rows[(setting, eps)] = (acc, spent, time.perf_counter() - t)
            print(f"{name}: accuracy {acc:.4f}, epsilon {spent}, "
                  f"{rows[(setting, eps)][2]:.0f} s", flush=True)
            if done is not None:
                done.write_text(json.dumps(
                    [{"setting": k[0], "epsilon_target": k[1], "accuracy": v[0],
                      "epsilon": v[1], "seconds": v[2]} for k, v in rows.items()], indent=1))
    print()
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
