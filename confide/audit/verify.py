"""`confide audit verify RUN_DIR`: check a run's privacy ledger on its own.

Checks, in order (each PASS / FAIL / SKIP, each failure naming the ledger entry); each is
an independent function of the loaded run in `confide.audit.checks`:
  chain         every line canonical, indices 0..n-1, prev_hash links, entry hashes, Ed25519
                signatures by the key in run_started (pinned by ledger_public_key.pem when
                the run folder has one, or by `public_key=`)
  payloads      every payload has the fields and types of its entry type
  ordering      run_started first, run_finished last, rounds in order (a round may only be
                re-run after run_resumed)
  completeness  every round 1..rounds_completed has round_configured, one model_digest,
                round_completed, an example_dp or budget_refusal for every partner that
                replied, client_dp / secure_aggregation when the config enables them; the
                ledger is not cut short (run_finished present when summary.json is)
  receipts      every example_dp carries the partner's receipt, validly signed by the key
                whose pseudonym is the partner, with the same numbers as the ledger
  replay        every claimed epsilon recomputed independently from the ledger's events
                agrees (1 %): PLD claims by Opacus' PRV accountant (and never below its
                certified lower bound), RDP claims by dp-accounting's RDP
  summary       summary.json equals the replay and the ledger (1 % on epsilons)
  metrics       metrics.jsonl equals the replay and the ledger, round by round (1 %)
  model         the last model_digest equals SHA-256 of model/weights.safetensors
  partners      every spend the partners' own node states (simulation: partners/*/
                node_state.json) record for this run is in the ledger, unless the node
                still holds its receipt as unacknowledged: a ledger cut back at a round
                boundary fails here
  checkpoint    checkpoint/server_state.json is of this run and of a round the ledger
                completes (or of the next one, whose model_digest it holds), with the
                weights the ledger recorded
A finished run (run_finished in the ledger) must have summary.json, model/ and metrics.

`verdict` combines their results into one of three outcomes:
  PASS        no check found a problem and the ledger reaches run_finished (exit 0)
  INCOMPLETE  no check found a problem, but the ledger ends before run_finished: a valid
              record of a run that stopped (interrupted, crashed, no budget left) or of a
              ledger cut short; nothing in it can be read as the whole run (exit 3)
  FAIL        a check found a contradiction (exit 1)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confide.audit.checks.base import CheckResult
from confide.audit.checks.claims import check_receipts, check_replay
from confide.audit.checks.completeness import check_completeness
from confide.audit.checks.cross_run import NAME as CROSS_RUN_CHECK
from confide.audit.checks.cross_run import check_earlier_runs
from confide.audit.checks.integrity import check_chain, check_ordering, check_payloads
from confide.audit.checks.loaded_run import LoadedRun, load_run
from confide.audit.checks.outputs import check_metrics, check_model, check_summary
from confide.audit.checks.records import check_checkpoint, check_partner_records
from confide.config import recorded_value
from confide.logs import plural
from confide.privacy import ledger_events as ev
from confide.privacy.ledger import (
    LedgerError,
    Problem,
    as_public_key,
    load_public_key,
)
from confide.privacy.replay import ClientReplay, PartnerReplay

# the words the final statements share (re-exported: the report imports them here)
from confide.privacy.statements import LARGE_DELTA_NOTE, over_target_text
from confide.run_layout import LEDGER_FILE, LEDGER_PUBLIC_KEY_FILE

Check = Callable[[LoadedRun], CheckResult]
# In the verdict's order: integrity before meaning (the first problem is taken from the
# first check that names entries).
CHECKS: dict[str, Check] = {
    "chain": check_chain, "payloads": check_payloads, "ordering": check_ordering,
    "completeness": check_completeness, "receipts": check_receipts, "replay": check_replay,
    "summary": check_summary, "metrics": check_metrics, "model": check_model,
    "partners": check_partner_records, "checkpoint": check_checkpoint,
}
PASS, INCOMPLETE, FAIL = "PASS", "INCOMPLETE", "FAIL"
EXIT_STATUS = {PASS: 0, FAIL: 1, INCOMPLETE: 3}  # 2: nothing to check (a usage error)
NOT_A_RUN = "is not a Confide run folder"


@dataclass
class VerifyResult:
    run_dir: Path
    checks: list[CheckResult]
    entries: list[dict[str, Any] | None]
    example_level: dict[str, PartnerReplay] = field(default_factory=dict)
    client_level: ClientReplay | None = None
    claimed_example: dict[str, float] = field(default_factory=dict)  # final, from ledger
    rounds_completed: int = 0
    finished: bool = False  # the ledger records run_finished
    planned_rounds: int | None = None  # rounds run_started's configuration asked for
    delta: float | None = None
    # the run was started with allow-large-delta: its delta may be >= 1/(rows of the
    # smallest partner), a guarantee one published record could meet; said wherever the
    # guarantee is stated
    large_delta: bool = False
    # the run's target-epsilon (run_started), where its noise was calibrated to reach it
    target_epsilon: float | None = None

    @property
    def ok(self) -> bool:
        """No check found a contradiction (the verdict is PASS or INCOMPLETE)."""
        return all(not c.problems for c in self.checks)

    @property
    def verdict(self) -> str:
        """PASS (a finished run, every check passes), INCOMPLETE (every check passes, the
        ledger ends before run_finished) or FAIL."""
        if not self.ok:
            return FAIL
        return PASS if self.finished else INCOMPLETE

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.verdict]

    @property
    def problems(self) -> list[Problem]:
        return [p for c in self.checks for p in c.problems]

    @property
    def first_problem(self) -> Problem | None:
        """The first bad entry: the lowest ledger index among the problems of the first
        check (in CHECKS order: integrity before meaning) that names entries, else the first
        problem. An edited entry breaks the chain at that entry; the semantic checks may
        then also flag an earlier, intact entry that no longer agrees with it."""
        for check in self.checks:
            indexed = [p for p in check.problems if p.index is not None]
            if indexed:
                return min(indexed, key=lambda p: p.index)  # type: ignore[arg-type,return-value]  # index is not None here
        probs = self.problems
        return probs[0] if probs else None

    @property
    def first_bad_index(self) -> int | None:
        first = self.first_problem
        return first.index if first else None

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_problem
        return {
            "ok": self.ok, "verdict": self.verdict, "finished": self.finished,
            "rounds_completed": self.rounds_completed, "planned_rounds": self.planned_rounds,
            "allow_large_delta": self.large_delta,
            "run_dir": str(self.run_dir),
            "first_bad_entry": None if first is None else first.index,
            "first_problem": None if first is None else str(first),
            "checks": {c.name: {"status": c.status, "detail": c.detail,
                                "problems": [str(p) for p in c.problems]}
                       for c in self.checks},
            "epsilon_example_level": {
                p: {"claimed": self.claimed_example.get(p), "replay": r.final,
                    "replay_method": r.method, "replay_rdp": r.final_rdp,
                    "replay_pld": r.pld_epsilon}
                for p, r in sorted(self.example_level.items())},
            "epsilon_client_level": None if self.client_level is None
            else self.client_level.final,
        }


def run_checks(run: LoadedRun) -> list[CheckResult]:
    """Every check of CHECKS on the loaded run, in order. Without a ledger only the chain
    check has something to say (that it is missing); the others report nothing."""
    if not run.ledger_found:
        return [check_chain(run), *(CheckResult(name) for name in CHECKS if name != "chain")]
    return [check(run) for check in CHECKS.values()]


def verdict(run: LoadedRun, results: Sequence[CheckResult]) -> VerifyResult:
    """The checks' results combined with what the ledger states: the replayed and the
    claimed final epsilons and the rounds completed."""
    claimed: dict[str, float] = {}  # each partner's last claim in the ledger
    for _, e in run.events:
        if isinstance(e, ev.ExampleDpEvent):
            claimed[e.partner] = e.epsilon_claimed
    large = bool(recorded_value(run.config, "allow-large-delta")) if run.config else False
    # a target only where the noise was calibrated to it (noise-multiplier 0) under DP
    target = _number(recorded_value(run.config, "target-epsilon")) if run.config and \
        recorded_value(run.config, "noise-multiplier") == 0 and \
        recorded_value(run.config, "example-dp") else None
    return VerifyResult(run.run_dir, list(results), [line.entry for line in run.lines],
                        run.replay.example, run.replay.client, claimed,
                        run.rounds.rounds_completed, run.finished, run.planned_rounds,
                        run.delta, large, target)


def verify_run(run_dir: Path | str, public_key: Any = None, *, pld: bool = True,
               earlier: Sequence[Path | str] = ()) -> VerifyResult:
    """Verify a run folder. `public_key` (key object, raw bytes or hex) pins the ledger key
    instead of ledger_public_key.pem; `pld=False` skips the PLD second opinion (faster).
    `earlier`: folders of earlier runs on the same partners' data; the partners' signed
    budget refusals are then also compared with those runs' ledgers (check earlier-runs)."""
    run = load_run(run_dir, public_key, pld=pld)
    results = run_checks(run)
    if earlier:  # only then: a single-run audit has no row for it
        results.append(check_earlier_runs(run, tuple(load_run(d, pld=False)
                                                      for d in earlier))
                       if run.ledger_found else CheckResult(CROSS_RUN_CHECK, skipped=True))
    return verdict(run, results)


