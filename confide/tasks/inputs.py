"""What a run's client and server derive alike from its configuration: the task's model
spec and the simulation's data split.

Both sides build the same model from the same configuration, and in simulation both read
the same data split (the server only for evaluation and the number of classes)."""

from __future__ import annotations

from functools import lru_cache

from confide.config import RunConfig
from confide.data import FederatedData, load_federated_data
from confide.model import ModelSpec
from confide.tasks import CLASSIFICATION, get_task


def model_spec(cfg: RunConfig, num_labels: int) -> ModelSpec:
    return get_task(cfg).model_spec(num_labels)


@lru_cache(maxsize=2)
def _federated(data: str, eval_data: str, clients: int, partitioner: str, seed: int,
               alpha: float, column: str, num_labels: int, max_train: int, max_eval: int,
               reader_cfg: RunConfig | None = None) -> FederatedData:
    # classification keeps data.py's own reader (and its synthetic demo corpus)
    reader = get_task(reader_cfg).read if reader_cfg is not None else None
    return load_federated_data(data=data, eval_data=eval_data, clients=clients,
                               partitioner=partitioner, seed=seed, alpha=alpha, column=column,
                               num_labels=num_labels, max_train=max_train, max_eval=max_eval,
                               reader=reader)


def federated_data(cfg: RunConfig) -> FederatedData:
    return _federated(cfg.data, cfg.eval_data, cfg.clients, cfg.partitioner, cfg.seed,
                      cfg.dirichlet_alpha, cfg.partition_column, cfg.num_labels,
                      cfg.max_train_examples, cfg.max_eval_examples,
                      data_reader_config(cfg))


def data_reader_config(cfg: RunConfig) -> RunConfig | None:
    """Only what the task's reader depends on, so the data cache key stays small."""
    if cfg.task == CLASSIFICATION:
        return None
    return RunConfig(task=cfg.task, prompt_column=cfg.prompt_column,
                     completion_column=cfg.completion_column)
