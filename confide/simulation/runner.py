"""`confide simulate`: the app in Flower's simulation engine (Ray) with N virtual partners."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from confide import logs
from confide.audit.report import write_report_after_run
from confide.audit.verify import LARGE_DELTA_NOTE, over_target_text
from confide.config import RunConfig
from confide.data import check_delta
from confide.privacy.preflight import PreflightRefused, PreflightReport, check, refusal_message
from confide.server.recovery import (
    Interrupted,
    StopRequest,
    check_not_finished,
    check_resume,
    ledger_entries,
)
from confide.server.run_folder import RunFolder
from confide.server.server_app import default_out_dir, make_server_app
from confide.simulation import ray_cluster
from confide.task import federated_data, model_spec


def simulate(cfg: RunConfig, *, console: Console | None = None, verbose: bool = False,
             ray_address: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Run `cfg` in Flower's simulation engine: on a Ray instance of this process, or on
    the existing Ray cluster at `ray_address` (default: the RAY_ADDRESS variable)."""
    from flwr.simulation import run_simulation

    from confide.clients.client_app import app as client_app
    from confide.simulation import engine_polling

    # Flower 1.41's engine polls every registered partner every 0.1 s (O(partners x messages
    # in flight)); poll only partners with a message. No-op (debug log) on other versions.
    engine_polling.apply()

    console = console or Console()
    out = default_out_dir(cfg)
    folder = RunFolder(out)
    if cfg.resume:
        check_not_finished(folder)  # a finished run says so (and stays unchanged)
        if not folder.server_state.exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {folder.checkpoint_dir} to "
                                    "resume")
        check_resume(folder, cfg)  # in this process: a message, not a Ray traceback
    elif out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is an existing file, not a folder; choose "
                              "another --out")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"run folder {out} is not empty; choose another --out "
                              "(a finished run is never overwritten)")
    cfg = cfg.replace(out=str(out))
    check_model(cfg)  # a missing folder, or one of the wrong kind: one line, before Ray
    # Validate data up front, in this process: errors name file and row before Ray starts.
    fed = federated_data(cfg)
    check_delta(cfg.delta, fed.partitions, allow_large=cfg.allow_large_delta)
    if fed.synthetic:
        console.print("[yellow]No --data given: using the SYNTHETIC offline demo corpus "
                      "(generated template reviews, not real data).[/yellow]")
    elif fed.labels_note:
        console.print(fed.labels_note, markup=False, highlight=False)
    console.print(f"Confide simulation: {cfg.clients} partners, "
                  f"{logs.plural(cfg.rounds, 'round')}, model {cfg.model} ({cfg.fine_tune}), "
                  f"example-level DP {'on' if cfg.example_dp else 'OFF'}, run folder {out}")
    report = preflight(cfg, [len(p) for p in fed.partitions])
    if report is not None:
        if report.cannot_learn and cfg.preflight == "error":
            raise PreflightRefused(refusal_message(report))  # before Ray: nothing spent
        show_preflight(console, report)
    if not verbose:
        logs.quiet_known_messages()
    address = ray_cluster.resolve_address(ray_address)
    cluster = None
    if address is not None:
        cluster = ray_cluster.connect(address, verbose=verbose)
        console.print(f"Ray cluster {address}: {cluster.get('CPU', 0):g} CPUs, "
                      f"{cluster.get('GPU', 0):g} GPUs; {cfg.client_cpus:g} CPUs per partner",
                      markup=False, highlight=False)
    try:
        backend = ray_cluster.backend_config(cfg, cluster=cluster)
    except BaseException:
        if cluster is not None:
            ray_cluster.disconnect()
        raise
    with Progress(TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("starting partners", total=cfg.rounds)

        def on_round(row: dict[str, Any]) -> None:
            eps = row["epsilon_example_level"]
            # no example DP: no epsilon at all (printing 0.00 would claim perfect privacy)
            privacy = (f"max eps {max(eps.values()) if eps else 0.0:.2f}" if cfg.example_dp
                       else "example DP off")
            progress.update(task, advance=1, description=(
                f"acc {row['accuracy']:.3f} loss {row['loss']:.3f} "
                f"{privacy} aggregated {row['num_clients_aggregated']}"
                f"/{row['num_clients_sampled']}"))

        stop = StopRequest()
        failures: list[Exception] = []  # a known failure of the ServerApp, as a message
        crash_log = None if verbose else ray_cluster.EngineCrashLog()
        if crash_log is not None:
            logging.getLogger("flwr").addFilter(crash_log)
        try:
            with stop_on_signals(stop, console):
                # on_preflight: the report is shown above already, the ServerApp records it
                run_simulation(server_app=make_server_app(cfg, on_round=on_round,
                                                          on_preflight=lambda _: None,
                                                          stop=stop, failures=failures),
                               client_app=client_app, num_supernodes=cfg.clients,
                               backend_config=backend, verbose_logging=verbose)
        except Exception as exc:
            # Flower leaves its ServerApp thread waiting for replies that will never come:
            # end it, so that the error ends the command instead of a hang.
            failed = ray_cluster.engine_error(exc, cfg, cluster)
            stop.abort("the simulation engine failed" if failed else type(exc).__name__)
            if failed is None:
                raise
            raise failed from exc
        finally:
            if crash_log is not None:
                logging.getLogger("flwr").removeFilter(crash_log)
            if cluster is not None:
                ray_cluster.disconnect()  # leaves the cluster running: it is not ours
    if stop:
        shutdown_ray()  # the workers got the terminal's signal too: none may linger
        raise Interrupted(interrupted_message(out, stop.reason))
    if failures:  # e.g. no partner has budget left, a full disk: the message says what
        raise failures[0]
    if not folder.summary.exists():
        raise RuntimeError(f"the simulation ended without writing {folder.summary}; see the "
                           "log")
    summary = json.loads(folder.summary.read_text())
    # The report is the driver's, after the run (it verifies the whole ledger again): an
    # OSError is a ReportWriteError that says how to write it later; the run stands.
    write_report_after_run(out, int(summary["rounds_completed"]),
                           warn=lambda text: console.print(text, style="yellow", markup=False,
                                                           highlight=False))
    console.print(final_table(out, summary))
    if report is not None and report.needs_attention:  # the warning has scrolled away
        console.print(report.headline(), style="bold red" if report.cannot_learn
                      else "yellow", markup=False, highlight=False)
    return out, summary


def check_model(cfg: RunConfig) -> None:
    """The model folder exists and fits the task (config.json only, nothing loaded): a
    configuration error ends here, before Ray starts and before any run folder exists."""
    from confide.model import MINILM, TINY, ModelError, model_kind_problem, resolve_model_path
    from confide.tasks import CAUSAL_LM
    from confide.tasks.causal_lm import SMOLLM2, resolve_causal_path

    if cfg.model in (MINILM, TINY, SMOLLM2):
        return
    (resolve_causal_path if cfg.task == CAUSAL_LM else resolve_model_path)(cfg.model)
    problem = model_kind_problem(cfg.model, cfg.task)
    if problem is not None:
        raise ModelError(problem)


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, console: Console) -> Iterator[None]:
    """First SIGINT / SIGTERM: ask the server to stop at its next safe point (the round in
    flight finishes, so nothing a node spent goes unrecorded). A second one: leave at once
    (the ledger and checkpoints are written atomically; resume repeats the open round)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stop:
            console.print(f"{name} again: leaving now. The run folder resumes from its last "
                          "checkpoint (--resume).", style="bold red", markup=False)
            os._exit(130)
        stop.request(name)
        console.print(f"{name}: stopping after the round in progress (a second {name} "
                      "leaves at once) ...", style="yellow", markup=False)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def interrupted_message(out: Path, reason: str) -> str:
    entries = ledger_entries(RunFolder(out))
    done = next((e["payload"]["after_round"] for e in reversed(entries)
                 if e.get("type") == "run_interrupted"), None)
    args = sys.argv[1:] if sys.argv[1:2] == ["simulate"] else ["simulate", "...", "--out",
                                                                 str(out)]
    if "--resume" not in args:
        args = [*args, "--resume"]
    where = f"after round {done}" if done is not None else "before its first checkpoint"
    return (f"run stopped ({reason}) {where}. {out} is resumable and verifiable "
            f"(confide audit verify {shlex.quote(str(out))}). To continue:\n  confide "
            + " ".join(shlex.quote(a) for a in args))


def preflight(cfg: RunConfig, partition_rows: list[int]) -> PreflightReport | None:
    """The pre-flight check in this process, before Ray starts, so 'error' refuses with a
    plain message (the ServerApp repeats it for summary.json; calibrations are cached)."""
    if cfg.preflight == "off":
        return None
    from confide.model import count_trainable
    from confide.server.federation import resolve_evaluation
    from confide.tasks import build_model

    _, num_labels = resolve_evaluation(cfg)
    d = count_trainable(build_model(model_spec(cfg, num_labels)))
    return check(cfg, d, partition_rows)


def show_preflight(console: Console, report: PreflightReport) -> None:
    """One dim line when the configuration can learn; the numbers, the reason and what
    would help, in colour, when it is weak or cannot learn."""
    if not report.needs_attention:
        console.print(report.headline(), style="dim", markup=False, highlight=False)
        return
    style = "bold red" if report.cannot_learn else "yellow"
    for i, line in enumerate(report.lines()):
        console.print(line, style=style if i == 0 else None, markup=False, highlight=False)


PARTNER_ROWS_MAX = 20  # above this many partners the console shows a summary instead


def final_table(out: Path, summary: dict[str, Any]) -> Group:
    """Per round: accuracy, loss, participation, epsilon range, bytes; then per partner (or,
    with more than PARTNER_ROWS_MAX partners, their spread). Fits an 80-column terminal."""
    rows = [json.loads(line) for line in RunFolder(out).metrics.read_text().splitlines()]
    synthetic = " [SYNTHETIC demo data]" if summary.get("synthetic_data") else ""
    rounds = Table(title=f"Confide run {out}{synthetic}")
    for name in ("round", "accuracy", "loss", "agg.", "eps min-max", "client eps",
                 "bytes up"):
        rounds.add_column(name, justify="right", no_wrap=True)
    priv = summary["privacy"]
    example_dp = priv.get("example_dp", True)
    for r in rows:
        eps = list(r["epsilon_example_level"].values())
        span = f"{min(eps):.2f}-{max(eps):.2f}" if eps and example_dp else "-"
        client = r.get("epsilon_client_level")
        rounds.add_row(str(r["round"]), f"{r['accuracy']:.4f}", f"{r['loss']:.4f}",
                       f"{r['num_clients_aggregated']}/{r['num_clients_sampled']}", span,
                       "-" if client is None else f"{client:.2f}",
                       _bytes(r["bytes_uploaded"]))
    rounds.caption = "agg. = updates aggregated / partners sampled; eps = example-level " \
        "epsilon (cumulative, PLD)"
    if any(r.get("perplexity") is not None for r in rows):  # causal-lm
        rounds.caption += "; causal-lm: accuracy = next-token accuracy, loss = mean NLL of " \
            "completion tokens; " + "; ".join(
                f"round {r['round']}: perplexity {r['perplexity']:.2f}"
                + (f", BLEU {r['bleu']:.1f}, ROUGE-L {r['rouge_l']:.1f}"
                   if r.get("bleu") is not None else "") for r in rows)
    if not example_dp:
        return Group(rounds, Text(
            "Example-level DP is OFF (example-dp = false): this run gives the partners' "
            "records no example-level guarantee, so there is no epsilon to report."))
    second = priv.get("example_level_rdp") or {}
    refused = {p: [str(r["round"]) for r in rows if p in r.get("refused", [])]
               for p in priv["example_level"]}
    if len(priv["example_level"]) > PARTNER_ROWS_MAX:
        partners = _partner_spread(priv["example_level"], second, refused, rows)
    else:
        partners = Table(title="Example-level epsilon per partner (cumulative over the run)")
        for name in ("partner", "eps (PLD)", "RDP (2nd)", "rounds", "refused"):
            partners.add_column(name, justify="right", no_wrap=True)
        for p, eps in sorted(priv["example_level"].items()):
            trained = sum(1 for r in rows if p in r["epsilon_example_level"]
                          and p not in r.get("refused", []))
            rdp = second.get(p)
            partners.add_row(p, f"{eps:.3f}", "-" if rdp is None else f"{rdp:.3f}",
                             str(trained), ", ".join(refused[p]) or "-")
    large = f" ({LARGE_DELTA_NOTE})" if priv.get("allow_large_delta") else ""
    partners.caption = (f"delta = {priv['delta']}{large}; example-level DP per partner, "
                        f"add/remove-one-record adjacency, cumulative over the run; "
                        f"{priv['accountant']}. Check it: confide audit verify {out}")
    above = priv.get("above_target_epsilon") or {}
    if above:  # said in words, below the numbers: the run spent more than it planned
        return Group(rounds, partners, Text(over_target_text(above, priv["target_epsilon"]),
                                            style="bold red"))
    return Group(rounds, partners)


def _partner_spread(claimed: dict[str, float], second: dict[str, float],
                    refused: dict[str, list[str]], rows: list[dict[str, Any]]) -> Table:
    """Many partners: the spread of their epsilons and who refused or dropped; the full
    per-partner table is in summary.json and the report."""
    import statistics

    table = Table(title=f"Example-level epsilon of {len(claimed)} partners (cumulative; "
                        "per partner: summary.json, report.html)")
    for name in ("", "min", "median", "max"):
        table.add_column(name, justify="right", no_wrap=True)
    for label, values in (("eps (PLD)", list(claimed.values())),
                          ("RDP (2nd)", list(second.values()))):
        if values:
            table.add_row(label, f"{min(values):.3f}", f"{statistics.median(values):.3f}",
                          f"{max(values):.3f}")
    dropped = sum(int(r.get("secagg_dropouts") or 0) for r in rows)
    table.add_row("refused (budget)", str(sum(1 for v in refused.values() if v)),
                  "partners", "")
    table.add_row("dropped", str(dropped), "updates", "")
    return table


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
