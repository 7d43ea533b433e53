"""Utility of DP federated causal-LM fine-tuning on E2E, in one process.

Same model, same training rows, same evaluation prompts for every setting:
zero-shot, central non-DP, federated non-DP, federated DP at each --epsilons (10 partners,
delta 1e-5, noise calibrated per partner with the product's PLD calibration), reporting
held-out perplexity, corpus BLEU (all references of each MR), ROUGE-L and seconds; plus the
DP step / non-DP step time ratio of this model (Opacus hooks, same batch).

The federated loop mirrors the product without Flower: every round each partner trains
from the global LoRA weights with `train_dp` (the task's per-example loss), the server
averages the deltas weighted by rows (FedAvg). Data: ../shared/data/e2e (devset.csv rows as
the training pool, testset_w_refs.csv for evaluation). Long on 2 CPU cores with smollm2:

    python benchmarks/utility_e2e.py --model smollm2 --rows 1000 --eval-prompts 50
    python benchmarks/utility_e2e.py --model tiny --rows 40 --eval-prompts 3 --rounds 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from confide.clients.dp_training import train_dp
from confide.config import build_config
from confide.data import partition
from confide.model import (
    apply_delta,
    compute_delta,
    load_trainable_state,
    trainable_state,
)
from confide.privacy.accountant import calibrate_noise
from confide.tasks import build_model, get_task

E2E = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "e2e"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", type=int, default=1000, help="training rows of devset.csv")
    ap.add_argument("--eval-prompts", type=int, default=50)
    ap.add_argument("--eval-rows", type=int, default=400, help="rows for perplexity")
    ap.add_argument("--partners", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epsilons", default="8,3")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dp-batch-size", type=int, default=0,
                    help="expected batch of the DP rows (default: --batch-size)")
    ap.add_argument("--dp-lr", type=float, default=0.0,
                    help="learning rate of the DP rows (default: --lr)")
    ap.add_argument("--central-dp", action="store_true",
                    help="add central DP rows at each epsilon: one DP-SGD run on the union "
                         "of the rows, which is what the shared-noise mode releases (one "
                         "noisy sum per step, its noise summed from the partners' shares)")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--out", default="",
                    help="append each result row here (JSON lines) as soon as it is measured; "
                         "rows already in it (same setting, model and rows) are not rerun")
    ap.add_argument("--only", default="zero-shot,central,central-dp,fed,fed-dp,ratio",
                    help="settings to run, in this order: zero-shot, central, central-dp "
                         "(one row per --epsilons), fed, fed-dp (one row per --epsilons), "
                         "ratio; e.g. fed-dp:8 for one epsilon only")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = build_config({"task": "causal-lm", "model": args.model, "prompt-column": "mr",
                        "completion-column": "ref", "max-length": args.max_length,
                        "generate-prompts": args.eval_prompts, "max-new-tokens": 64,
                        "eval-batch-size": 16, "rounds": args.rounds})
    task = get_task(cfg)
    train = task.read(E2E / "devset.csv", max_rows=args.rows)
    evaluation = task.read(E2E / "testset_w_refs.csv", max_rows=args.eval_rows)
    model = build_model(task.model_spec(2))
    start_state = trainable_state(model)
    evaluator = task.evaluator(evaluation)
    out = Path(args.out) if args.out else None
    rows: list[dict[str, object]] = []
    if out is not None and out.exists():
        rows = [r for r in map(json.loads, out.read_text().splitlines())
                if r.get("model") == args.model and r.get("rows") in (None, len(train))]
    dp_batch = args.dp_batch_size or args.batch_size
    dp_lr = args.dp_lr or args.lr

    schedule = {"rounds": args.rounds, "dp_batch": dp_batch, "dp_lr": dp_lr}
    # What makes a row distinct besides its setting: a DP row run with other rounds, DP
    # batch or DP learning rate is another row (so a schedule search adds rows); a non-DP
    # training row depends on the rounds only; zero-shot and the step ratio on nothing.
    DP_ROW, TRAINED_ROW, FIXED_ROW = ("rounds", "dp_batch", "dp_lr"), ("rounds",), ()

    def measured(setting: str, keyed_by: tuple[str, ...]) -> bool:
        return any(r["setting"] == setting and all(r.get(f) == schedule[f] for f in keyed_by)
                   for r in rows)

    def record(row: dict[str, object]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out is not None:
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    def evaluate(name: str, seconds: float) -> None:
        t0 = time.perf_counter()
        ev = evaluator(model, torch.device("cpu"), round_=args.rounds, final=True)
        record({"setting": name, **{k: round(v, 3) for k, v in ev.metrics.items()},
                "train_seconds": round(seconds, 1),
                "eval_seconds": round(time.perf_counter() - t0, 1),
                "model": args.model, "rows": len(train), "partners": args.partners,
                **schedule})

    def local(tensors: dict, sigma: float, dp: bool, epochs: float) -> None:
        train_dp(model, tensors, noise_multiplier=sigma, max_grad_norm=1.0,
                 batch_size=dp_batch if dp else args.batch_size,
                 physical_batch_size=args.batch_size, epochs=epochs, optimizer="adam",
                 learning_rate=dp_lr if dp else args.lr, dp=dp, objective=task.objective)

    def central(name: str, eps: float | None) -> None:
        load_trainable_state(model, start_state)
        union = dict(task.encode(train))
        q = min(1.0, (dp_batch if eps else args.batch_size) / len(union["labels"]))
        sigma = 0.0 if eps is None else calibrate_noise(
            eps, 1e-5, q, max(1, round(args.rounds / q)))
        t0 = time.perf_counter()
        local(union, sigma, eps is not None, float(args.rounds))
        evaluate(name, time.perf_counter() - t0)

    parts = [dict(task.encode(p)) for p in
             partition(train, args.partners, "iid", seed=0)]
    sizes = np.array([len(p["labels"]) for p in parts], dtype=float)

    def federated(name: str, eps: float | None) -> None:
        load_trainable_state(model, start_state)
        state = trainable_state(model)
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            deltas = []
            for p in parts:
                load_trainable_state(model, state)
                q = min(1.0, dp_batch / len(p["labels"]))
                sigma = 0.0 if eps is None else calibrate_noise(
                    eps, 1e-5, q, max(1, round(1 / q)) * args.rounds)
                local(p, sigma, eps is not None, 1.0)
                deltas.append(compute_delta(trainable_state(model), state))
            mean = {k: sum(w * d[k] for w, d in zip(sizes / sizes.sum(), deltas,
                                                    strict=True)) for k in state}
            state = apply_delta(state, mean)
        load_trainable_state(model, state)
        evaluate(name, time.perf_counter() - t0)

    def step_ratio(name: str) -> None:
        """DP step vs non-DP step, same batch, same model (median of 3 each)."""
        batch = {k: v[:args.batch_size] for k, v in task.encode(train).items()}
        times = {}
        for dp in (False, True):
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                train_dp(model, batch, noise_multiplier=1.0, max_grad_norm=1.0,
                         batch_size=len(batch["labels"]), physical_batch_size=args.batch_size,
                         epochs=1.0, learning_rate=1e-6, dp=dp, objective=task.objective)
                runs.append(time.perf_counter() - t0)
            times[dp] = float(np.median(runs))
        record({"setting": name, "dp_seconds": round(times[True], 3),
                "non_dp_seconds": round(times[False], 3),
                "ratio": round(times[True] / times[False], 3), "model": args.model})

    epsilons = [float(e) for e in args.epsilons.split(",")]
    plan: list[tuple[str, tuple[str, ...], Callable[[str], None]]] = []
    for key in args.only.split(","):
        kind, _, only_eps = key.partition(":")
        eps_list = [float(only_eps)] if only_eps else epsilons
        if kind == "zero-shot":
            plan.append(("zero-shot", FIXED_ROW, lambda name: evaluate(name, 0.0)))
        elif kind == "central":
            plan.append(("central non-DP", TRAINED_ROW, lambda name: central(name, None)))
        elif kind == "central-dp":
            plan += [(f"central DP eps={e:g} (= shared noise)", DP_ROW,
                      lambda name, e=e: central(name, e)) for e in eps_list]
        elif kind == "fed":
            plan.append(("federated non-DP", TRAINED_ROW,
                         lambda name: federated(name, None)))
        elif kind == "fed-dp":
            plan += [(f"federated DP eps={e:g}", DP_ROW,
                      lambda name, e=e: federated(name, e)) for e in eps_list]
        elif kind == "ratio":
            plan.append(("DP step / non-DP step", FIXED_ROW, step_ratio))
        else:
            raise SystemExit(f"--only: unknown setting {key!r}")
    for name, keyed_by, run in plan:
        if measured(name, keyed_by):
            print(f"{name}: already in {out}", flush=True)
            continue
        run(name)

    print("\n| setting | rounds (epochs) | DP batch | DP lr | perplexity | BLEU | ROUGE-L "
          "| train s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "perplexity" in r:
            print(f"| {r['setting']} | {r.get('rounds')} | {r.get('dp_batch')} | "
                  f"{r.get('dp_lr')} | {r['perplexity']:.2f} | {r['bleu']:.1f} | "
                  f"{r['rouge_l']:.1f} | {r['train_seconds']} |")
    for r in rows:
        if "ratio" in r:
            print(f"\nDP step / non-DP step: {r['ratio']}x")


if __name__ == "__main__":
    main()
