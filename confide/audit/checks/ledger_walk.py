"""What several checks need from the ledger, derived from its lines alone: the typed events,
the rounds they form, and the independent replay of every claimed epsilon.

Pure functions of the ledger: `LoadedRun` computes each once and caches it, so that the
checks share them without depending on one another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from confide.privacy import ledger_events as ev
from confide.privacy.ledger import LedgerLine
from confide.privacy.replay import (
    ClientReplay,
    PartnerReplay,
    UnknownMechanism,
    replay_client_level,
    replay_example_level,
)

# (ledger index, typed event) in ledger order
IndexedEvent = tuple[int, ev.LedgerEvent]


@dataclass(frozen=True)
class ParsedEvents:
    """The entries whose payload has the fields and types of their type, typed; and why
    each other entry with a type is not."""

    events: tuple[IndexedEvent, ...]
    errors: tuple[tuple[int, str], ...]  # (ledger index, what is wrong with the payload)


def parse_events(lines: Sequence[LedgerLine]) -> ParsedEvents:
    events: list[IndexedEvent] = []
    errors: list[tuple[int, str]] = []
    for line in lines:
        entry = line.entry
        if entry is None or not isinstance(entry.get("type"), str):
            continue  # not a well-formed entry: the chain check names it
        try:
            payload = entry.get("payload")  # None is a PayloadError too
            event = ev.parse_payload(entry["type"], payload)  # type: ignore[arg-type]  # above
        except ev.PayloadError as exc:
            errors.append((line.position, str(exc)))
            continue
        events.append((line.position, event))
    return ParsedEvents(tuple(events), tuple(errors))


# -- rounds -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundAttempt:
    """The entries of one round between its round_configured and round_completed."""

    round: int
    configured_at: int
    entries: tuple[IndexedEvent, ...]
    completed_at: int | None  # None: the attempt never completed


@dataclass
class _OpenAttempt:  # a RoundAttempt while the walk is still inside it
    round: int
    configured_at: int
    entries: list[IndexedEvent] = field(default_factory=list)
    completed_at: int | None = None


@dataclass(frozen=True)
class RoundWalk:
    """The rounds of the ledger, walked in order: each round's final attempt, how many
    rounds completed, and every entry that breaks the order (index, reason)."""

    attempts: dict[int, RoundAttempt]  # round -> its final attempt
    rounds_completed: int
    out_of_order: tuple[tuple[str, int], ...]  # (reason, ledger index)

    def completed(self, r: int) -> ev.RoundCompleted | None:
        """Round r's round_completed in its final attempt (None if it has none)."""
        att = self.attempts.get(r)
        if att is None or att.completed_at is None:
            return None
        return next((e for i, e in att.entries if i == att.completed_at
                     and isinstance(e, ev.RoundCompleted)), None)


