"""FedAvg over deltas of the trainable parameters, with a server learning rate.

Nodes send `new - global` for the trainable parameters only. The server takes the
example-weighted mean of the deltas and moves the global weights by
`server_learning_rate * mean_delta` (FedAvg when the rate is 1), or, with a
`ServerOptimizer`, by one FedAvgM / FedAdam / FedYogi step (Reddi et al. 2021's FedOpt).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from confide import wire as W
from confide.strategies.server_optimizer import ServerOptimizer


class UpdateRejected(ValueError):
    """A node's update cannot be aggregated (wrong shape, non-finite, missing weight)."""


arrays_to_numpy = W.from_array_record


def validate_delta(delta: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                   node: str) -> None:
    if set(delta) != set(reference):
        missing = sorted(set(reference) - set(delta))[:3]
        extra = sorted(set(delta) - set(reference))[:3]
        raise UpdateRejected(f"update from {node}: parameter names differ from the global "
                             f"model (missing {missing}, unexpected {extra})")
    for name, ref in reference.items():
        value = delta[name]
        if value.shape != ref.shape:
            raise UpdateRejected(f"update from {node}: {name} has shape {value.shape}, "
                                 f"expected {ref.shape}")
        if not np.issubdtype(value.dtype, np.floating):
            raise UpdateRejected(f"update from {node}: {name} has dtype {value.dtype}")
        if not np.all(np.isfinite(value)):
            raise UpdateRejected(f"update from {node}: {name} contains NaN or infinity")


def reply_weight(reply: Message) -> float:
    weight = W.reported_rows(reply)
    if weight is None:
        raise UpdateRejected(f"update from node {reply.metadata.src_node_id}: "
                             f"{W.NUM_EXAMPLES} = {W.reported_num_examples(reply)!r} is not "
                             "a positive number")
    return weight


class DeltaFedAvg(FedAvg):
    """FedAvg whose nodes send deltas; aggregate_train returns the new global weights."""

    def __init__(self, *, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, server_learning_rate: float = 1.0,
                 server_optimizer: ServerOptimizer | None = None) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=0,
                         min_available_nodes=min_available_nodes,
                         weighted_by_key=W.NUM_EXAMPLES, arrayrecord_key=W.ARRAYS,
                         configrecord_key=W.CONFIG)
        # every path that moves the global weights (plain, client-level DP, secure sum)
        # goes through `apply`, hence through this one optimizer and its moments
        self.optimizer = server_optimizer or ServerOptimizer(
            "sgd", learning_rate=server_learning_rate)
        self.global_state: dict[str, np.ndarray] = {}
        self.rejected: list[tuple[int, str]] = []

    @property
    def server_learning_rate(self) -> float:
        return self.optimizer.learning_rate  # one source of truth: the optimizer's

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid, cohort: Sequence[int] | None = None) -> Iterable[Message]:
        """One train message per node of `cohort` (in its order), carrying `arrays` and
        `config`. The cohort is the round's sample (confide.server.cohort): this strategy
        samples nothing itself."""
        if cohort is None:
            raise ValueError("DeltaFedAvg.configure_train needs the round's cohort (the "
                             "server samples it: confide.server.cohort.sample_cohort)")
        self.global_state = arrays_to_numpy(arrays)
        config[W.ROUND] = server_round  # as Flower's strategies inject it
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, list(cohort), MessageType.TRAIN)

    def valid_updates(self, replies: Iterable[Message]
                      ) -> list[tuple[Message, dict[str, np.ndarray], float]]:
        """Replies whose update can be aggregated; the others are logged and kept in
        `rejected` (node id, reason) so the round goes on without them."""
        self.rejected = []
        out = []
        for reply in replies:
            node = f"node {reply.metadata.src_node_id}"
            try:
                if reply.has_error():
                    raise UpdateRejected(f"{node} failed: {reply.error.reason}")
                delta = arrays_to_numpy(reply.content[W.ARRAYS])
                validate_delta(delta, self.global_state, node)
                out.append((reply, delta, reply_weight(reply)))
            except (UpdateRejected, KeyError) as exc:
                log(WARNING, "round: update rejected: %s", exc)
                self.rejected.append((reply.metadata.src_node_id, str(exc)))
        return out

    def mean_delta(self, updates: list[tuple[Message, dict[str, np.ndarray], float]]
                   ) -> dict[str, np.ndarray]:
        total = sum(w for _, _, w in updates)
        return {name: sum((w / total) * d[name].astype(np.float64) for _, d, w in updates)
                for name in self.global_state}

    def step(self, global_state: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
        """The weights after one server-optimizer step from `global_state` along
        `mean_delta` (float32, as sent to the nodes): every path that moves the global
        weights goes through here."""
        new = self.optimizer.step(dict(global_state), dict(mean_delta))
        return {k: v.astype(np.float32) for k, v in new.items()}

    def apply(self, mean_delta: dict[str, np.ndarray]) -> ArrayRecord:
        """`step` from the weights of this round's train messages."""
        return W.to_array_record(self.step(self.global_state, mean_delta))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates = self.valid_updates(replies)
        if not updates:
            return None, None
        metrics = MetricRecord({W.NUM_EXAMPLES: sum(w for _, _, w in updates),
                                "num-aggregated": len(updates)})
        return self.apply(self.mean_delta(updates)), metrics
