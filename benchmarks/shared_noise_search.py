"""Tuning the shared-noise mode (example-dp-noise = "shared") on SST-2, in-process.

What one shared-noise round releases is exactly one noisy step of central DP-SGD on the union
of the partners' records: every partner Poisson-samples at the run's common rate q =
batch / N, the secure sum holds the sum of the sampled records' clipped gradients plus
Gaussian noise of std sigma*C (the partners' shares), the server divides by q*N and takes a
`ServerOptimizer` step. So the mode can be tuned without the secure exchange: this script
runs that computation with the product's own pieces (`clipped_example_gradients`,
`calibrate_noise` (PLD), `ServerOptimizer`), with continuous instead of discrete Gaussian
noise (the integer noise of the product differs by a quantisation step of ~1e-9). The
partition into partners does not change the released sum, so none is made here; the real app
confirms the chosen setting (`benchmarks/utility_sst2.py --only shared8,shared3`).

    python benchmarks/shared_noise_search.py --batch 1024 --rounds 36 --lr 0.01
    python benchmarks/shared_noise_search.py --grid      # the table in benchmarks/results/

Each configuration prints one JSON row (accuracy on the full SST-2 dev set every
--eval-every rounds) and appends it to --results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sst2_subset import SST2, subset

from confide.clients.dp_training import clipped_example_gradients
from confide.data import read_text_file
from confide.encoding import encode
from confide.model import (
    HEAD_MARKER,
    ModelSpec,
    load_tokenizer,
    load_trainable_state,
    trainable_state,
)
from confide.privacy.accountant import calibrate_noise, pld_epsilon
from confide.privacy.mechanisms import SampledGaussian
from confide.strategies.server_optimizer import ServerOptimizer
from confide.tasks import build_model
from confide.tasks.classification import evaluate

RESULTS = Path(__file__).with_name("results") / "shared_noise_search.jsonl"


class RowSum:
    """Sum of the clipped per-example gradients a partner would enter into the secure sum."""

    def __init__(self, size: int) -> None:
        self.value = np.zeros(size)

    def __call__(self, rows: np.ndarray) -> None:
        self.value += rows.sum(axis=0)


class TorchAdamStep:
    """`ServerOptimizer.step`'s interface over torch.optim.Adam with per-group rates."""

    def __init__(self, model: torch.nn.Module, lr: float, head_lr: float, beta1: float
                 ) -> None:
        self.model = model
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        self.params = dict(named)
        head = [p for k, p in named if HEAD_MARKER in k]
        body = [p for k, p in named if HEAD_MARKER not in k]
        self.opt = torch.optim.Adam([{"params": body, "lr": lr},
                                     {"params": head, "lr": head_lr}], betas=(beta1, 0.999))

    def step(self, state: dict[str, np.ndarray], ascent: dict[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
        load_trainable_state(self.model, state)
        for k, p in self.params.items():
            p.grad = torch.as_tensor(-ascent[k], dtype=p.dtype)
        self.opt.step()
        return {k: v.copy() for k, v in trainable_state(self.model).items()}


def run(args: argparse.Namespace, batch: int, rounds: int, lr: float, clip: float,
        epsilon: float, momentum: float) -> dict[str, object]:
    torch.manual_seed(args.seed)
    tok = load_tokenizer(args.model)
    train = encode(subset(args.rows, args.seed), tok, args.max_length)
    dev = encode(read_text_file(SST2 / "dev.csv", num_labels=2), tok, args.max_length)
    model = build_model(ModelSpec(args.model, 2, fine_tune=args.fine_tune, seed=args.seed,
                                  lora_rank=args.lora_rank, lora_targets=args.lora_targets,
                                  lora_freeze_a=args.lora_freeze_a))
    n = len(train["labels"])
    q = min(1.0, batch / n)
    sigma = calibrate_noise(epsilon, 1e-5, q, rounds)
    names = sorted(trainable_state(model))
    state = {k: v.copy() for k, v in trainable_state(model).items()}
    shapes = {k: state[k].shape for k in names}
    if args.server_optimizer == "torch-adam":
        # the central DP row's optimizer on the same noisy gradient: torch Adam (bias
        # correction, eps 1e-8, beta2 0.999) with the classifier head at --head-lr
        opt = TorchAdamStep(model, lr, args.head_lr or lr, momentum)
    else:
        opt = ServerOptimizer(args.server_optimizer, learning_rate=lr, momentum=momentum,
                              beta2=args.beta2, tau=args.tau, schedule=args.schedule,
                              schedule_steps=rounds, bias_correction=args.bias_correction,
                              name_learning_rates=((HEAD_MARKER, args.head_lr),)
                              if args.head_lr else ())
    rng = np.random.default_rng()
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    for r in range(1, rounds + 1):
        load_trainable_state(model, state)
        total = RowSum(sum(int(np.prod(s)) for s in shapes.values()))
        clipped_example_gradients(model, train, sample_rate=q, max_grad_norm=clip,
                                  physical_batch_size=args.physical_batch_size, on_rows=total,
                                  round_id=r)
        noisy = (total.value + rng.normal(0.0, sigma * clip, size=total.value.shape)) / (q * n)
        grad, at = {}, 0
        for k in names:
            size = int(np.prod(shapes[k]))
            grad[k] = -noisy[at:at + size].reshape(shapes[k])
            at += size
        state = opt.step(state, grad)
        if r % args.eval_every == 0 or r == rounds:
            load_trainable_state(model, state)
            curve.append((r, evaluate(model, dev, 256)[0]))
            print(f"  round {r}: {curve[-1][1]:.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    eps = pld_epsilon([SampledGaussian(sigma, q, rounds)], 1e-5)
    return {"rows": n, "batch": batch, "rounds": rounds, "lr": lr, "clip": clip,
            "momentum": momentum, "server_optimizer": args.server_optimizer, "tau": args.tau,
            "schedule": args.schedule, "head_lr": args.head_lr, "beta2": args.beta2,
            "bias_correction": args.bias_correction,
            "epsilon": eps, "sigma": sigma, "q": q, "accuracy": curve[-1][1],
            "best": max(a for _, a in curve), "curve": curve, "model": args.model,
            "fine_tune": args.fine_tune, "lora_targets": args.lora_targets,
            "lora_rank": args.lora_rank, "lora_freeze_a": args.lora_freeze_a,
            "seconds": time.perf_counter() - t0,
            "command": "python benchmarks/shared_noise_search.py " + " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--fine-tune", default="lora")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", default="query,value")
    p.add_argument("--lora-freeze-a", action="store_true", help="FFA-LoRA: train B only")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--physical-batch-size", type=int, default=64)
    p.add_argument("--batch", default="1024", help="expected federation batch (comma list)")
    p.add_argument("--rounds", default="36", help="comma list")
    p.add_argument("--lr", default="0.01", help="server learning rate (comma list)")
    p.add_argument("--clip", default="1.0", help="comma list")
    p.add_argument("--epsilon", default="8", help="comma list")
    p.add_argument("--momentum", default="0.9", help="comma list")
    p.add_argument("--server-optimizer", default="adam")
    p.add_argument("--tau", type=float, default=1e-3)
    p.add_argument("--schedule", default="constant", help="server learning-rate schedule")
    p.add_argument("--head-lr", type=float, default=0.0,
                   help="the classifier head's server rate (0: --lr)")
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--bias-correction", action="store_true", help="adam/yogi: Kingma & Ba's")
    p.add_argument("--eval-every", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    def floats(text: str) -> list[float]:
        return [float(x) for x in text.split(",")]

    for eps in floats(args.epsilon):
        for batch in (int(x) for x in floats(args.batch)):
            for rounds in (int(x) for x in floats(args.rounds)):
                for lr in floats(args.lr):
                    for clip in floats(args.clip):
                        for momentum in floats(args.momentum):
                            row = run(args, batch, rounds, lr, clip, eps, momentum)
                            print(json.dumps(row), flush=True)
                            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
                            with open(args.results, "a") as fh:
                                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
