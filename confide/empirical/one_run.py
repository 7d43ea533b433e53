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

What an audit can show is capped by its size: with every guess right the bound is
`max_certifiable_epsilon(m, r, delta)` (200 canaries, 40 guesses: about 2.55 at delta 1e-5),
so a claim above the cap passes whatever the run leaks. The audit prints the cap, says so
when the claim is above it, and names the canary count that would reach the claim. Input
canaries of a leaky run are not all guessed right, so refuting a claim of 8 takes the
white-box variant (`--white-box`, `confide.empirical.white_box`: gradient canaries through
the partners' DP-SGD), whose guesses on a noise-free run are all right.

For causal-LM configurations (task = 'causal-lm') `confide audit empirical` runs the canary
exposure audit of `confide.empirical.canaries` instead (secrets a language model can repeat).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from confide.audit.empirical_bounds import (
    canaries_needed,
    check_guess_fraction,
    epsilon_lower_bound,
    guesses_for,
    max_certifiable_epsilon,
)
from confide.config import ConfigError, RunConfig, build_config, load_toml, parse_set_items
from confide.data import TextDataset, load_federated_data
from confide.model import explicit_position_inputs, load_tokenizer

GUESS_FRACTION = 0.2  # of the canaries guessed: 10% "in", 10% "out", fixed a priori
BLACK_BOX_CANARIES = 200
WHITE_BOX_CANARIES = 20_000  # white-box: enough to refute 8 at delta 1e-5 at sampling rate 1
CONFIDENCE = 0.95


@dataclass
class AuditResult:
    claimed_epsilon: float  # inf: the run claims no example-level DP
    epsilon_lower_bound: float
    max_certifiable: float  # the bound with every guess right: the most this audit can show
    canaries: int
    included: int
    guesses: int
    correct: int
    delta: float
    run_dir: str
    confidence: float = CONFIDENCE
    method: str = "black-box"  # or "white-box" (gradient canaries)
    guess_rule: str = "top and bottom k"
    # smallest canary count whose cap exceeds the claim with the same guess rule (None: no
    # claim, or no count reaches it)
    canaries_needed: int | None = None
    mechanism: dict[str, Any] = field(default_factory=dict)  # white-box: what ran

    @property
    def claims_dp(self) -> bool:
        return math.isfinite(self.claimed_epsilon)

    @property
    def refuted(self) -> bool:
        """The lower bound exceeds the claim: the run is not as private as it says."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    @property
    def can_refute_claim(self) -> bool | None:
        """Whether this audit could refute the claim at all (None: nothing is claimed)."""
        return self.max_certifiable > self.claimed_epsilon if self.claims_dp else None

    def record(self) -> dict[str, Any]:
        """The JSON record (`--json`, empirical_audit.json): no Infinity in JSON."""
        out = asdict(self)
        out["claimed_epsilon"] = self.claimed_epsilon if self.claims_dp else None
        out["refuted"] = self.refuted
        out["can_refute_claim"] = self.can_refute_claim
        out["verdict"] = verdict_lines(self)
        return out


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
                        seed: int | None = None, guess_fraction: float = GUESS_FRACTION,
                        confidence: float = CONFIDENCE, console: Console | None = None
                        ) -> AuditResult:
    from confide.simulation.runner import simulate
    from confide.tasks.use import load_trained_model

    beta = _beta(confidence)
    guesses = guesses_for(canaries, guess_fraction)
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
                                            out=str(work_dir / "run")), console=console)
    model = load_trained_model(run_dir)
    scores = canary_scores(model, canary_set, cfg.model, cfg.max_length)
    guesses, correct = guess_and_count(scores, included, guesses // 2)
    eps = summary["privacy"]["example_level"]
    claimed = max(eps.values()) if eps and cfg.privacy_mode.example_dp else float("inf")
    result = AuditResult(
        claimed_epsilon=claimed,
        epsilon_lower_bound=epsilon_lower_bound(canaries, guesses, correct, cfg.delta, beta),
        max_certifiable=max_certifiable_epsilon(canaries, guesses, cfg.delta, beta),
        canaries=canaries, included=int(included.sum()), guesses=guesses, correct=correct,
        delta=cfg.delta, run_dir=str(run_dir), confidence=confidence,
        guess_rule=f"top and bottom {guesses // 2} ({guess_fraction:g} of the canaries)",
        canaries_needed=_needed(claimed, cfg.delta, beta,
                                lambda m: guesses_for(m, guess_fraction)))
    (work_dir / "empirical_audit.json").write_text(json.dumps(result.record(), indent=2))
    return result


def run_white_box_audit(cfg: RunConfig, *, canaries: int, work_dir: Path,
                        seed: int | None = None, partner: int = 0,
                        confidence: float = CONFIDENCE) -> AuditResult:
    """Gradient canaries through the partners' DP-SGD (`confide.empirical.white_box`)."""
    from confide.empirical.white_box import (
        count_correct,
        draw_inclusion,
        guesses_for_plan,
        train_with_canaries,
    )

    beta = _beta(confidence)
    included = draw_inclusion(canaries, seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    np.save(work_dir / "inclusion.npy", included)
    run = train_with_canaries(cfg, included, partner=partner)
    guesses, correct = count_correct(run, included)
    plan = run.plan
    rule = (f"every canary guessed, 'in' above {run.threshold:g}" if plan.rule == "threshold"
            else f"the {guesses} highest scores guessed 'in' (an included canary is sampled "
            f"at least once with probability {plan.sampled_fraction:.4f})")
    result = AuditResult(
        claimed_epsilon=run.claimed_epsilon,
        epsilon_lower_bound=epsilon_lower_bound(canaries, guesses, correct, cfg.delta, beta),
        max_certifiable=max_certifiable_epsilon(canaries, guesses, cfg.delta, beta),
        canaries=canaries, included=int(included.sum()), guesses=guesses, correct=correct,
        delta=cfg.delta, run_dir=str(work_dir), confidence=confidence, method="white-box",
        guess_rule=rule,
        canaries_needed=_needed(run.claimed_epsilon, cfg.delta, beta,
                                guesses_for_plan(run.sample_rate, run.steps * run.rounds)),
        mechanism={"noise_multiplier": run.noise_multiplier, "sample_rate": run.sample_rate,
                   "steps_per_round": run.steps, "rounds": run.rounds, "rows": run.rows,
                   "partner": partner})
    (work_dir / "empirical_audit.json").write_text(json.dumps(result.record(), indent=2))
    return result


def _beta(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence {confidence}; allowed: 0 < c < 1 (e.g. 0.95)")
    return 1.0 - confidence


def _needed(claimed: float, delta: float, beta: float,
            guesses: Callable[[int], int]) -> int | None:
    if not math.isfinite(claimed):
        return None
    return canaries_needed(claimed, delta, guesses, beta)


# -- what the audit says ----------------------------------------------------------------------

def capability_line(canaries: int, guesses: int, delta: float, confidence: float) -> str:
    cap = max_certifiable_epsilon(canaries, guesses, delta, 1.0 - confidence)
    return (f"{canaries} canaries, {guesses} guesses: this audit can certify at most epsilon "
            f"{cap:.3f} (delta {delta:g}, {confidence:.0%} confidence), the bound when every "
            "guess is right; it cannot refute a larger claim.")


def advice(result: AuditResult) -> str:
    """How to reach a bound that could refute the claim (one or two sentences)."""
    need = result.canaries_needed
    if result.method == "white-box":
        return (f"To refute it, use --canaries {need} or more." if need is not None else
                "No canary count refutes it at this delta.")
    white = ("--white-box (gradient canaries: a leaky run gets every guess right, which "
             "input canaries do not)")
    if need is not None:
        return f"To refute it, use --canaries {need} (at this guess fraction) or {white}."
    return ("No canary count reaches it at this guess fraction (the delta term grows with "
            f"the count): guess on every canary (--guess-fraction 1) or use {white}.")


def verdict_lines(result: AuditResult) -> list[str]:
    conf = f"{result.confidence:.0%} confidence"
    cap = (f"This audit ({result.canaries} canaries, {result.guesses} guesses) can certify at "
           f"most epsilon {result.max_certifiable:.3f} at {conf}.")
    if not result.claims_dp:
        return [cap, "The run claims no example-level DP (example-dp = false): nothing to "
                f"refute; it leaks at least epsilon {result.epsilon_lower_bound:.3f}."]
    claim = f"({result.claimed_epsilon:.3f}, {result.delta:g})"
    if result.refuted:
        return [f"REFUTED: the run is not {claim}-DP: the empirical lower bound "
                f"{result.epsilon_lower_bound:.3f} exceeds the claimed epsilon "
                f"{result.claimed_epsilon:.3f} at {conf}.", cap]
    if not result.can_refute_claim:
        return [f"INCONCLUSIVE: this audit cannot refute a claim above "
                f"{result.max_certifiable:.3f}; the run claims {result.claimed_epsilon:.3f}, "
                f"so passing says nothing about that claim. {advice(result)}"]
    return [f"Not refuted: lower bound {result.epsilon_lower_bound:.3f} <= claimed epsilon "
            f"{result.claimed_epsilon:.3f}; this audit could have refuted any claim below "
            f"{result.max_certifiable:.3f} at {conf}."]


def render(result: AuditResult) -> Table:
    table = Table(title=f"Empirical privacy audit, {result.method} (Steinke, Nasr, "
                  f"Jagielski 2023; {result.confidence:.0%} conf.)")
    for name in ("claimed epsilon", "empirical lower bound", "most this audit can show",
                 "canaries (in)", "guesses", "correct"):
        table.add_column(name, justify="right")
    claimed = ("inf (no DP)" if result.claimed_epsilon == float("inf")
               else f"{result.claimed_epsilon:.3f}")
    table.add_row(claimed, f"{result.epsilon_lower_bound:.3f}",
                  f"{result.max_certifiable:.3f}", f"{result.canaries} ({result.included})",
                  str(result.guesses), str(result.correct))
    mech = result.mechanism
    ran = (f" DP-SGD of partner {mech['partner']}: noise multiplier "
           f"{mech['noise_multiplier']:.4f}, sampling rate {mech['sample_rate']:.4g}, "
           f"{mech['steps_per_round']} steps x {mech['rounds']} rounds, {mech['rows']} rows "
           "(natural + canaries)." if mech else "")
    table.caption = (f"delta = {result.delta}; guesses: {result.guess_rule}; folder "
                     f"{result.run_dir}.{ran} A lower bound above the claimed epsilon means "
                     "the claim is false.")
    return table


def main(args: argparse.Namespace) -> int:
    values = load_toml(Path(args.config)) if args.config else {}
    values.update(parse_set_items(args.set or []))
    cfg = build_config(values)
    out = Path(args.out or "runs/empirical-audit")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose another --out")
    white_box = bool(getattr(args, "white_box", False))
    fraction = getattr(args, "guess_fraction", None)
    confidence = getattr(args, "confidence", None)
    confidence = CONFIDENCE if confidence is None else confidence
    as_json = bool(getattr(args, "json", False))
    if cfg.task == "causal-lm" and not white_box:  # a generative model: canary exposure
        from confide.empirical.canaries import main as canary_main

        return canary_main(args, cfg, out)
    if white_box and fraction is not None:
        raise ConfigError("--guess-fraction applies to the black-box audit; the white-box "
                          "audit's guesses follow from its sampling rate")
    canaries = getattr(args, "canaries", None)
    if canaries is None:
        canaries = WHITE_BOX_CANARIES if white_box else BLACK_BOX_CANARIES
    if canaries < 2:
        raise ConfigError(f"--canaries {canaries}; allowed: >= 2")
    _beta(confidence)
    console = Console(stderr=as_json)  # --json: stdout holds the JSON alone
    if white_box:
        result = run_white_box_audit(cfg, canaries=canaries, work_dir=out,
                                     confidence=confidence,
                                     partner=getattr(args, "canary_partner", 0) or 0)
    else:
        fraction = GUESS_FRACTION if fraction is None else fraction
        try:
            check_guess_fraction(fraction)
        except ValueError as exc:
            raise ConfigError(f"--guess-fraction: {exc}") from None
        guesses = guesses_for(canaries, fraction)
        # Before the run: what the audit can show at all (the target is the claim to be)
        console.print(capability_line(canaries, guesses, cfg.delta, confidence))
        if cfg.privacy_mode.example_dp and not cfg.noise_multiplier:
            cap = max_certifiable_epsilon(canaries, guesses, cfg.delta, 1.0 - confidence)
            if cfg.target_epsilon >= cap:
                console.print(f"The run targets epsilon {cfg.target_epsilon:g}: above what "
                              "this audit can certify, so it cannot refute that claim.")
        result = run_empirical_audit(cfg, canaries=canaries, work_dir=out,
                                     guess_fraction=fraction, confidence=confidence,
                                     console=console)
    if as_json:
        print(json.dumps(result.record(), indent=2))
    else:
        console.print(render(result))
        for line in verdict_lines(result):
            console.print(line)
    return 1 if result.refuted else 0
