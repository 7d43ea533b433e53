"""`confide audit empirical`: a one-run empirical privacy audit of a federated run.

After Steinke, Nasr and Jagielski 2023 ("Privacy Auditing with One (1) Training Run"):
m canaries (random word-piece strings with random labels, unlike any natural row) are each
inserted into one partner's training data with probability 1/2; ONE federated run trains on
it; the final model scores every canary (log-likelihood of its label); the auditor guesses
"member" for the k highest scores and "non-member" for the k lowest, and
`empirical_bounds.epsilon_lower_bound` turns the count of correct guesses into an epsilon
the run provably exceeds with 95% confidence. k is fixed in advance (a fraction of m):
choosing it after looking at the scores would inflate the bound.

The bound is a lower bound: on an honest DP run it must stay below the claimed epsilon
(and is typically far below it); a run whose noise was switched off by a bug shows a
clearly higher bound.

For causal-LM configurations (task = 'causal-lm') `confide audit empirical` runs the canary
exposure audit of `confide.empirical.canaries` instead (secrets a language model can repeat).
"""

from __future__ import annotations

import argparse
import csv
import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from confide.audit.empirical_bounds import epsilon_lower_bound, max_certifiable_epsilon
from confide.config import RunConfig, build_config, load_toml, parse_set_items
from confide.data import TextDataset, load_federated_data
from confide.model import explicit_position_inputs, load_tokenizer

GUESS_FRACTION = 0.1  # k = 10% of the canaries guessed "in", 10% "out", fixed a priori


@dataclass
class AuditResult:
    claimed_epsilon: float
    epsilon_lower_bound: float
    max_certifiable: float
    canaries: int
    included: int
    guesses: int
    correct: int
    delta: float
    run_dir: str


def make_canaries(m: int, num_labels: int, model: str, rng: np.random.Generator
                  ) -> TextDataset:
    """Random strings of 12 word pieces with uniformly random labels."""
    vocab = [t for t in load_tokenizer(model).get_vocab() if t.isalpha() and len(t) > 2]
    vocab.sort()
    texts = [" ".join(rng.choice(vocab, size=12)) for _ in range(m)]
    labels = rng.integers(0, num_labels, size=m)
    return TextDataset(texts=texts, labels=labels, source="canaries")


def _write_csv(path: Path, texts: list[str], labels: list[int]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels, strict=True))


def build_audit_data(cfg: RunConfig, canaries: TextDataset, included: np.ndarray,
                     folder: Path) -> tuple[Path, Path]:
    """One CSV per partner (its natural rows + its share of the included canaries) and the
    evaluation file; included canaries go round-robin to the partners."""
    fed = load_federated_data(data=cfg.data, eval_data=cfg.eval_data, clients=cfg.clients,
                              partitioner=cfg.partitioner, seed=cfg.seed,
                              alpha=cfg.dirichlet_alpha, column=cfg.partition_column,
                              num_labels=cfg.num_labels, max_train=cfg.max_train_examples,
                              max_eval=cfg.max_eval_examples)
    partners = folder / "partners"
    partners.mkdir(parents=True)
    members = np.flatnonzero(included)
    for i, part in enumerate(fed.partitions):
        mine = members[i::cfg.clients]
        _write_csv(partners / f"partner{i:03d}.csv",
                   part.texts + [canaries.texts[j] for j in mine],
                   part.labels.tolist() + [int(canaries.labels[j]) for j in mine])
    eval_path = folder / "eval.csv"
    _write_csv(eval_path, fed.evaluation.texts, fed.evaluation.labels.tolist())
    return partners, eval_path


