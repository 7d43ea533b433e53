"""What must hold before a run is resumed, checked read-only (nothing is written unless
every check passes): the run is not finished, a checkpoint exists and is readable, the
configuration is the run's own (differences named by key), the checkpointed weights are
those the ledger recorded for that round (model_digest), and no round the ledger records
as completed lies after the checkpoint (resuming would train it, and spend the partners'
budget, a second time).

A round's checkpoint is written before its round_completed entry and holds that entry and
the round's metrics row (`round_record`): a run that stopped between them resumes after
the round, its record completed from the checkpoint (`complete_recorded_round`)."""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from confide.config import RunConfig
from confide.errors import ConfideError
from confide.logs import plural
from confide.privacy import ledger_events as E
from confide.privacy.ledger import read_lines
from confide.server.run_folder import CheckpointError, RunFolder

if TYPE_CHECKING:
    from confide.server.run_record import RunRecord

# Keys that may differ on resume: `resume` itself, `out` (a run folder may be moved or
# copied and resumed in its new place; nothing privacy-relevant depends on the path) and
# the Ray resources per virtual partner (a run may resume on another machine or cluster).
IGNORED_ON_RESUME = frozenset({"resume", "out", "client-cpus", "client-gpus"})


class ResumeRefused(CheckpointError):
    """The run cannot be resumed as asked; the message says why and what to do."""


def ledger_entries(folder: RunFolder) -> list[dict[str, Any]]:
    if not folder.ledger.is_file():
        return []
    return [line.entry for line in read_lines(folder.ledger) if line.entry is not None]


def finished(entries: list[dict[str, Any]]) -> bool:
    return bool(entries) and entries[-1].get("type") == E.RUN_FINISHED


def config_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: recorded -> now' for every key whose value differs (IGNORED_ON_RESUME aside)."""
    keys = sorted((set(recorded) | set(now)) - IGNORED_ON_RESUME)
    return [f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in keys
            if recorded.get(k) != now.get(k)]


def check_not_finished(folder: RunFolder, entries: list[dict[str, Any]] | None = None
                       ) -> None:
    entries = ledger_entries(folder) if entries is None else entries
    if finished(entries):
        done = entries[-1].get("payload", {}).get("rounds_completed")
        raise ResumeRefused(f"{folder.root} holds a finished run ({plural(done, 'round')}): "
                            "there is nothing to resume, and it is left unchanged. To train "
                            "further, start a new run with another --out")


def check_configuration(folder: RunFolder, cfg: RunConfig,
                        entries: list[dict[str, Any]] | None = None) -> None:
    """The run's configuration is the one in its ledger's run_started (verified by the
    audit); a resumed run must use it, the run folder's place aside."""
    entries = ledger_entries(folder) if entries is None else entries
    started = next((e for e in entries if e.get("type") == E.RUN_STARTED), None)
    if started is None:
        raise ResumeRefused(f"{folder.ledger} has no run_started entry: nothing to resume")
    recorded = dict(started["payload"]["config"])
    now = cfg.to_dict()
    if not now.get("num-labels"):  # inferred from the data when the run started
        now = {**now, "num-labels": recorded.get("num-labels")}
    diffs = config_differences(recorded, now)
    if diffs:
        raise ResumeRefused(
            f"{folder.root} was started with another configuration; resume needs the same "
            f"one. Differing keys: {'; '.join(diffs)}")


def check_checkpoint_digest(folder: RunFolder, round_: int, weights: dict[str, np.ndarray],
                            server_state: dict[str, Any],
                            entries: list[dict[str, Any]] | None = None) -> None:
    """The checkpointed weights must be the global model the ledger recorded for that
    round: a file altered (or swapped) after the fact would be trained on unnoticed."""
    if round_ == 0:
        return
    entries = ledger_entries(folder) if entries is None else entries
    recorded = [e["payload"].get("sha256") for e in entries
                if e.get("type") == E.MODEL_DIGEST and e["payload"].get("round") == round_]
    name = folder.checkpoint_dir / str(server_state.get("weights", "?"))
    if not recorded:
        raise ResumeRefused(f"the ledger records no model_digest for round {round_}, so "
                            f"{name} cannot be checked; refusing to resume from it")
    actual = E.weights_digest(weights)
    if actual != recorded[-1]:  # the last attempt of the round is the checkpointed one
        raise ResumeRefused(
            f"checkpoint {name} does not hold the model the ledger recorded for round "
            f"{round_} (SHA-256 {actual[:16]}…, ledger {recorded[-1][:16]}…): it was altered "
            "or replaced; refusing to resume from it")


