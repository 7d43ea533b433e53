"""What client and server share about the task: the model spec and the simulation data.

Both sides build the same model from the same configuration, and in simulation both read
the same data split (the server only for evaluation and the number of classes)."""

from __future__ import annotations

from functools import lru_cache

from confide.config import RunConfig
from confide.data import FederatedData, load_federated_data
from confide.model import ModelSpec


def model_spec(cfg: RunConfig, num_labels: int) -> ModelSpec:
    return ModelSpec(model=cfg.model, num_labels=num_labels, fine_tune=cfg.fine_tune,
                     lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                     lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets,
                     seed=cfg.seed, pooling=cfg.pooling, lora_freeze_a=cfg.lora_freeze_a,
                     freeze_embeddings=cfg.freeze_embeddings)


@lru_cache(maxsize=2)
def _federated(data: str, eval_data: str, clients: int, partitioner: str, seed: int,
               alpha: float, column: str, num_labels: int, max_train: int, max_eval: int
               ) -> FederatedData:
    return load_federated_data(data=data, eval_data=eval_data, clients=clients,
                               partitioner=partitioner, seed=seed, alpha=alpha, column=column,
                               num_labels=num_labels, max_train=max_train, max_eval=max_eval)


def federated_data(cfg: RunConfig) -> FederatedData:
    return _federated(cfg.data, cfg.eval_data, cfg.clients, cfg.partitioner, cfg.seed,
                      cfg.dirichlet_alpha, cfg.partition_column, cfg.num_labels,
                      cfg.max_train_examples, cfg.max_eval_examples)
