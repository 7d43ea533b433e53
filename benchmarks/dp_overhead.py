"""DP-SGD overhead: time and peak memory of one DP step relative to one non-DP step.

Same model spec, batch and sequence length; one step = forward + backward + optimizer step
(SGD) on one batch, physical batch = logical batch. DP adds per-sample gradients (Opacus),
per-example clipping and Gaussian noise.

Time: the DP and non-DP steps are measured alternately (DP, plain, DP, plain, ...) in one
process after warm-up, on two copies of the same model, so drift on the shared machine hits
both alike; the ratio is of medians.

Memory: on CUDA, torch.cuda.max_memory_allocated() over the step minus what was allocated
before it. On CPU (tracemalloc cannot see torch's allocator) each variant runs alone in a
fresh subprocess, resets the kernel's peak-RSS mark (Linux /proc/self/clear_refs "5")
once model and batch exist, runs 2 steps, and reports peak RSS (VmHWM) minus RSS before the
steps: the extra memory the step needs (without /proc it falls back on ru_maxrss deltas,
which can read 0 when loading the model peaked higher), the median of --memory-repeats such
processes per variant, DP and plain alternating. Both are high-water marks, so transient
per-sample tensors count.

    python benchmarks/dp_overhead.py                # MiniLM, batch 32, seq len 64
    python benchmarks/dp_overhead.py --model tiny --quick
    python benchmarks/dp_overhead.py --modes lora --grad-sample-modes hooks,functorch,ghost
    python benchmarks/dp_overhead.py --modes full --grad-sample-modes ghost,bookkeeping
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from confide.clients.opacus_compat import make_opacus_ready
from confide.model import ModelSpec, load_tokenizer
from confide.tasks import build_model

Step = Callable[[], None]


def make_batch(model: str, batch: int, seq_len: int, device: torch.device
               ) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    vocab = load_tokenizer(model).vocab_size
    ids = torch.randint(1000, vocab, (batch, seq_len), generator=gen)
    return {"input_ids": ids.to(device),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (batch,), generator=gen).to(device)}


def plain_step(spec: ModelSpec, batch: dict[str, torch.Tensor], device: torch.device) -> Step:
    wrapper = make_opacus_ready(build_model(spec).to(device))
    opt = torch.optim.SGD([p for p in wrapper.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        logits = wrapper(batch["input_ids"], batch["attention_mask"])
        F.cross_entropy(logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def dp_step(spec: ModelSpec, batch: dict[str, torch.Tensor], device: torch.device,
            mode: str) -> Step:
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    wrapper = make_opacus_ready(build_model(spec).to(device))
    params = [p for p in wrapper.parameters() if p.requires_grad]
    base = torch.optim.SGD(params, lr=1e-4)
    n = len(batch["labels"])
    if mode in ("ghost", "bookkeeping"):  # both leave the clipped sum in p.grad
        fast_opt = DPOptimizerFastGradientClipping(
            base, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=n,
            loss_reduction="mean")
    if mode == "bookkeeping":
        from confide.clients.book_keeping import BookKeepingClipper

        clipper = BookKeepingClipper(wrapper, max_grad_norm=1.0)

        def bk_step() -> None:
            with clipper.recording():
                logits = wrapper(batch["input_ids"], batch["attention_mask"])
                F.cross_entropy(logits, batch["labels"], reduction="sum").backward()
            clipper.clip_into_grads()
            fast_opt.step()
            fast_opt.zero_grad(set_to_none=True)
        return bk_step
    if mode == "ghost":
        gsm: nn.Module = GradSampleModuleFastGradientClipping(
            wrapper, max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="mean")
        criterion = DPLossFastGradientClipping(gsm, fast_opt, nn.CrossEntropyLoss(), "mean")

        def step() -> None:
            criterion(gsm(batch["input_ids"], batch["attention_mask"]),
                      batch["labels"]).backward()
            fast_opt.step()
            fast_opt.zero_grad(set_to_none=True)
        return step

    gsm = GradSampleModule(wrapper, batch_first=True, loss_reduction="mean",
                           force_functorch=mode == "functorch")
    opt = DPOptimizer(base, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=n,
                      loss_reduction="mean")

    def step() -> None:
        logits = gsm(batch["input_ids"], batch["attention_mask"])
        F.cross_entropy(logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(dp: Step, plain: Step, repeats: int, warmup: int,
                     device: torch.device) -> tuple[float, float]:
    for _ in range(warmup):
        dp()
        plain()
    dp_times, plain_times = [], []
    for _ in range(repeats):
        for fn, sink in ((dp, dp_times), (plain, plain_times)):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            sink.append(time.perf_counter() - t)
    return statistics.median(dp_times), statistics.median(plain_times)


def peak_memory(step: Step, steps: int, device: torch.device) -> float:
    """Bytes of peak memory the steps add on top of what existed before them."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    # Reset the kernel's peak-RSS mark (VmHWM) so the peak of model loading does not mask
    # the step's; ru_maxrss alone cannot be reset and would often read 0.
    resettable = _reset_peak_rss()
    before = _rss_kib("VmRSS") if resettable else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        step()
    after = _rss_kib("VmHWM") if resettable else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss
    return float(after - before) * 1024.0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: "5" resets the peak resident set size to the current one
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    spec = ModelSpec(args.model, 2, fine_tune=args.child_fine_tune)
    batch = make_batch(args.model, args.batch, args.seq_len, device)
    if args.child_variant == "plain":
        step = plain_step(spec, batch, device)
    else:
        step = dp_step(spec, batch, device, args.child_variant)
    print(json.dumps({"bytes": peak_memory(step, 2, device)}))