def walk_rounds(events: Sequence[IndexedEvent], n_lines: int) -> RoundWalk:
    """run_finished last, a round configured only after the previous one completed, every
    round event inside its open round, only run_resumed after run_interrupted (a round may
    be re-run after run_resumed: its last attempt counts)."""
    problems: list[tuple[str, int]] = []
    attempts: dict[int, _OpenAttempt] = {}
    last_completed = 0
    current: _OpenAttempt | None = None
    interrupted_at: int | None = None  # only run_resumed may follow run_interrupted
    for i, e in events:
        if interrupted_at is not None and not isinstance(e, ev.RunResumed):
            problems.append((f"{e.TYPE} after run_interrupted (entry {interrupted_at}) "
                             "without run_resumed", i))
            interrupted_at = None
        if isinstance(e, ev.RunStarted):
            if i != 0:
                problems.append(("run_started again in the middle of the ledger", i))
        elif isinstance(e, ev.RunFinished):
            if i != n_lines - 1:
                problems.append(("run_finished is not the last entry", i + 1))
            if current is not None and current.completed_at is None:
                problems.append((f"run finished inside round {current.round}", i))
        elif isinstance(e, ev.RunInterrupted):
            # a stop at a safe point: no round open, and the checkpoint is that round's
            if current is not None and current.completed_at is None:
                problems.append((f"run interrupted inside round {current.round}", i))
            if e.after_round != last_completed:
                problems.append((f"run interrupted after round {e.after_round}, but "
                                 f"{last_completed} rounds were completed", i))
            interrupted_at = i
        elif isinstance(e, ev.RunResumed):
            interrupted_at = None
            if e.from_round > last_completed:
                problems.append((f"resumed from round {e.from_round}, but only "
                                 f"{last_completed} rounds were completed", i))
            last_completed = min(last_completed, e.from_round)
            current = None
        elif isinstance(e, ev.RoundConfigured):
            if current is not None and current.completed_at is None:
                problems.append((f"round {e.round} configured before round {current.round} "
                                 "completed (and no run_resumed in between)", i))
            if e.round != last_completed + 1:
                problems.append((f"round {e.round} configured, expected round "
                                 f"{last_completed + 1}", i))
            current = _OpenAttempt(e.round, i)
            attempts[e.round] = current
        else:
            r = ev.round_of(e)
            if current is None or r != current.round or current.completed_at is not None:
                where = "no round is open" if current is None or current.completed_at \
                    is not None else f"round {current.round} is open"
                problems.append((f"{e.TYPE} of round {r} out of order ({where})", i))
                continue
            current.entries.append((i, e))
            if isinstance(e, ev.RoundCompleted):
                current.completed_at = i
                last_completed = e.round
    return RoundWalk({r: RoundAttempt(a.round, a.configured_at, tuple(a.entries),
                                      a.completed_at) for r, a in attempts.items()},
                     last_completed, tuple(problems))


# -- the independent replay -------------------------------------------------------------
@dataclass(frozen=True)
class ReplayPoint:
    """An example_dp event's partner's cumulative epsilon after it, replayed."""

    epsilon: float
    lower_bound: float | None  # PRV's certified lower bound, where PRV ran
    method: str  # "prv" or "rdp"


@dataclass(frozen=True)
class LedgerReplay:
    """Every claimed epsilon of the ledger, recomputed independently from its events."""

    example: dict[str, PartnerReplay]  # partner -> its replay
    example_at: dict[int, ReplayPoint]  # ledger index of an example_dp -> the replay there
    client: ClientReplay | None  # None: no client-level events, or they could not replay
    client_at: dict[int, float]  # ledger index of a client_dp -> cumulative client epsilon
    # why the client-level events could not be replayed, and the entry (then no check
    # compares client-level epsilons again)
    client_failure: tuple[str, int] | None


def replay_ledger(events: Sequence[IndexedEvent], delta: float | None, *, pld: bool
                  ) -> LedgerReplay:
    examples = [(i, e) for i, e in events if isinstance(e, ev.ExampleDpEvent)]
    clients = [(i, e) for i, e in events if isinstance(e, ev.ClientDpEvent)]
    example = replay_example_level([e for _, e in examples], delta, with_pld=pld)
    # the partner's cumulative epsilon after each of its example_dp events, in ledger order
    example_at: dict[int, ReplayPoint] = {}
    cursor: dict[str, int] = {}
    for i, e in examples:
        k = cursor.get(e.partner, 0)
        rep = example[e.partner]
        example_at[i] = ReplayPoint(rep.epsilons[k], rep.lower_bounds[k], rep.methods[k])
        cursor[e.partner] = k + 1
    client, client_at, failure = None, {}, None
    odd = [i for i, e in clients if e.mechanism.kind != clients[0][1].mechanism.kind]
    if odd:
        failure = (f"client-level events mix mechanisms "
                   f"{sorted({e.mechanism.kind for _, e in clients})}", odd[0])
    elif clients:
        try:
            client = replay_client_level([e for _, e in clients], delta)
            client_at = dict(zip([i for i, _ in clients], client.epsilons, strict=True))
        except (UnknownMechanism, ValueError) as exc:
            failure = (str(exc), clients[0][0])
    return LedgerReplay(example, example_at, client, client_at, failure)
