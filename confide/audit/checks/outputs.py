"""The run's other files against its ledger: summary.json, metrics.jsonl and the model."""

from __future__ import annotations

import json
from typing import Any

from confide.audit.checks.base import REL_TOLERANCE, CheckResult, close
from confide.audit.checks.loaded_run import MODEL_FILE, LoadedRun
from confide.config import recorded_value
from confide.logs import plural
from confide.privacy import ledger_events as ev

# per round: (partner -> replayed cumulative epsilon, replayed client-level epsilon)
RoundEpsilons = tuple[dict[str, float], float | None]


def check_summary(run: LoadedRun) -> CheckResult:
    """summary.json equals the replay and the ledger (1 % on epsilons)."""
    c = CheckResult("summary")
    if run.summary_error is not None:
        c.add(run.summary_error)
        return c
    s = run.summary
    if s is None and run.finished:
        c.add("summary.json is missing, although the ledger records run_finished")
        return c
    if s is None:
        c.skipped, c.detail = True, "no summary.json (the ledger has no run_finished)"
        return c
    replay = run.replay
    priv = s.get("privacy") or {}
    if run.delta is not None and priv.get("delta") != run.delta:
        c.add(f"privacy.delta = {priv.get('delta')!r}, the ledger's is {run.delta}")
    stated = priv.get("example_level") or {}
    for p, rep in sorted(replay.example.items()):
        if p not in stated:
            c.add(f"privacy.example_level omits partner {p} (replay {rep.final:.6g})")
        elif not isinstance(stated[p], int | float) or not close(float(stated[p]),
                                                                 rep.final):
            c.add(f"privacy.example_level[{p}] = {stated[p]!r}, replay {rep.final:.6g}")
    for p, value in stated.items():
        if p not in replay.example and value not in (0, 0.0, None):
            c.add(f"privacy.example_level names partner {p}, absent from the ledger")
    # The RDP second opinion, where the summary states one, must be RDP's figure too.
    for p, value in (priv.get("example_level_rdp") or {}).items():
        partner = replay.example.get(p)
        if partner is not None and (not isinstance(value, int | float)
                                    or not close(float(value), partner.final_rdp)):
            c.add(f"privacy.example_level_rdp[{p}] = {value!r}, RDP replay "
                  f"{partner.final_rdp:.6g}")
    final_client = replay.client.final if replay.client else None
    stated_client = priv.get("client_level_epsilon")
    if replay.client_failure is None and not close(stated_client, final_client):
        c.add(f"privacy.client_level_epsilon = {stated_client!r}, replay {final_client!r}")
    for key, cfg_key in (("secure_aggregation", "secure-aggregation"),
                         ("distributed_dp", "distributed-dp")):
        if key in s and bool(s[key]) != bool(recorded_value(run.config, cfg_key)):
            c.add(f"{key} = {s[key]!r} but the recorded config says "
                  f"{recorded_value(run.config, cfg_key)!r}")
    last = run.rounds.completed(run.rounds.rounds_completed)
    fm = s.get("final_metrics") or {}
    if last is not None:
        for k in ("accuracy", "loss"):
            got, want = fm.get(k), getattr(last, k)
            if want is not None and not (isinstance(got, int | float)
                                         and close(float(got), want, 1e-6)):
                c.add(f"final_metrics.{k} = {got!r}, round {last.round}'s "
                      f"round_completed says {want!r}")
    c.detail = f"{len(stated)} partners, tolerance {REL_TOLERANCE:.0%}"
    return c


def replayed_epsilons_per_round(run: LoadedRun) -> dict[int, RoundEpsilons]:
    """The replayed epsilons as they stood at each round's final round_completed: what
    that round's metrics row must state."""
    replay = run.replay
    out: dict[int, RoundEpsilons] = {}
    current: dict[str, float] = {}
    current_client: float | None = None
    for i, e in run.events:
        if isinstance(e, ev.ExampleDpEvent):
            current[e.partner] = replay.example_at[i].epsilon
        elif isinstance(e, ev.ClientDpEvent) and i in replay.client_at:
            current_client = replay.client_at[i]
        elif isinstance(e, ev.RoundCompleted):
            att = run.rounds.attempts.get(e.round)
            if att is not None and att.completed_at == i:
                out[e.round] = (dict(current), current_client)
    return out