def memory_in_subprocess(args: argparse.Namespace, fine_tune: str, variant: str) -> float:
    cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--device", args.device, "--threads",
           str(args.threads), "--child-fine-tune", fine_tune, "--child-variant", variant]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["bytes"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm (default) or tiny")
    parser.add_argument("--modes", default="lora,full,head")
    parser.add_argument("--grad-sample-modes", default="hooks",
                        help="comma list of hooks, functorch, ghost, bookkeeping (default hooks)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the machine is shared)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up")
    parser.add_argument("--no-memory", action="store_true", help="skip memory subprocesses")
    parser.add_argument("--memory-repeats", type=int, default=3,
                        help="fresh processes per memory figure (median; default 3)")
    parser.add_argument("--child-fine-tune", help=argparse.SUPPRESS)
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus' full-backward-hook notice on every step
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the checkpoint load report would bury the table
    if args.child_variant:
        _memory_child(args)
        return
    if args.quick:
        args.repeats, args.warmup = 3, 1
    device = torch.device(args.device)
    batch = make_batch(args.model, args.batch, args.seq_len, device)
    print(f"model={args.model} batch={args.batch} seq_len={args.seq_len} device={device} "
          f"threads={args.threads} repeats={args.repeats} (medians, interleaved)")
    header = (f"{'fine-tune':<9} {'grad-sample':<11} {'DP step s':>9} {'plain s':>8} "
              f"{'time x':>7} {'DP mem MB':>9} {'plain MB':>8} {'mem x':>6}")
    print(header)
    print("-" * len(header))
    for fine_tune in args.modes.split(","):
        spec = ModelSpec(args.model, 2, fine_tune=fine_tune)
        plain = plain_step(spec, batch, device)
        for mode in args.grad_sample_modes.split(","):
            dp = dp_step(spec, batch, device, mode)
            t_dp, t_plain = time_interleaved(dp, plain, args.repeats, args.warmup, device)
            del dp
            if args.no_memory:
                mem = "       -        -      -"
            else:
                # alternately, median of --memory-repeats fresh processes each: one
                # process's peak RSS varies by tens of MB with the allocator's layout
                dp_mem, plain_mem = [], []
                for _ in range(args.memory_repeats):
                    dp_mem.append(memory_in_subprocess(args, fine_tune, mode))
                    plain_mem.append(memory_in_subprocess(args, fine_tune, "plain"))
                m_dp, m_plain = statistics.median(dp_mem), statistics.median(plain_mem)
                mem = (f"{m_dp / 2**20:>9.0f} {m_plain / 2**20:>8.0f} "
                       f"{m_dp / max(m_plain, 1.0):>6.2f}")
            print(f"{fine_tune:<9} {mode:<11} {t_dp:>9.3f} {t_plain:>8.3f} "
                  f"{t_dp / t_plain:>7.2f} {mem}", flush=True)


if __name__ == "__main__":
    main()
