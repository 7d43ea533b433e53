"""`confide simulate`: the app in Flower's simulation engine (Ray) with N virtual partners."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from confide import logs
from confide.audit.report import write_report_after_run
from confide.clients.identity import enrol_simulated_partners
from confide.clients.policy import write_simulated_policies
from confide.clients.progress import (
    partner_progress_files,
    progress_text,
    read_progress,
    round_progress,
)
from confide.config import RunConfig
from confide.data import check_delta
from confide.privacy.preflight import PreflightRefused, PreflightReport, check, refusal_message
from confide.server.recovery import (
    Interrupted,
    StopRequest,
    check_not_finished,
    check_resume,
    describe_checkpoint,
    finished,
    ledger_entries,
)
from confide.server.run_folder import RunFolder
from confide.server.run_table import final_table
from confide.server.server_app import default_out_dir, make_server_app
from confide.simulation import ray_cluster
from confide.simulation.stopping import SignalStop
from confide.tasks.inputs import federated_data, model_spec


def simulate(cfg: RunConfig, *, console: Console | None = None, verbose: bool = False,
             ray_address: str | None = None,
             partner_config: Mapping[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Run `cfg` in Flower's simulation engine: on a Ray instance of this process, or on
    the existing Ray cluster at `ray_address` (default: the RAY_ADDRESS variable).
    `partner_config`: policy keys every virtual partner's node config holds
    (confide.clients.policy), as a deployed partner's SuperNode would.

    SIGINT / SIGTERM (confide.simulation.stopping): the run stops within seconds, the
    report is written and Interrupted says how to resume; after the run has finished, a
    signal changes nothing."""
    console = console or Console()
    out = default_out_dir(cfg)
    address = ray_cluster.resolve_address(ray_address)
    stop = StopRequest()
    stopper = SignalStop(stop, lambda text: console.print(text, style="bold yellow",
                                                          markup=False, highlight=False),
                         lambda: interrupted_message(out, stop.reason, ray_address),
                         local_ray=address is None)
    with stopper.installed():
        cfg, report = prepare(cfg, out, console)
        if partner_config:
            write_simulated_policies(out, cfg.clients, partner_config)
        if cfg.privacy_mode.secure:  # the partners' identities and the federation roster
            enrol_simulated_partners(out, cfg.clients, delta=cfg.delta,
                                     max_epsilon=cfg.max_epsilon)
        stopper.check_not_stopped("before the run started: nothing was written or spent")
        if not verbose:
            logs.quiet_known_messages()
        failures = run_engine(cfg, console, stopper, address=address, verbose=verbose)
        folder = RunFolder(out)
        if stopper.signalled and not finished(ledger_entries(folder)):
            stopper.end_processes()  # Ray's agents and workers included: none may linger
            if folder.ledger.is_file():
                write_stopped_report(out, console)
            raise Interrupted(interrupted_message(out, stop.reason, ray_address))
        if failures:  # e.g. no partner has budget left, a full disk: the message says what
            raise failures[0]
        if not folder.summary.exists():
            raise RuntimeError(f"the simulation ended without writing {folder.summary}; see "
                               "the log")
        if stopper.signalled:
            console.print(f"{stopper.signal_name}: the run had finished already; its record "
                          "is complete", style="yellow", markup=False, highlight=False)
        summary = json.loads(folder.summary.read_text())
        # The report is the driver's, after the run (it verifies the whole ledger again): an
        # OSError is a ReportWriteError that says how to write it later; the run stands.
        write_report_after_run(out, int(summary["rounds_completed"]),
                               warn=lambda text: console.print(text, style="yellow",
                                                               markup=False, highlight=False))
        console.print(final_table(out, summary))
        if report is not None and report.needs_attention:  # the warning has scrolled away
            console.print(report.headline(), style="bold red" if report.cannot_learn
                          else "yellow", markup=False, highlight=False)
    return out, summary