def check_metrics(run: LoadedRun) -> CheckResult:
    """metrics.jsonl equals the replay and the ledger, round by round (1 %)."""
    c = CheckResult("metrics")
    if run.metrics_text is None and run.rounds.rounds_completed == 0:
        c.skipped, c.detail = True, "no metrics.jsonl (no round completed)"
        return c
    rows: dict[int, dict[str, Any]] = {}
    for n, text in enumerate((run.metrics_text or "").splitlines(), 1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
            rows[int(row["round"])] = row  # a re-run round: the last row counts
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            c.add(f"metrics.jsonl line {n} is not a JSON object with a round")
    snapshots = replayed_epsilons_per_round(run)
    client_compared = run.replay.client_failure is None
    for r, row in sorted(rows.items()):
        att = run.rounds.attempts.get(r)
        if r not in snapshots or att is None:
            c.add(f"metrics.jsonl has round {r}, which the ledger does not complete")
            continue
        at = att.completed_at
        eps, client_eps = snapshots[r]
        stated = row.get("epsilon_example_level") or {}
        for p, value in eps.items():
            if p not in stated:
                c.add(f"round {r}: epsilon_example_level omits partner {p}", at)
            elif not isinstance(stated[p], int | float) or not close(float(stated[p]),
                                                                     value):
                c.add(f"round {r}: epsilon_example_level[{p}] = {stated[p]!r}, replay "
                      f"{value:.6g}", at)
        for p, value in stated.items():
            if p not in eps and value not in (0, 0.0, None):
                c.add(f"round {r}: epsilon_example_level names {p}, who has no "
                      "example_dp so far", at)
        if client_compared and not close(row.get("epsilon_client_level"), client_eps):
            c.add(f"round {r}: epsilon_client_level = {row.get('epsilon_client_level')!r}, "
                  f"replay {client_eps!r}", at)
        done = run.rounds.completed(r)
        configured = next((e for i, e in run.events if i == att.configured_at), None)
        if done is not None:
            agg = row.get("num_clients_aggregated")
            if agg is not None and agg != len(done.aggregated):
                c.add(f"round {r}: num_clients_aggregated = {agg}, ledger lists "
                      f"{len(done.aggregated)}", at)
            for k in ("accuracy", "loss"):
                got, want = row.get(k), getattr(done, k)
                if want is not None and not (isinstance(got, int | float)
                                             and close(float(got), want, 1e-6)):
                    c.add(f"round {r}: {k} = {got!r}, round_completed says {want!r}", at)
        if isinstance(configured, ev.RoundConfigured):
            sampled = row.get("num_clients_sampled")
            if sampled is not None and sampled != len(configured.sampled):
                c.add(f"round {r}: num_clients_sampled = {sampled}, ledger lists "
                      f"{len(configured.sampled)}", att.configured_at)
    last = run.rounds.rounds_completed
    for r in range(1, last + 1):
        # an unfinished run may have stopped (disk full, killed) between the round's
        # round_completed and its metrics row: a resume writes that row
        if r not in rows and not (r == last and not run.finished):
            c.add(f"metrics.jsonl lacks round {r}" if run.metrics_text is not None else
                  f"metrics.jsonl is missing, although the ledger completes {last} "
                  "round(s)")
            if run.metrics_text is None:
                break
    c.detail = f"{plural(len(rows), 'round')}, tolerance {REL_TOLERANCE:.0%}"
    return c


def check_model(run: LoadedRun) -> CheckResult:
    """The last model_digest equals SHA-256 of model/weights.safetensors."""
    c = CheckResult("model")
    digests = [(i, e) for i, e in run.events if isinstance(e, ev.ModelDigest)]
    if not run.model_path.is_file():
        if run.finished:
            c.add(f"{MODEL_FILE} is missing, although the ledger records run_finished")
        else:
            c.skipped, c.detail = True, f"no {MODEL_FILE} (the ledger has no run_finished)"
        return c
    if not digests:
        c.add("no model_digest in the ledger", len(run.lines))
        return c
    # No entry index: either the file was swapped or the ledger was cut short (then
    # completeness names the missing entry).
    _, last = digests[-1]
    actual = ev.file_digest(run.model_path)
    if actual != last.sha256:
        c.add(f"{MODEL_FILE} has SHA-256 {actual[:16]}…, the ledger's last model_digest "
              f"(round {last.round}) is {last.sha256[:16]}…")
    c.detail = f"round {last.round} digest {last.sha256[:16]}…"
    return c
