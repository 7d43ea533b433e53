"""The records a partner node trains on: its own file in deployment, its partition of the
run's data in simulation (read once per process)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import Context

from confide.clients.policy import NodeConfigError
from confide.config import RunConfig
from confide.data import TextDataset
from confide.tasks import get_task
from confide.tasks.inputs import data_reader_config, federated_data


def partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def partner_data(cfg: RunConfig, context: Context) -> TextDataset:
    """Deployment: the node's own `data-path`. Simulation: its partition of the run data."""
    path = context.node_config.get("data-path")
    if path:
        return _read_cached(str(path), cfg.num_labels, cfg.max_train_examples,
                            data_reader_config(cfg))
    pid = partition_id(context)
    # Flower's simulation says how many virtual partners there are; `clients` may differ
    # (e.g. `flwr run .` with the engine's default number of SuperNodes).
    num = int(context.node_config.get("num-partitions", cfg.clients))
    parts = _simulation_partitions(cfg.replace(clients=num) if num != cfg.clients else cfg)
    if not 0 <= pid < len(parts):
        raise NodeConfigError(f"partition-id {pid} is outside 0..{len(parts) - 1}")
    return parts[pid]


@lru_cache(maxsize=4)
def _read_cached(path: str, num_labels: int, max_rows: int,
                 reader_cfg: RunConfig | None = None) -> TextDataset:
    # the task reads its own file format (text,label or prompt,completion)
    return get_task(reader_cfg or RunConfig()).read(Path(path), num_labels=num_labels,
                                                    max_rows=max_rows)


def _simulation_partitions(cfg: RunConfig) -> list[TextDataset]:
    return federated_data(cfg).partitions