def prepare(cfg: RunConfig, out: Path, console: Console
            ) -> tuple[RunConfig, PreflightReport | None]:
    """Everything that can be refused before Ray starts, in this process (a message, not a
    Ray traceback): the run folder (new and empty, or resumable), the model, the data,
    delta; the run's first lines and the pre-flight report. Returns the configuration with
    `out` set, and the report (None when pre-flight is off)."""
    folder = RunFolder(out)
    resumed_after = None
    if cfg.resume:
        check_not_finished(folder)  # a finished run says so (and stays unchanged)
        if not folder.server_state.exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {folder.checkpoint_dir} to "
                                    "resume")
        resumed_after, _, _ = check_resume(folder, cfg)
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
                  f"example-level DP {'on' if cfg.privacy_mode.example_dp else 'OFF'}, "
                  f"run folder {out}")
    if resumed_after is not None:
        console.print(f"resuming after round {resumed_after} ({cfg.rounds - resumed_after} "
                      f"of {cfg.rounds} rounds left)", markup=False, highlight=False)
    report = preflight(cfg, [len(p) for p in fed.partitions])
    if report is not None:
        if report.cannot_learn and cfg.preflight == "error":
            raise PreflightRefused(refusal_message(report))  # before Ray: nothing spent
        show_preflight(console, report)
    return cfg, report


def run_engine(cfg: RunConfig, console: Console, stopper: SignalStop, *, address: str | None,
               verbose: bool) -> list[Exception]:
    """Flower's simulation engine on Ray, with a progress bar; returns the ServerApp's
    known failures (KNOWN_FAILURES: a message each). A stop (stopper) ends it early."""
    from flwr.simulation import run_simulation

    from confide.clients.client_app import app as client_app
    from confide.simulation import engine_polling

    # Flower 1.41's engine polls every registered partner every 0.1 s (O(partners x messages
    # in flight)); poll only partners with a message. No-op (debug log) on other versions.
    engine_polling.apply()
    cluster = None
    if address is not None:
        cluster = ray_cluster.connect(address, verbose=verbose)
        console.print(f"Ray cluster {address}: {cluster.get('CPU', 0):g} CPUs, "
                      f"{cluster.get('GPU', 0):g} GPUs; {cfg.client_cpus:g} CPUs per partner",
                      markup=False, highlight=False)
    try:
        backend = ray_cluster.backend_config(cfg, cluster=cluster)
        if cluster is None:
            ray_cluster.start_local({**backend["init_args"],
                                     **({} if verbose else {"logging_level": logging.WARNING})})
        stopper.install()  # ray.init replaced the SIGTERM handler
        stopper.check_not_stopped("before the run started: nothing was written or spent")
    except BaseException:
        ray_cluster.disconnect()
        raise
    failures: list[Exception] = []  # a known failure of the ServerApp, as a message
    quiet = [] if verbose else [ray_cluster.EngineCrashLog(), QuietAfterStop(stopper)]
    for f in quiet:
        logging.getLogger("flwr").addFilter(f)
    try:
        with engine_progress(cfg, console) as on_round, stopper.engine():
            # on_preflight: the report is shown already, the ServerApp records it
            run_simulation(server_app=make_server_app(cfg, on_round=on_round,
                                                      on_preflight=lambda _: None,
                                                      stop=stopper.stop, failures=failures),
                           client_app=client_app, num_supernodes=cfg.clients,
                           backend_config=backend, verbose_logging=verbose)
    except Exception as exc:
        if not stopper.signalled:
            # Flower leaves its ServerApp thread waiting for replies that will never come:
            # end it, so that the error ends the command instead of a hang.
            failed = ray_cluster.engine_error(exc, cfg, cluster)
            stopper.stop.abort("the simulation engine failed" if failed
                               else type(exc).__name__)
            if failed is None:
                raise
            raise failed from exc
        # stopped on request: the killed workers' errors are the stop's, not the run's
    finally:
        for f in quiet:
            logging.getLogger("flwr").removeFilter(f)
        # a cluster keeps running (it is not ours); our own Ray instance ends with the run
        ray_cluster.disconnect()
    return failures


@contextlib.contextmanager
def engine_progress(cfg: RunConfig, console: Console
                    ) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar of rounds, and inside the round the partners' steps done / planned and
    an ETA (`confide.clients.progress`, polled from the run folder every second); yields
    the ServerApp's per-round callback."""
    with Progress(TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  TextColumn("{task.fields[inside]}"),
                  console=console, transient=False) as progress:
        task = progress.add_task("starting partners", total=cfg.rounds, inside="")
        poller = InsideRound(cfg, lambda text: progress.update(task, inside=text))

        def on_round(row: dict[str, Any]) -> None:
            eps = row["epsilon_example_level"]
            # no example DP: no epsilon at all (printing 0.00 would claim perfect privacy)
            privacy = (f"max eps {max(eps.values()) if eps else 0.0:.2f}"
                       if cfg.privacy_mode.example_dp else "example DP off")
            poller.round_done(int(row["round"]))
            progress.update(task, completed=row["round"], inside="", description=(
                f"acc {row['accuracy']:.3f} loss {row['loss']:.3f} "
                f"{privacy} aggregated {row['num_clients_aggregated']}"
                f"/{row['num_clients_sampled']}"))

        with poller.running():
            yield on_round