def check_resume(folder: RunFolder, cfg: RunConfig
                 ) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
    """Every check, read-only; returns the checkpoint (round, weights, server state)."""
    if not folder.root.is_dir():
        raise ResumeRefused(f"--resume: {folder.root} is missing (no such folder)")
    entries = ledger_entries(folder)
    check_not_finished(folder, entries)
    round_, weights, state = folder.load_checkpoint()
    check_configuration(folder, cfg, entries)
    check_checkpoint_digest(folder, round_, weights, state, entries)
    check_no_recorded_round_after(folder, round_, entries)
    return round_, weights, state


def completed_rounds(entries: list[dict[str, Any]]) -> int:
    """The rounds the ledger records as completed, as the audit walks them: a run_resumed
    from round k sets aside what was completed after k (those rounds were run again)."""
    done = 0
    for entry in entries:
        payload = entry.get("payload") or {}
        if entry.get("type") == E.RUN_RESUMED:
            done = min(done, int(payload.get("from_round", 0)))
        elif entry.get("type") == E.ROUND_COMPLETED:
            done = int(payload.get("round", done))
    return done


def check_no_recorded_round_after(folder: RunFolder, round_: int,
                                  entries: list[dict[str, Any]]) -> None:
    """A round the ledger completed after the checkpoint's would be trained again on resume:
    its partners would spend their budget for it twice. (A checkpoint is written before
    its round's round_completed, so only a folder of an earlier version, or one whose
    checkpoint was replaced by an older one, can be in this state.)"""
    done = completed_rounds(entries)
    if done > round_:
        raise ResumeRefused(
            f"the ledger of {folder.root} records round(s) {round_ + 1}..{done} as completed, "
            f"but its checkpoint holds round {round_}: resuming would train "
            f"{'that round' if done == round_ + 1 else 'those rounds'} again and spend the "
            "partners' budget twice; refusing. The run's record stands as it is (`confide "
            "audit verify` reads it); start a new run with another --out to train further")


def round_record(completed: E.RoundCompleted, metrics_row: dict[str, Any]) -> dict[str, Any]:
    """What a round's checkpoint keeps of the round's record: its round_completed payload
    and metrics row, written to the ledger and metrics.jsonl right after it."""
    return {"round_record": {"round": completed.round, "round_completed": completed.to_payload(),
                             "metrics": metrics_row}}


def complete_recorded_round(folder: RunFolder, host: RunRecord,
                            entries: list[dict[str, Any]], round_: int,
                            state: dict[str, Any]) -> list[str]:
    """On resume from the checkpoint of `round_`: record what the run wrote after that
    checkpoint and lost when it stopped (disk full, killed): the round's round_completed
    entry (the ledger holds the round's model_digest, which the checkpoint's weights were
    checked against) and its metrics row. Returns what was recorded, for the log."""
    record = state.get("round_record")
    if not isinstance(record, dict) or record.get("round") != round_ or round_ == 0:
        return []
    done: list[str] = []
    if completed_rounds(entries) < round_:
        host.record(E.RoundCompleted.from_payload(record["round_completed"]))
        done.append(f"round {round_}'s round_completed (from its checkpoint)")
    if not any(row.get("round") == round_ for row in folder.read_metrics()):
        folder.append_metrics(dict(record["metrics"]))
        done.append(f"round {round_}'s metrics row (from its checkpoint)")
    return done


def describe_checkpoint(folder: RunFolder) -> str:
    """'after round N' of the latest checkpoint, for messages."""
    try:
        state = json.loads(folder.server_state.read_text())
        return f"after round {int(state['round'])}"
    except (OSError, ValueError, KeyError):
        return "from its last checkpoint"


