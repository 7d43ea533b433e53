"""The Flower ServerApp. `flwr run .` uses `app`; `confide simulate` builds its own with
`make_server_app` so that it can pass the resolved configuration and a progress callback."""

from __future__ import annotations

import time
from logging import ERROR
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from confide.config import RunConfig, from_run_config
from confide.privacy.preflight import PreflightRefused
from confide.server.federation import Federation, PreflightCallback, RoundCallback
from confide.server.recovery import StopRequest


def default_out_dir(cfg: RunConfig, run_id: int | None = None) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / (f"{stamp}-{run_id}" if run_id is not None else stamp)


def make_server_app(cfg: RunConfig | None = None, on_round: RoundCallback | None = None,
                    on_preflight: PreflightCallback | None = None,
                    stop: StopRequest | None = None) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or from_run_config(dict(context.run_config))
        try:
            Federation(grid, run_cfg, default_out_dir(run_cfg, context.run_id),
                       on_round=on_round, on_preflight=on_preflight, stop=stop).run()
        except PreflightRefused as exc:  # a plain message, not a traceback: nothing ran
            log(ERROR, "Confide: %s", exc)

    return server_app


app = make_server_app()
