"""The Flower ServerApp. `flwr run .` uses `app`; `confide simulate` builds its own with
`make_server_app` so that it can pass the resolved configuration and a progress callback."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Iterable
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.common.logger import log
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from confide.config import ConfigError, RunConfig, from_run_config
from confide.logs import deployed_process_logging
from confide.privacy.preflight import PreflightRefused
from confide.server.exchange import is_simulation
from confide.server.federation import Federation, PreflightCallback, RoundCallback
from confide.server.recovery import (
    Aborted,
    EveryPartnerFailed,
    NoBudgetLeft,
    RunWriteError,
    StopRequest,
)
from confide.server.run_folder import CheckpointError
from confide.server.run_table import final_table

# The one line `confide deploy run` shows when a deployed run fails (and exits non-zero).
FAILURE_PREFIX = "Confide: error: "
# Problems with a message that names them (bad configuration or data, a run folder in use,
# a checkpoint that cannot be resumed, no partner budget left, a full disk): shown as that
# message, never as a traceback. Anything else is a bug and keeps its traceback.
KNOWN_FAILURES = (ConfigError, FileExistsError, FileNotFoundError, NoBudgetLeft,
                  EveryPartnerFailed, RunWriteError, CheckpointError, ValueError)


class RunFailed(RuntimeError):
    """A deployed run stopped for a reason its message names; Flower marks the run failed."""


def default_out_dir(cfg: RunConfig, run_id: int | None = None) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / (f"{stamp}-{run_id}" if run_id is not None else stamp)


def make_server_app(cfg: RunConfig | None = None, on_round: RoundCallback | None = None,
                    on_preflight: PreflightCallback | None = None,
                    stop: StopRequest | None = None,
                    failures: list[Exception] | None = None) -> ServerApp:
    """`failures`: a driver's list that receives a known failure (KNOWN_FAILURES) instead
    of Flower's traceback; the driver reports it."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is None:  # deployed (`flwr run`): each line once, known notices filtered
            deployed_process_logging()
        if stop is not None:  # a driver that can abort: waits end when it does
            grid = AbortableGrid(grid, stop)
        try:
            run_cfg = cfg or from_run_config(dict(context.run_config))
            out = default_out_dir(run_cfg, context.run_id)
            # `flwr run` in Flower's simulation engine: no driver of ours ends the console
            # (`confide deploy run` shows its own), so the ServerApp says where and what
            console = cfg is None and is_simulation(grid)
            if console:
                log(INFO, "Confide: run folder %s", out.resolve())
            result = Federation.open(grid, run_cfg, out, on_round=on_round,
                                     on_preflight=on_preflight, stop=stop).run()
            if console and not result.get("interrupted"):
                show_final_table(out, result)
        except Aborted:
            if stop is None:
                raise
            return  # the driver stopped the run (a signal, its engine failed) and says so
        except PreflightRefused as exc:  # a plain message, not a traceback: nothing ran
            if cfg is not None:
                log(ERROR, "Confide: %s", exc)
                return
            log(ERROR, "%s%s", FAILURE_PREFIX, exc)
            raise RunFailed(str(exc)) from None
        except KNOWN_FAILURES as exc:
            if cfg is not None:  # `confide simulate` reports it itself
                if failures is None:
                    raise
                failures.append(exc)
                return
            # Deployed: one line that names the problem; the run is marked failed (Flower
            # then logs the exception, which `confide deploy run` leaves out)
            log(ERROR, "%s%s", FAILURE_PREFIX, exc)
            raise RunFailed(str(exc)) from None

    return server_app


def show_final_table(out: Path, summary: dict[str, Any]) -> None:
    """The table `confide simulate` ends with, on the ServerApp's output (streamed by
    `flwr run --stream`), and where the report comes from."""
    from rich.console import Console

    console = Console(file=sys.stdout, width=80)
    console.print(final_table(out.resolve(), summary))
    console.print(f"Run folder {out.resolve()}; its report: confide audit report "
                  f"{shlex.quote(str(out.resolve()))}", markup=False, highlight=False,
                  soft_wrap=True)


app = make_server_app()


class AbortableGrid(Grid):
    """A Grid whose waits end when the driver aborts the run (StopRequest.abort).

    Flower runs the ServerApp in a thread of its own; when the simulation engine crashes,
    that thread would otherwise wait out its reply timeout and keep the process alive."""

    def __init__(self, inner: Grid, stop: StopRequest, pull_interval: float = 0.1) -> None:
        self.inner = inner
        self.stop = stop
        self.pull_interval = pull_interval

    def _check(self) -> None:
        if self.stop.aborted:
            raise Aborted(f"run aborted by its driver: {self.stop.reason}")

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        self._check()
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._check()
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Flower's InMemoryGrid.send_and_receive, checking for an abort between pulls."""
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self.pull_interval)
        return replies