@torch.no_grad()
def canary_scores(model: torch.nn.Module, canaries: TextDataset, model_name: str,
                  max_length: int) -> np.ndarray:
    """log p(label | canary) under the final model: members should score higher."""
    model.eval()
    batch = load_tokenizer(model_name)(canaries.texts, truncation=True, max_length=max_length,
                                       padding="longest", return_tensors="pt")
    position_ids, token_type_ids = explicit_position_inputs(batch["input_ids"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids, token_type_ids=token_type_ids).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[torch.arange(len(canaries)), torch.as_tensor(canaries.labels)].numpy()


def guess_and_count(scores: np.ndarray, included: np.ndarray, k: int) -> tuple[int, int]:
    """Top-k guessed in, bottom-k guessed out; returns (guesses, correct)."""
    order = np.argsort(scores)
    out_idx, in_idx = order[:k], order[len(order) - k:]
    correct = int(included[in_idx].sum() + (~included[out_idx]).sum())
    return 2 * k, correct


def run_empirical_audit(cfg: RunConfig, *, canaries: int, work_dir: Path,
                        seed: int | None = None) -> AuditResult:
    from confide.simulation.runner import simulate
    from confide.tasks.use import load_trained_model

    # The inclusion bits are the audit's secret: fresh entropy unless a test pins a seed.
    rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
    num_labels = cfg.num_labels or 2
    cfg = cfg.replace(num_labels=num_labels)
    canary_set = make_canaries(canaries, num_labels, cfg.model, rng)
    included = rng.random(canaries) < 0.5
    work_dir.mkdir(parents=True, exist_ok=True)
    partners, eval_path = build_audit_data(cfg, canary_set, included, work_dir / "data")
    np.save(work_dir / "inclusion.npy", included)
    run_dir, summary = simulate(cfg.replace(data=str(partners), eval_data=str(eval_path),
                                            out=str(work_dir / "run")))
    model = load_trained_model(run_dir)
    scores = canary_scores(model, canary_set, cfg.model, cfg.max_length)
    k = max(1, int(GUESS_FRACTION * canaries))
    guesses, correct = guess_and_count(scores, included, k)
    eps = summary["privacy"]["example_level"]
    claimed = max(eps.values()) if eps and cfg.example_dp else float("inf")
    result = AuditResult(
        claimed_epsilon=claimed,
        epsilon_lower_bound=epsilon_lower_bound(canaries, guesses, correct, cfg.delta),
        max_certifiable=max_certifiable_epsilon(canaries, guesses, cfg.delta),
        canaries=canaries, included=int(included.sum()), guesses=guesses, correct=correct,
        delta=cfg.delta, run_dir=str(run_dir))
    record = asdict(result)
    if not np.isfinite(claimed):
        record["claimed_epsilon"] = None  # no DP: nothing claimed (JSON has no Infinity)
    (work_dir / "empirical_audit.json").write_text(json.dumps(record, indent=2))
    return result


def render(result: AuditResult) -> Table:
    table = Table(title="Empirical privacy audit (Steinke, Nasr, Jagielski 2023; 95% conf.)")
    for name in ("claimed epsilon", "empirical lower bound", "most this audit can show",
                 "canaries (in)", "guesses", "correct"):
        table.add_column(name, justify="right")
    claimed = ("inf (no DP)" if result.claimed_epsilon == float("inf")
               else f"{result.claimed_epsilon:.3f}")
    table.add_row(claimed, f"{result.epsilon_lower_bound:.3f}",
                  f"{result.max_certifiable:.3f}", f"{result.canaries} ({result.included})",
                  str(result.guesses), str(result.correct))
    table.caption = (f"delta = {result.delta}; run folder {result.run_dir}. A lower bound "
                     "above the claimed epsilon means the claim is false.")
    return table


def main(args: argparse.Namespace) -> int:
    values = load_toml(Path(args.config)) if args.config else {}
    values.update(parse_set_items(args.set or []))
    cfg = build_config(values)
    out = Path(args.out or "runs/empirical-audit")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose another --out")
    if cfg.task == "causal-lm":  # a generative model: canary exposure (Secret Sharer)
        from confide.empirical.canaries import main as canary_main

        return canary_main(args, cfg, out)
    canaries = 200 if getattr(args, "canaries", None) is None else args.canaries
    result = run_empirical_audit(cfg, canaries=canaries, work_dir=out)
    Console().print(render(result))
    return 1 if result.epsilon_lower_bound > result.claimed_epsilon else 0
