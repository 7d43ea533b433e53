"""`confide audit empirical` for causal-LM runs: a canary exposure audit (Carlini et al.
2019, "The Secret Sharer"; the math is in `confide.audit.canary`).

1. Random secrets of one format ("my secret code is" -> "4 8 1 5 2 9") are drawn with a
   seeded generator: `canaries` per repeat count, plus `controls` that are never inserted.
2. The inserted ones go into ONE partner's training file (`partner`), each `repeats` times,
   at seeded random positions among its natural rows (a prompt,completion row: prefix ->
   secret). Every other partner's data and the evaluation file are unchanged.
3. One federated run (`confide simulate`, the configuration as given) trains on it.
4. The final model scores every secret and `candidates` random sequences of the same format
   (log-perplexity of the secret given the prefix), and each secret gets its exposure: by
   rank among the candidates, and extrapolated from a skew-normal fit to their scores.

Inserted canaries of a non-DP run are expected to stand far above the controls; under
example-level DP each repeat is one more record of the same secret (group privacy: r
repeats are protected at about r * epsilon), so few repeats should stay near the controls.

Secrets stay out of the shared run record: the run folder gets only numbers
(`canary_exposure.json`: which partner, how many repeats, scores, ranks, exposures; shown by
the report); the secret texts, the seed that regenerates them and the partner files that
hold them stay in the audit's own folder (`canary_secrets.json`, `data/`), next to it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from confide.audit.canary import (
    CONTROL,
    INSERTED,
    CanaryFormat,
    CanaryFormatError,
    Secret,
    candidate_pool,
    extrapolated_exposures,
    rank_exposures,
    sample_secrets,
    summary_note,
    summary_rows,
)
from confide.config import ConfigError, RunConfig
from confide.errors import ConfideError
from confide.run_layout import (
    CANARY_EXPOSURE_FILE,
    METRICS_FILE,
    atomic_write_bytes,
    atomic_write_text,
)

if TYPE_CHECKING:
    import torch

SECRETS_FILE = "canary_secrets.json"  # in the audit folder: the secret texts and the seed


class CanaryAuditError(ConfideError, ValueError):
    """The audited run cannot be measured (e.g. it trained nothing)."""


@dataclass(frozen=True)
class CanarySettings:
    """What the audit inserts and how it measures."""

    canaries: int = 5  # secrets per repeat count
    repeats: tuple[int, ...] = (1, 10)
    controls: int = 20
    candidates: int = 2000
    partner: int = 0
    format: CanaryFormat = field(default_factory=CanaryFormat)
    family: str = "skewnorm"

    def check(self, clients: int) -> None:
        if self.canaries < 1:
            raise ConfigError(f"canaries = {self.canaries}; allowed: >= 1 per repeat count")
        if not self.repeats or min(self.repeats) < 1:
            raise ConfigError(f"repeats = {','.join(map(str, self.repeats))}; allowed: "
                              "one or more integers >= 1")
        if self.controls < 1:
            raise ConfigError(f"controls = {self.controls}; allowed: >= 1 (the exposure of "
                              "never-inserted secrets is what inserted ones are compared to)")
        if self.candidates < 10:
            raise ConfigError(f"candidates = {self.candidates}; allowed: >= 10")
        if not 0 <= self.partner < clients:
            raise ConfigError(f"canary partner = {self.partner}; allowed: 0..{clients - 1} "
                              f"(clients = {clients})")


@dataclass
class SecretExposure:
    kind: str  # inserted | control
    repeats: int  # 0 for controls
    log_perplexity_bits: float
    rank: int
    rank_exposure: float
    extrapolated_exposure: float


@dataclass
class CanaryAuditResult:
    run_dir: str
    partner: int
    format: str
    space_bits: float
    candidates: int
    exhaustive: bool
    family: str
    example_dp: bool
    claimed_epsilon: float | None
    delta: float
    secrets: list[SecretExposure]

    @property
    def max_rank_exposure(self) -> float:
        """log2(candidates + 1): what the rank estimate can show at most."""
        return math.log2(self.candidates + 1)

    def groups(self) -> list[tuple[str, int, list[SecretExposure]]]:
        """(kind, repeats, secrets): inserted per repeat count (ascending), then controls."""
        counts = sorted({s.repeats for s in self.secrets if s.kind == INSERTED})
        out = [(INSERTED, r, [s for s in self.secrets if s.kind == INSERTED and s.repeats == r])
               for r in counts]
        return [*out, (CONTROL, 0, [s for s in self.secrets if s.kind == CONTROL])]

# -- insertion ------------------------------------------------------------------------------

def insert_rows(data: Any, rows: Sequence[tuple[str, str]], repeats: Sequence[int],
                rng: np.random.Generator) -> Any:
    """A copy of a partner's PromptDataset with each (prompt, completion) of `rows` added
    `repeats[i]` times at seeded random positions; its own rows keep their order."""
    from confide.tasks.causal_lm import PromptDataset

    if not isinstance(data, PromptDataset):
        raise TypeError("canaries go into prompt,completion data (task = 'causal-lm')")
    extra = [row for row, r in zip(rows, repeats, strict=True) for _ in range(r)]
    extra = [extra[int(i)] for i in rng.permutation(len(extra))]
    total = len(data) + len(extra)
    at = set(rng.choice(total, size=len(extra), replace=False).tolist())
    own = iter(zip(data.texts, data.completions, strict=True))
    ins = iter(extra)
    merged = [next(ins) if i in at else next(own) for i in range(total)]
    return PromptDataset(texts=[p for p, _ in merged],
                         labels=np.zeros(total, dtype=np.int64),
                         source=f"{data.source} + {len(extra)} canary rows",
                         completions=[c for _, c in merged])


def write_prompt_csv(path: Path, data: Any, prompt_column: str, completion_column: str
                     ) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([prompt_column, completion_column])
        w.writerows(zip(data.texts, data.completions, strict=True))


# -- scoring --------------------------------------------------------------------------------

def log_perplexities(model: torch.nn.Module, tokenizer: Any, prefix: str,
                     completions: Sequence[str], *, max_length: int, batch_size: int = 256,
                     device: torch.device | str = "cpu") -> np.ndarray:
    """-log2 Pr(completion + end of sequence | prefix) under the model, in bits, exactly as
    the training rows are encoded (prompt, newline, completion, EOS)."""
    import torch

    from confide.tasks.causal_lm import CAUSAL_LM_OBJECTIVE, encode_prompt_completion, token_nll

    model.eval()
    model.to(device)
    out = []
    with torch.no_grad():
        for s in range(0, len(completions), batch_size):
            chunk = list(completions[s:s + batch_size])
            enc = encode_prompt_completion([prefix] * len(chunk), chunk, tokenizer,
                                           max_length)
            logits = CAUSAL_LM_OBJECTIVE.forward(model, enc["input_ids"].to(device),
                                                 enc["attention_mask"].to(device))
            total, _ = token_nll(logits, enc["labels"].to(device))
            out.append(total.double().cpu().numpy() / math.log(2.0))
    return np.concatenate(out) if out else np.zeros(0)


# -- the audit ------------------------------------------------------------------------------

def check_trained(run_dir: Path) -> None:
    """Refuse to measure a run in which no round aggregated an update (every partner failed
    or refused): its final model is the initial one, and low exposure would look like
    privacy."""
    path = run_dir / METRICS_FILE
    rows = path.read_text().splitlines() if path.is_file() else []
    if not any(json.loads(x).get("num_clients_aggregated", 0) for x in rows if x.strip()):
        raise CanaryAuditError(f"{run_dir}: no round aggregated any partner's update (see "
                               "the run's log), so the final model is the initial one and "
                               "its exposure would mean nothing")


@dataclass(frozen=True)
class _DrawnSecrets:
    """The audit's secrets (inserted ones first, then controls) and the candidates they are
    ranked among, all drawn from one seeded generator."""

    seed: int
    inserted: list[Secret]
    controls: list[Secret]
    repeats: list[int]  # per inserted secret
    candidates: list[Secret]
    exhaustive: bool

    @property
    def all(self) -> list[Secret]:
        return [*self.inserted, *self.controls]

    def record(self, fmt: CanaryFormat) -> list[dict[str, Any]]:
        """The secret texts as the audit folder keeps them (never the run folder)."""
        return ([{"kind": INSERTED, "repeats": r, "prompt": fmt.prefix,
                  "completion": fmt.text(s)}
                 for s, r in zip(self.inserted, self.repeats, strict=True)]
                + [{"kind": CONTROL, "repeats": 0, "prompt": fmt.prefix,
                    "completion": fmt.text(s)} for s in self.controls])


def _draw_secrets(settings: CanarySettings, seed: int, rng: np.random.Generator
                  ) -> _DrawnSecrets:
    fmt = settings.format
    n_inserted = settings.canaries * len(settings.repeats)
    drawn = sample_secrets(fmt, n_inserted + settings.controls, rng)
    candidates, exhaustive = candidate_pool(fmt, settings.candidates, rng, exclude=drawn)
    return _DrawnSecrets(seed=seed, inserted=drawn[:n_inserted], controls=drawn[n_inserted:],
                         repeats=[r for r in settings.repeats for _ in range(settings.canaries)],
                         candidates=candidates, exhaustive=exhaustive)


def _write_audit_data(cfg: RunConfig, settings: CanarySettings, drawn: _DrawnSecrets,
                      rng: np.random.Generator, work_dir: Path) -> tuple[Path, Path]:
    """The partner files (the audited partner's with the inserted secrets), the evaluation
    file and the secret record, under `work_dir`; returns (partner folder, eval file)."""
    from confide.tasks.inputs import federated_data

    fmt = settings.format
    fed = federated_data(cfg)
    work_dir.mkdir(parents=True, exist_ok=True)
    partners = work_dir / "data" / "partners"
    for i, part in enumerate(fed.partitions):
        if i == settings.partner:
            part = insert_rows(part, [(fmt.prefix, fmt.text(s)) for s in drawn.inserted],
                               drawn.repeats, rng)
        write_prompt_csv(partners / f"partner{i:03d}.csv", part, cfg.prompt_column,
                         cfg.completion_column)
    eval_path = work_dir / "data" / "eval.csv"
    write_prompt_csv(eval_path, fed.evaluation, cfg.prompt_column, cfg.completion_column)
    secret_record = {
        "seed": drawn.seed, "partner": settings.partner,
        "partner_file": str(partners / f"partner{settings.partner:03d}.csv"),
        "format": fmt.describe(), "secrets": drawn.record(fmt)}
    atomic_write_text(work_dir / SECRETS_FILE, json.dumps(secret_record, indent=2))
    return partners, eval_path


def _measure_exposures(cfg: RunConfig, run_dir: str | Path, settings: CanarySettings,
                       drawn: _DrawnSecrets) -> list[SecretExposure]:
    """Score every secret and candidate under the run's final model: each secret's rank
    among the candidates and its exposure, by rank and extrapolated."""
    import torch

    from confide.tasks import get_task
    from confide.tasks.use import load_trained_model

    fmt = settings.format
    model = load_trained_model(run_dir)
    device = torch.device("cuda" if cfg.device.startswith("cuda")
                          or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    tok = get_task(cfg).tokenizer()
    secret_scores = log_perplexities(model, tok, fmt.prefix,
                                     [fmt.text(s) for s in drawn.all],
                                     max_length=cfg.max_length, device=device)
    cand_scores = log_perplexities(model, tok, fmt.prefix,
                                   [fmt.text(s) for s in drawn.candidates],
                                   max_length=cfg.max_length, device=device)
    by_rank = rank_exposures(secret_scores, cand_scores)
    extrapolated = extrapolated_exposures(secret_scores, cand_scores, family=settings.family,
                                          space_bits=fmt.space_bits)
    ranks = 1 + np.searchsorted(np.sort(cand_scores), secret_scores, side="right")
    n_inserted = len(drawn.inserted)
    return [SecretExposure(kind=INSERTED if i < n_inserted else CONTROL,
                           repeats=drawn.repeats[i] if i < n_inserted else 0,
                           log_perplexity_bits=float(secret_scores[i]), rank=int(ranks[i]),
                           rank_exposure=float(by_rank[i]),
                           extrapolated_exposure=float(extrapolated[i]))
            for i in range(len(drawn.all))]


def run_canary_audit(cfg: RunConfig, settings: CanarySettings, *, work_dir: Path,
                     seed: int | None = None, console: Console | None = None
                     ) -> CanaryAuditResult:
    """Insert, train (one federated run, `confide simulate`), measure; writes the run
    folder under `work_dir/run`, the audit's secret record and the partner files under
    `work_dir`."""
    from confide.audit.report import write_report
    from confide.simulation.runner import simulate
    from confide.tasks import CAUSAL_LM

    if cfg.task != CAUSAL_LM:
        raise ConfigError(f"the canary exposure audit needs task = 'causal-lm' (got "
                          f"{cfg.task!r})")
    settings.check(cfg.clients)
    seed = secrets.randbits(63) if seed is None else seed  # the secrets' seed is secret too
    rng = np.random.default_rng(seed)
    drawn = _draw_secrets(settings, seed, rng)
    partners, eval_path = _write_audit_data(cfg, settings, drawn, rng, work_dir)

    run_cfg = cfg.replace(data=str(partners), eval_data=str(eval_path), max_train_examples=0,
                          max_eval_examples=0, out=str(work_dir / "run"))
    run_dir, summary = simulate(run_cfg, console=console)
    check_trained(Path(run_dir))
    rows = _measure_exposures(cfg, run_dir, settings, drawn)
    eps = summary["privacy"]["example_level"]
    fmt = settings.format
    result = CanaryAuditResult(
        run_dir=str(run_dir), partner=settings.partner, format=fmt.describe(),
        space_bits=fmt.space_bits, candidates=len(drawn.candidates),
        exhaustive=drawn.exhaustive, family=settings.family,
        example_dp=cfg.privacy_mode.example_dp,
        claimed_epsilon=max(eps.values()) if eps and cfg.privacy_mode.example_dp else None,
        delta=cfg.delta, secrets=rows)
    atomic_write_bytes(Path(run_dir) / CANARY_EXPOSURE_FILE,
                       json.dumps(asdict(result), indent=2).encode())
    write_report(run_dir)  # report.html / report.md now show the exposure section
    return result


# -- output ---------------------------------------------------------------------------------

SUMMARY_HEADER = ["secrets", "n", "mean exposure (rank)", "median (rank)",
                  "mean exposure (extrapolated)", "max (extrapolated)"]


def render(result: CanaryAuditResult) -> Table:
    record = asdict(result)
    table = Table(title="Canary exposure audit (Carlini et al. 2019, 'The Secret Sharer')")
    for name in SUMMARY_HEADER:
        table.add_column(name, justify="right")
    for row in summary_rows(record):
        table.add_row(*row)
    table.caption = f"{summary_note(record)} Run folder {result.run_dir}."
    return table


def settings_from_args(args: argparse.Namespace) -> CanarySettings:
    """The CLI's canary flags (confide audit empirical) as settings; bad values are
    ConfigErrors that name the flag."""
    try:
        repeats = tuple(int(v) for v in str(args.repeats).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--repeats {args.repeats!r}: give integers >= 1, comma-separated "
                          "(e.g. 1,10)") from None
    try:
        fmt = CanaryFormat(prefix=args.canary_prefix, slots=args.canary_slots,
                           alphabet=tuple(args.canary_alphabet))
    except CanaryFormatError as exc:
        raise ConfigError(f"canary format: {exc}") from None
    return CanarySettings(canaries=args.canaries if args.canaries is not None else 5,
                          repeats=repeats, controls=args.controls,
                          candidates=args.candidates, partner=args.canary_partner,
                          format=fmt)


def main(args: argparse.Namespace, cfg: RunConfig, out: Path) -> int:
    settings = settings_from_args(args)
    console = Console()
    result = run_canary_audit(cfg, settings, work_dir=out, seed=args.audit_seed,
                              console=console)
    console.print(render(result))
    console.print(f"Secret texts and seed: {out / SECRETS_FILE} (keep them out of the shared "
                  "record)")
    return 0