class InsideRound:
    """Polls the virtual partners' progress files (RUN/partners/partition-N/progress.json)
    and shows "round r: s/S steps, ETA mm:ss" through `show`. Files older than this driver
    (a resumed run's earlier rounds) and of rounds already completed are ignored. On a Ray
    cluster whose workers write to other machines' disks there are no files: nothing shown."""

    POLL_S = 1.0

    def __init__(self, cfg: RunConfig, show: Callable[[str], None], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.out = Path(cfg.out)
        self.show, self.clock = show, clock
        self.started = clock()
        self.completed = 0
        # the partners a round samples (Flower's FedAvg: int(n * fraction), at least the
        # minimum): those not started yet count in the steps left
        self.partners = min(cfg.clients, max(1, cfg.min_clients,
                                             int(cfg.clients * cfg.fraction_train)))
        self._stop = threading.Event()

    def round_done(self, round_id: int) -> None:
        self.completed = max(self.completed, round_id)

    def text(self) -> str:
        reports = [r for r in map(read_progress, partner_progress_files(self.out))
                   if r is not None]
        current = round_progress(reports, after=self.started, min_round=self.completed + 1)
        if current is None:
            return ""
        round_id, of_round = current
        return progress_text(round_id, of_round, self.clock(), partners=self.partners)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self._loop, name="confide-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.POLL_S):
            try:
                self.show(self.text())
            except Exception:  # a display aid: it must never end or disturb the run
                logging.getLogger(__name__).debug("progress poll failed", exc_info=True)


class QuietAfterStop(logging.Filter):
    """Once the user asked to stop, Flower's records (the killed workers' errors, the
    engine winding down) are the stop's, not the run's: left out (`--verbose` keeps
    them)."""

    def __init__(self, stopper: SignalStop) -> None:
        super().__init__()
        self.stopper = stopper

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.stopper.signalled


def write_stopped_report(out: Path, console: Console) -> None:
    """report.html / report.md of a stopped run (the audit's INCOMPLETE verdict, the rounds
    so far); a failure is one line: the run folder is what counts."""
    from confide.audit.report import write_report

    try:
        write_report(out)
    except Exception as exc:
        console.print(f"report.html could not be written: {exc} (later: confide audit "
                      f"report {out})", style="yellow", markup=False, highlight=False)


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


def interrupted_message(out: Path, reason: str, ray_address: str | None = None) -> str:
    """Where a stopped run stands (read from its folder) and the command that resumes it."""
    folder = RunFolder(out)
    entries = ledger_entries(folder)
    if finished(entries):
        return (f"the run had finished; {out} is complete (confide audit verify "
                f"{shlex.quote(str(out))})")
    if not folder.server_state.exists():
        return (f"run stopped ({reason}) before it started: nothing was spent. Start it "
                "again with the same command")
    done = next((e["payload"]["after_round"] for e in reversed(entries)
                 if e.get("type") == "run_interrupted"), None)
    if done is not None:
        where = f"after round {done}"
    else:  # left inside a round: it resumes after the last checkpointed one
        where = f"during a round; it resumes {describe_checkpoint(folder)}"
    command = ["confide", "simulate", "--resume", str(out)]
    if ray_address:
        command += ["--ray-address", ray_address]
    return (f"run stopped ({reason}) {where}. {out} is resumable and verifiable "
            f"(confide audit verify {shlex.quote(str(out))}). To continue:\n  "
            + " ".join(shlex.quote(a) for a in command))


def preflight(cfg: RunConfig, partition_rows: list[int]) -> PreflightReport | None:
    """The pre-flight check in this process, before Ray starts, so 'error' refuses with a
    plain message (the ServerApp repeats it for summary.json; calibrations are cached)."""
    if cfg.preflight == "off":
        return None
    from confide.server.federation import resolve_evaluation
    from confide.tasks import count_trainable_parameters

    _, num_labels = resolve_evaluation(cfg)
    # counted from the model's configuration: the ServerApp builds the model itself
    d = count_trainable_parameters(model_spec(cfg, num_labels))
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
