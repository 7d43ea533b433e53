"""The server process really dies (`os._exit`, what `kill -9` leaves) at each
stage of a round, is resumed, and the run is checked against an uninterrupted one.

Each federation runs in a forked child (the in-process grid, no Ray: a run takes seconds),
with its partners' state on disk (`state_root`, as deployed partners keep it across server
restarts); the child is armed with `CONFIDE_CRASH_AT=stage:round[:entry type]`
(confide.server.faults). After the crash the same configuration is resumed in a new
child, and the run folder must show:
  - the ledger verifies (`verify_run(out).ok`);
  - metrics.jsonl has rounds exactly [1..R], and each round is completed once in the final
    attempt of the ledger (no round counted twice);
  - no record lost and nothing under-counted: every mechanism event a partner's own
    accountant recorded for this run is in the ledger, once; the partner's claimed epsilon
    in summary.json is its own accountant's epsilon for the run;
  - epsilon per partner equals the uninterrupted run's (same seed) when no partner trained
    in the lost part of the round; when partners did train before the death, that training
    was a real release (fresh noise from OS entropy, received by the server), so the
    resumed run's events are the uninterrupted run's plus that attempt's, and its epsilon is
    exactly the epsilon of those events (an equal epsilon would be an under-count).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft  # noqa: F401  (a run imports it lazily: once here, not in every child)
import pytest
import torch

import confide.encoding  # noqa: F401  (imported lazily by a run: once here, not in every child)
from confide.audit.verify import verify_run
from confide.clients.node_state import STATE_FILE, NodeState
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.privacy.accountant import PartnerAccountant, epsilon_of
from confide.privacy.ledger import (
    canonical_json,
    entry_hash_of,
    load_private_key,
    read_lines,
)
from confide.privacy.mechanisms import SampledGaussian
from confide.server.faults import CRASH_AT_ENV, CRASH_EXIT_CODE
from confide.server.federation import Federation
from tests.inprocess import InProcessGrid

ROUNDS = 2
NODES = 2
TINY = {"model": "tiny", "clients": NODES, "rounds": ROUNDS, "max-length": 16,
        "num-labels": 2, "noise-multiplier": 1.1, "batch-size": 16, "physical-batch-size": 16,
        "local-epochs": 0.04, "max-train-examples": 48, "max-eval-examples": 32,
        "preflight": "off", "seed": 11}

# stage:round[:detail] -> whether partners had trained in the lost part of the round
STAGES = {
    "after-replies:1": True,  # nothing checkpointed but the initial model (round 0)
    "before-sampling:2": False,
    "after-replies:2": True,  # replies in memory, none recorded
    "mid-aggregation:2": True,  # receipts recorded, aggregate not applied
    "mid-checkpoint:2": True,  # round not closed yet, checkpoint weights in a temp file
    "ledger-append:2:example_dp": True,  # a partner's signed receipt half written
    # the round's closing entry half written: its checkpoint (written just before, holding
    # that entry and the metrics row) is complete, so resume records the round from it and
    # never trains it again
    "ledger-append:2:round_completed": False,
}


def _federate(out: Path, nodes: Path, crash_at: str | None, resume: bool,
              values: dict[str, Any]) -> None:
    torch.set_num_threads(1)  # 2 shared cores: no oversubscription
    os.environ.pop(CRASH_AT_ENV, None)
    if crash_at:
        os.environ[CRASH_AT_ENV] = crash_at
    cfg = build_config({**values, "out": str(out), "resume": resume})
    try:
        Federation.open(InProcessGrid(cfg.clients, state_root=nodes), cfg, out).run()
    except Exception as exc:  # for the parent to read (the child exits 1)
        (out.parent / "error.txt").write_text(f"{type(exc).__name__}: {exc}")
        raise


def federate(out: Path, nodes: Path, crash_at: str | None = None, resume: bool = False,
             values: dict[str, Any] | None = None) -> int | None:
    """Run (or resume) the federation in a forked child; its exit status."""
    child = multiprocessing.get_context("fork").Process(
        target=_federate, args=(out, nodes, crash_at, resume, values or TINY))
    child.start()
    child.join(timeout=180)
    if child.is_alive():
        child.kill()
        child.join()
    return child.exitcode


@dataclass
class Run:
    out: Path
    nodes: Path

    def entries(self) -> list[dict[str, Any]]:
        return [line.entry for line in read_lines(self.out / "ledger.jsonl")
                if line.entry is not None]

    def run_key(self) -> str:
        return str(self.entries()[0]["payload"]["ledger_public_key"])

    def node_accountants(self) -> list[tuple[str, PartnerAccountant]]:
        """(pseudonym, the partner's own lifetime accountant), by node."""
        cfg = build_config(TINY)
        found = []
        for i in range(1, len(list(self.nodes.glob("node-*"))) + 1):
            state = NodeState.from_json((self.nodes / f"node-{i}" / STATE_FILE).read_text(),
                                        cfg.delta, cfg.max_epsilon)
            found.append((state.pseudonym, state.accountant))
        return found

    def node_events(self) -> list[tuple[str, list[tuple[float, float, int, int]]]]:
        """Each node's events of this run: (noise multiplier, sample rate, steps, round)."""
        key = self.run_key()
        return [(p, [(s.mechanism.noise_multiplier, s.mechanism.sample_rate,
                      s.mechanism.steps, s.round) for s in acc.history if s.run == key])
                for p, acc in self.node_accountants()]

    def ledger_events(self, partner: str) -> list[tuple[float, float, int, int]]:
        events = [E.ExampleDpEvent.from_payload(e["payload"]) for e in self.entries()
                  if e["type"] == E.EXAMPLE_DP]
        return [(e.noise_multiplier, e.sample_rate, e.steps, e.round) for e in events
                if e.partner == partner]

    def late_releases(self) -> list[tuple[str, int, int]]:
        """(partner, round trained, round recorded) of each release recorded late."""
        events = [E.ExampleDpEvent.from_payload(e["payload"]) for e in self.entries()
                  if e["type"] == E.EXAMPLE_DP]
        return [(e.partner, e.round, e.recorded_in_round) for e in events
                if e.recorded_in_round is not None]

    def claimed(self) -> dict[str, float]:
        return json.loads((self.out / "summary.json").read_text())["privacy"]["example_level"]

    def metrics_rounds(self) -> list[int]:
        return [json.loads(x)["round"] for x in
                (self.out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The uninterrupted run with the same seed, shared by every stage."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run = Run(root / "run", root / "nodes")
    assert federate(run.out, run.nodes) == 0
    assert verify_run(run.out).ok
    return run


def completed_rounds(entries: list[dict[str, Any]]) -> list[int]:
    """Rounds completed, the attempts a resume superseded left out: a run_resumed from
    round k discards the rounds after k completed before it."""
    done: list[int] = []
    for entry in entries:
        if entry["type"] == E.RUN_RESUMED:
            done = [r for r in done if r <= entry["payload"]["from_round"]]
        elif entry["type"] == E.ROUND_COMPLETED:
            done.append(entry["payload"]["round"])
    return done


@pytest.mark.parametrize("stage", list(STAGES))
def test_server_killed_at_each_stage_resumes_with_nothing_lost_or_counted_twice(
        stage: str, reference: Run, tmp_path: Path) -> None:
    run = Run(tmp_path / "run", tmp_path / "nodes")
    assert federate(run.out, run.nodes, crash_at=stage) == CRASH_EXIT_CODE, \
        "the armed crash point must kill the server process"
    assert not (run.out / "summary.json").exists()
    ledger = run.out / "ledger.jsonl"
    torn = ledger.read_bytes()[ledger.read_bytes().rfind(b"\n") + 1:]
    assert bool(torn) == stage.startswith("ledger-append"), "half an entry was written"
    if stage.startswith("mid-checkpoint"):  # the weights' temp file, never renamed
        assert (run.out / "checkpoint" / "global_round2.tmp").is_file()
        assert json.loads((run.out / "checkpoint" / "server_state.json").read_text())[
            "round"] == 1
    assert federate(run.out, run.nodes, resume=True) == 0, \
        (tmp_path / "error.txt").read_text()
    if torn:  # moved aside for the auditor, byte for byte; the chain continues without it
        [aside] = run.out.glob("ledger.jsonl.torn-*")
        assert aside.read_bytes() == torn

    result = verify_run(run.out)
    assert result.ok, [str(p) for p in result.problems]
    assert run.metrics_rounds() == list(range(1, ROUNDS + 1))
    entries = run.entries()
    assert completed_rounds(entries) == list(range(1, ROUNDS + 1)), "a round counted twice"
    assert [e["type"] for e in entries].count(E.RUN_RESUMED) == 1

    claimed = run.claimed()
    ref_claimed = reference.claimed()
    delta = build_config(TINY).delta
    for (partner, events), (ref_partner, ref_list) in zip(
            run.node_events(), reference.node_events(), strict=True):
        # no record lost, none invented: the partner's own record of this run is the ledger's
        assert sorted(run.ledger_events(partner)) == sorted(events), partner
        # the claim is what the partner's own accountant says of its events
        own = epsilon_of([SampledGaussian(s, q, k) for s, q, k, _ in events], delta)
        assert claimed[partner] == pytest.approx(own, rel=1e-9)
        rounds = sorted(r for *_, r in events)
        if not STAGES[stage]:
            assert rounds == list(range(1, ROUNDS + 1))
            assert sorted(events) == sorted(ref_list)
            assert claimed[partner] == pytest.approx(ref_claimed[ref_partner], rel=1e-9)
        else:
            # the round trained twice (the lost attempt and the resumed one): both released
            lost = int(stage.split(":")[1])
            assert rounds == sorted([*range(1, ROUNDS + 1), lost])
            assert claimed[partner] > ref_claimed[ref_partner] * (1 + 1e-6)
    # the node's lifetime accountant is never below what the run reports
    for partner, accountant in run.node_accountants():
        assert accountant.epsilon() >= claimed[partner] * (1 - 1e-9)
    assert not list((run.out / "checkpoint").glob("*.tmp")), "a stray temp file is left"
    if stage == "after-replies:2":
        a_receipt_recorded_twice_fails_the_audit(run, tmp_path)


def a_receipt_recorded_twice_fails_the_audit(run: Run, tmp_path: Path) -> None:
    """The audit accepts a partner's second example_dp in a round only in a re-run after
    run_resumed, and only when each is a distinct signed receipt (the lost attempt's and
    the new one): a server (it holds the ledger key) that records one receipt twice fails."""
    entries = run.entries()
    resumed = next(i for i, e in enumerate(entries) if e["type"] == E.RUN_RESUMED)
    later = [i for i, e in enumerate(entries) if i > resumed and e["type"] == E.EXAMPLE_DP]
    partner = entries[later[0]]["payload"]["partner"]
    lost, new = [i for i in later if entries[i]["payload"]["partner"] == partner]
    assert verify_run(run.out).ok
    entries[lost]["payload"] = json.loads(json.dumps(entries[new]["payload"]))
    key = load_private_key(run.out / "checkpoint" / "ledger_key.pem")
    prev = entries[lost - 1]["entry_hash"]
    for entry in entries[lost:]:  # re-chained and re-signed: only the audit can tell
        entry["prev_hash"] = prev
        entry["entry_hash"] = entry_hash_of(entry)
        entry["signature"] = key.sign(bytes.fromhex(entry["entry_hash"])).hex()
        prev = entry["entry_hash"]
    (run.out / "ledger.jsonl").write_bytes(b"".join(canonical_json(e) + b"\n"
                                                    for e in entries))
    problems = [str(p) for p in verify_run(run.out, pld=False).problems]
    assert f"[completeness] entry {new}: second example_dp of partner {partner} in round 2" \
        in problems, problems


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_torn_tail_never_covers_for_a_tampered_complete_entry(tmp_path: Path) -> None:
    """A torn last line is set aside on resume; an edited complete entry before it is not
    accepted: the resume is refused with a message, and nothing is written or moved."""
    run = Run(tmp_path / "run", tmp_path / "nodes")
    assert federate(run.out, run.nodes, crash_at="ledger-append:2:round_completed") \
        == CRASH_EXIT_CODE
    path = run.out / "ledger.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    assert not lines[-1].endswith(b"\n")
    at = next(i for i, line in enumerate(lines) if b'"type":"example_dp"' in line)
    entry = json.loads(lines[at])
    entry["payload"]["epsilon_claimed"] /= 2  # a smaller spend, re-encoded canonically
    lines[at] = canonical_json(entry) + b"\n"
    path.write_bytes(b"".join(lines))
    before = snapshot(run.out)
    assert federate(run.out, run.nodes, resume=True) == 1
    error = (tmp_path / "error.txt").read_text()
    assert error.startswith("ResumeRefused: cannot resume") and "is broken" in error
    assert f"entry {at}: entry_hash does not match" in error
    assert snapshot(run.out) == before, "a refused resume writes (and moves) nothing"


# Secure aggregation with shared noise, 4 partners, half of them per round: the resumed run
# sets up fresh keys and samples the crashed round's cohort again, which here (seed 2) is
# another cohort. A partner that trained in the lost attempt and is not asked again sends
# that receipt with its next reply of the run; the ledger must still hold every spend.
SECURE = {**TINY, "clients": 4, "rounds": 3, "secure-aggregation": True,
          "fraction-train": 0.5, "local-epochs": 1.0, "batch-size": 32,
          "physical-batch-size": 32, "seed": 2}


@pytest.mark.parametrize("stage", ["after-replies:2", "mid-aggregation:2"])
def test_secure_run_killed_mid_round_resumes_with_every_spend_recorded(
        stage: str, tmp_path: Path) -> None:
    run = Run(tmp_path / "run", tmp_path / "nodes")
    assert build_config(SECURE).example_dp_noise == "shared"
    assert federate(run.out, run.nodes, crash_at=stage, values=SECURE) == CRASH_EXIT_CODE
    assert federate(run.out, run.nodes, resume=True, values=SECURE) == 0, \
        (tmp_path / "error.txt").read_text()
    result = verify_run(run.out)
    assert result.ok, [str(p) for p in result.problems]
    assert run.metrics_rounds() == [1, 2, 3]
    claimed = run.claimed()
    for partner, events in run.node_events():
        assert run.ledger_events(partner) == events, partner  # same releases, same order
        if events:
            assert claimed[partner] > 0
    late = run.late_releases()
    if stage.startswith("after-replies"):
        # nothing of round 2 was recorded and its cohort changed: a lost attempt's spend
        # arrived in a later round
        assert late and all(trained == 2 and recorded > 2 for _, trained, recorded in late)
    else:  # the sum was unmasked after the receipts were recorded: nothing arrives late
        assert late == []
