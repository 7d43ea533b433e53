"""A run folder as the checks see it: read once, never changed.

`load_run` reads the ledger's lines, the key that pins it, summary.json and metrics.jsonl;
what several checks derive from them (typed events, rounds, the independent replay) is
computed on first use and cached on the object, so any check can run alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from confide.audit.checks.ledger_walk import (
    IndexedEvent,
    LedgerReplay,
    ParsedEvents,
    RoundWalk,
    parse_events,
    replay_ledger,
    walk_rounds,
)
from confide.privacy import ledger_events as ev
from confide.privacy.ledger import (
    LedgerLine,
    as_public_key,
    load_public_key,
    public_key_hex,
    read_lines,
)
from confide.run_layout import (
    LEDGER_FILE,
    LEDGER_PUBLIC_KEY_FILE,
    METRICS_FILE,
    MODEL_DIR,
    SUMMARY_FILE,
    WEIGHTS_FILE,
)

MODEL_FILE = f"{MODEL_DIR}/{WEIGHTS_FILE}"
UNPINNED = f"run_started only (not pinned: no {LEDGER_PUBLIC_KEY_FILE})"
GIVEN_KEY = "the given key (the run was not recorded under the expected key)"


# frozen: no check can change what another reads; eq=False: compared (and cached) by identity
@dataclass(frozen=True, eq=False)
class LoadedRun:
    run_dir: Path
    ledger_found: bool
    lines: tuple[LedgerLine, ...]
    pinned_key: str | None  # hex of the key that must have signed the ledger, if pinned
    key_source: str  # where the pinning key came from, for the chain check's detail
    summary: dict[str, Any] | None  # None: no summary.json, or it is not a JSON object
    summary_error: str | None  # why summary.json could not be read as an object
    metrics_text: str | None  # None: no metrics.jsonl
    pld: bool = True  # False: no PLD second opinion in the replay (faster)

    @property
    def ledger_path(self) -> Path:
        return self.run_dir / LEDGER_FILE

    @property
    def model_path(self) -> Path:
        return self.run_dir / MODEL_FILE

    @property
    def has_summary(self) -> bool:
        """summary.json exists, readable or not (the run claims to have finished)."""
        return self.summary is not None or self.summary_error is not None

    # -- derived from the ledger, once ----------------------------------------------------
    @cached_property
    def parsed(self) -> ParsedEvents:
        return parse_events(self.lines)

    @property
    def events(self) -> tuple[IndexedEvent, ...]:
        return self.parsed.events

    @cached_property
    def run_started(self) -> ev.RunStarted | None:
        """The first run_started among the typed events: the run's config, delta and key."""
        return next((e for _, e in self.events if isinstance(e, ev.RunStarted)), None)

    @property
    def config(self) -> dict[str, Any]:
        return self.run_started.config if self.run_started is not None else {}

    @property
    def delta(self) -> float | None:
        return self.run_started.delta if self.run_started is not None else None

    @property
    def run_key(self) -> str | None:
        """The ledger key as run_started states it: the run a signed refusal must name."""
        return self.run_started.ledger_public_key if self.run_started is not None else None

    @property
    def finished(self) -> bool:
        """The ledger records run_finished: the run claims to have ended, so every output
        of a finished run (summary.json, model/, metrics.jsonl) must be there."""
        return any(isinstance(e, ev.RunFinished) for _, e in self.events)

    @property
    def planned_rounds(self) -> int | None:
        """The rounds run_started's configuration asked for (None: not recorded)."""
        value = self.config.get("rounds")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @cached_property
    def rounds(self) -> RoundWalk:
        return walk_rounds(self.events, len(self.lines))

    @cached_property
    def replay(self) -> LedgerReplay:
        return replay_ledger(self.events, self.delta, pld=self.pld)


def load_run(run_dir: Path | str, public_key: Any = None, *, pld: bool = True) -> LoadedRun:
    """Read a run folder. `public_key` (key object, raw bytes or hex) pins the ledger key
    instead of ledger_public_key.pem."""
    run_dir = Path(run_dir)
    ledger = run_dir / LEDGER_FILE
    if not ledger.is_file():  # nothing else is read: the chain check names the missing file
        return LoadedRun(run_dir, False, (), None, UNPINNED, None, None, None, pld)
    pinned, source = None, UNPINNED
    if public_key is not None:
        pinned, source = public_key_hex(as_public_key(public_key)), GIVEN_KEY
    elif (run_dir / LEDGER_PUBLIC_KEY_FILE).is_file():
        pinned = public_key_hex(load_public_key(run_dir / LEDGER_PUBLIC_KEY_FILE))
        source = LEDGER_PUBLIC_KEY_FILE
    summary, summary_error = _read_summary(run_dir / SUMMARY_FILE)
    metrics = run_dir / METRICS_FILE
    return LoadedRun(run_dir, True, tuple(read_lines(ledger)), pinned, source, summary,
                     summary_error, metrics.read_text() if metrics.is_file() else None, pld)


def _read_summary(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{SUMMARY_FILE} is not valid JSON"
    return (data, None) if isinstance(data, dict) else (None, f"{SUMMARY_FILE} not an object")