def render_verdict(result: VerifyResult) -> str:
    """Plain-text verdict table: check -> PASS/FAIL/SKIP, then epsilons, then the verdict."""
    rows = [("check", "result", "detail / first problem")]
    for ch in result.checks:
        text = str(ch.problems[0]) if ch.problems else ch.detail
        more = f" (+{len(ch.problems) - 1} more)" if len(ch.problems) > 1 else ""
        rows.append((ch.name, ch.status, text + more))
    w0 = max(len(r[0]) for r in rows)
    out = [f"Confide audit of {result.run_dir}", ""]
    for name, status, text in rows:
        out.append(f"  {name:<{w0}}  {status:<6}  {text}")
    if result.example_level:
        delta = delta_statement(result.delta, result.large_delta)
        out += ["", f"  example-level epsilon (final, {delta}; "
                "'replay' is the independent check of the claim: PRV for PLD claims, RDP for "
                "RDP claims):",
                f"  {'partner':<16}  {'claimed':>10}  {'replay':>12}  {'PLD':>10}  "
                f"{'RDP':>10}"]
        for p, rep in sorted(result.example_level.items()):
            claimed = result.claimed_example.get(p)
            pld_eps = "-" if rep.pld_epsilon is None else f"{rep.pld_epsilon:.4f}"
            replay = f"{rep.final:.4f} {rep.method}"
            out.append(f"  {p:<16}  {_fmt(claimed):>10}  {replay:>12}  {pld_eps:>10}  "
                       f"{rep.final_rdp:>10.4f}")
    if result.client_level is not None and result.client_level.final is not None:
        out.append(f"  client-level epsilon (replay): {result.client_level.final:.4f}")
    over = over_target({p: r.final for p, r in result.example_level.items()},
                       result.target_epsilon)
    if over and result.target_epsilon is not None:
        out += ["", f"  {over_target_text(over, result.target_epsilon)}"]
    out.append("")
    first = result.first_problem
    if first is None and result.finished:
        out.append(f"VERDICT: PASS ({plural(result.rounds_completed, 'round')}, "
                   f"{len(result.entries)} ledger entries)")
    elif first is None:
        of = (f"{result.rounds_completed} of {result.planned_rounds} rounds"
              if result.planned_rounds else plural(result.rounds_completed, "round"))
        out.append(f"VERDICT: INCOMPLETE ({of} recorded, "
                   f"{len(result.entries)} ledger entries, no run_finished): the record "
                   "is consistent as far as it goes, but the run stopped (interrupted, "
                   "crashed, no budget left) or its ledger was cut short; it is not the "
                   "record of a finished run")
    else:
        where = f"first bad entry {first.index}" if first.index is not None else "first problem"
        out.append(f"VERDICT: FAIL, {where}: [{first.check}] {first.reason}")
    return "\n".join(out)