class StopRequest:
    """Set by a driver's signal handler; the round loop stops at its next safe point
    (between rounds: the round in flight is finished, so no budget a node spent in it goes
    unrecorded), records run_interrupted, and leaves the run resumable."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._abort = threading.Event()
        self.reason = ""

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._event.set()

    def abort(self, reason: str) -> None:
        """The driver failed (e.g. the simulation engine crashed): leave now, mid-round.
        What a node spent is in the ledger already; the run resumes from its checkpoint."""
        self.reason = self.reason or reason
        self._abort.set()
        self._event.set()

    @property
    def aborted(self) -> bool:
        return self._abort.is_set()

    def __bool__(self) -> bool:
        return self._event.is_set()


class Aborted(RuntimeError):
    """Raised in the server loop when its driver aborted the run (StopRequest.abort)."""


class Interrupted(ConfideError, RuntimeError):
    """The run stopped at a safe point on request; the message says how to resume."""

    exit_status, label = 130, ""  # as a shell reports an interrupted command


class RunWriteError(ConfideError, RuntimeError):
    """A write to the run folder failed (disk full, permissions): the run stopped; the
    message names the file and says from which round it resumes."""

    exit_status = 1  # the run could not go on


def write_failure(folder: RunFolder, exc: OSError) -> RunWriteError:
    what = exc.filename or folder.root
    return RunWriteError(
        f"cannot write {what}: {exc.strerror or exc}. The run stopped; {folder.root} "
        f"resumes {describe_checkpoint(folder)} (every file is replaced atomically, and "
        "budget the partners spent in the unfinished round stays in the ledger). Free "
        "space or fix permissions, then run the same command with --resume")


class EveryPartnerFailed(ConfideError, RuntimeError):
    """Every partner sampled for the run's first round failed with an error (none trained,
    none refused for budget): later rounds would fail the same way, so the run stops with
    the partners' errors instead of finishing "completed" with nothing aggregated."""

    exit_status = 1  # the run could not go on


class NoBudgetLeft(ConfideError, RuntimeError):
    """Every partner that answered the run's first round refused it because its lifetime
    privacy budget is spent: the run cannot train anything. Raised after the refusals are
    in the ledger, before any evaluation or checkpoint."""

    exit_status = 1  # the run could not go on


def no_budget_message(server_round: int, refusals: list[tuple[str, float, float, float]],
                      target_epsilon: float) -> str:
    """refusals: (partner, spent, would_be, max_epsilon) as each partner signed them."""
    parts = [f"{p}: spent {spent:.4g} of its max-epsilon {cap:.4g} (remaining "
             f"{max(0.0, cap - spent):.4g}; round {server_round} would reach {would:.4g})"
             for p, spent, would, cap in sorted(refusals)]
    remaining = min(max(0.0, cap - spent) for _, spent, _, cap in refusals)
    return (_no_budget_head(server_round, "; ".join(parts)) + _no_budget_advice(target_epsilon)
            + f" (the smallest remaining budget is {remaining:.4g}).")


def no_budget_reasons_message(server_round: int, refusals: list[tuple[str, str]],
                              target_epsilon: float) -> str:
    """refusals: (partner, the reason it signed) of refusals that carry no numbers (those
    of the secure set-up's first stage)."""
    parts = "; ".join(f"{p}: {reason}" for p, reason in sorted(refusals))
    return _no_budget_head(server_round, parts) + _no_budget_advice(target_epsilon) + "."


def _no_budget_head(server_round: int, parts: str) -> str:
    return (f"no partner can train: every partner refused round {server_round} because its "
            f"privacy budget is spent ({parts}). Nothing was trained or aggregated; the run "
            "stops here. ")


def _no_budget_advice(target_epsilon: float) -> str:
    return ("A partner's max-epsilon is a lifetime budget over all runs on its data, and each "
            f"run spends up to its target-epsilon ({target_epsilon:g}) of it. Ask the "
            "partners whether they can give the federation more budget, or start a run whose "
            "target-epsilon fits what is left")
