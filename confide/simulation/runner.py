"""`confide simulate`: the app in Flower's simulation engine (Ray) with N virtual partners."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from confide.clients.client_app import federated_data
from confide.config import RunConfig
from confide.server.server_app import default_out_dir, make_server_app


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """One CPU per virtual partner (so 2 cores train 2 partners at once); a GPU is shared."""
    import torch

    gpus = 0.0
    if cfg.device != "cpu" and torch.cuda.is_available():
        gpus = 1.0 / min(cfg.clients, 4)
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
            "init_args": {"num_cpus": os.cpu_count() or 1, "log_to_driver": False,
                          "include_dashboard": False}}


def simulate(cfg: RunConfig, *, console: Console | None = None, verbose: bool = False
             ) -> tuple[Path, dict[str, Any]]:
    from flwr.simulation import run_simulation

    from confide.clients.client_app import app as client_app

    console = console or Console()
    out = default_out_dir(cfg)
    if cfg.resume:
        if not (out / "checkpoint" / "server_state.json").exists():
            raise FileNotFoundError(f"--resume: no checkpoint in {out}/checkpoint to resume")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"run folder {out} is not empty; choose another --out "
                              "(a finished run is never overwritten)")
    cfg = cfg.replace(out=str(out))
    # Validate data up front, in this process: errors name file and row before Ray starts.
    fed = federated_data(cfg)
    if fed.synthetic:
        console.print("[yellow]No --data given: using the SYNTHETIC offline demo corpus "
                      "(generated template reviews, not real data).[/yellow]")
    console.print(f"Confide simulation: {cfg.clients} partners, {cfg.rounds} rounds, model "
                  f"{cfg.model} ({cfg.fine_tune}), example-level DP "
                  f"{'on' if cfg.example_dp else 'OFF'}, run folder {out}")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    with Progress(TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("starting partners", total=cfg.rounds)

        def on_round(row: dict[str, Any]) -> None:
            eps = row["epsilon_example_level"]
            worst = max(eps.values()) if eps else 0.0
            progress.update(task, advance=1, description=(
                f"acc {row['accuracy']:.3f} loss {row['loss']:.3f} "
                f"max eps {worst:.2f} aggregated {row['num_clients_aggregated']}"
                f"/{row['num_clients_sampled']}"))

        run_simulation(server_app=make_server_app(cfg, on_round=on_round),
                       client_app=client_app, num_supernodes=cfg.clients,
                       backend_config=backend_config(cfg), verbose_logging=verbose)
    summary_path = out / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log")
    summary = json.loads(summary_path.read_text())
    console.print(final_table(out, summary))
    return out, summary


def final_table(out: Path, summary: dict[str, Any]) -> Table:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    table = Table(title=f"Confide run {out}" + (" [SYNTHETIC demo data]"
                                                 if summary.get("synthetic_data") else ""))
    table.add_column("round", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("aggregated", justify="right")
    table.add_column("epsilon per partner (cumulative)")
    table.add_column("bytes uploaded", justify="right")
    for r in rows:
        eps = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(r["epsilon_example_level"].items()))
        if r.get("epsilon_client_level") is not None:
            eps += f" | client-level {r['epsilon_client_level']:.2f}"
        table.add_row(str(r["round"]), f"{r['accuracy']:.4f}", f"{r['loss']:.4f}",
                      f"{r['num_clients_aggregated']}/{r['num_clients_sampled']}", eps or "-",
                      f"{r['bytes_uploaded']:,}")
    priv = summary["privacy"]
    table.caption = (f"delta = {priv['delta']}; example-level DP per partner, add/remove-one-"
                     f"record adjacency, cumulative over the run; accountant: "
                     f"{priv['accountant']}")
    return table