def delta_statement(delta: float | None, large_delta: bool) -> str:
    """How a guarantee line states delta: the ledger's value and, for a run started with
    allow-large-delta, that it was allowed at or above 1/(rows of the smallest partner)."""
    text = f"delta = {delta:g} from the ledger" if delta is not None else "delta from the ledger"
    return text + (f" ({LARGE_DELTA_NOTE})" if large_delta else "")


def over_target(epsilons: dict[str, float], target: float | None) -> dict[str, float]:
    """The partners whose epsilon for the run is above its target-epsilon: the noise was
    calibrated to reach the target in the planned rounds, so more releases were recorded
    than planned (e.g. a round trained again after a resume)."""
    if target is None:
        return {}
    return {p: e for p, e in sorted(epsilons.items()) if e > target * (1 + 1e-9)}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def read_public_key(path: Path) -> Any:
    """An Ed25519 public key from a PEM file or from a file holding its 64 hex digits."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return load_public_key(path)
    text = data.decode("ascii", errors="replace").strip()
    if len(text) != 64:
        raise ValueError("not a PEM public key, nor 64 hex digits of an Ed25519 key")
    return as_public_key(text)  # ValueError on a non-hex digit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `confide audit verify` (this module's main and the confide CLI)."""
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--public-key", type=Path, default=None, metavar="FILE",
                        help="the server's ledger key, obtained out of band (PEM, or its 64 "
                             "hex digits): every ledger signature must verify with it "
                             f"(default: RUN_DIR/{LEDGER_PUBLIC_KEY_FILE} if present)")
    parser.add_argument("--earlier-run", type=Path, action="append", default=[],
                        metavar="DIR",
                        help="the folder of an earlier run on the same partners' data "
                             "(repeatable): each partner's signed budget refusal, which "
                             "states its lifetime spend, is also compared with that run's "
                             "ledger")
    parser.add_argument("--json", action="store_true",
                        help="print the result (verdict, checks, epsilons) as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 on PASS, 1 on FAIL, 3 on INCOMPLETE, 2 when there is nothing to check."""
    parser = argparse.ArgumentParser(prog="confide audit verify",
                                     description="Verify a run's privacy ledger.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """`confide audit verify` with parsed options (see add_arguments)."""
    problem = not_a_run(args.run_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    key = None
    if args.public_key is not None:
        try:
            key = read_public_key(args.public_key)
        except (OSError, ValueError, LedgerError) as exc:
            print(f"error: --public-key {args.public_key}: {exc}", file=sys.stderr)
            return 2
    for earlier in args.earlier_run:
        if problem := not_a_run(earlier):
            print(f"error: --earlier-run {problem}", file=sys.stderr)
            return 2
    result = verify_run(args.run_dir, key, earlier=args.earlier_run)
    print(json.dumps(result.to_dict(), indent=2) if args.json else render_verdict(result))
    return result.exit_status


def not_a_run(path: Path) -> str | None:
    """Why `path` cannot be audited (missing, or not a run folder), else None."""
    if not path.exists():
        return f"{path} is missing (no such folder)"
    if not path.is_dir():
        return f"{path} {NOT_A_RUN}: it is a file, not a folder"
    if not (path / LEDGER_FILE).is_file():
        return f"{path} {NOT_A_RUN} (it has no {LEDGER_FILE})"
    return None


if __name__ == "__main__":
    sys.exit(main())
