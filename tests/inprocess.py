"""A Grid that delivers train messages to the real ClientApp in this process (no Ray, no
SuperLink): whole federations in a second or two, for tests of the server's round loop,
resume and recovery. Each node keeps its Flower Context (and so its budget) across runs."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from confide import wire as W
from confide.clients import client_app
from confide.clients.identity import enrol
from confide.config import RunConfig, build_config, from_flat_record

_ids = itertools.count(1)


def tiny_secure_config(out: Path, clients: int, rounds: int, seed: int) -> RunConfig:
    """A tiny-model run with secure aggregation (so, by default, shared example noise)."""
    return build_config({"model": "tiny", "clients": clients, "rounds": rounds,
                         "max-length": 16, "num-labels": 2, "batch-size": 32,
                         "physical-batch-size": 32, "secure-aggregation": True,
                         "preflight": "off", "seed": seed, "out": str(out)})


def set_task_identity() -> None:
    # Messages outside a Flower runtime need a run/task identity to be constructed.
    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0


class InProcessGrid:
    def __init__(self, nodes: int, state_root: Path | None = None,
                 num_partitions: int | None = None) -> None:
        """`nodes` partners, node ids 1..n, partition i-1 of the run data each. With
        `state_root`, node i keeps its state on disk in state_root/node-i (as deployed
        partners do, across runs); else in the run folder (as simulated partners do)."""
        set_task_identity()
        self.contexts: dict[int, Context] = {}
        for i in range(1, nodes + 1):
            config: dict[str, object] = {"partition-id": i - 1,
                                         "num-partitions": num_partitions or nodes}
            if state_root is not None:
                config["state-dir"] = str(state_root / f"node-{i}")
            self.contexts[i] = Context(run_id=1, node_id=i, node_config=config,
                                       state=RecordDict(), run_config={})
        self.fail_on: set[int] = set()  # nodes whose next message raises (tests set it)
        self.state_root = state_root
        self.sent: list[Message] = []  # every message delivered, in order

    def _enrol(self, msg: Message) -> None:
        """Deployed partners (state_root): create their identities and the federation
        roster before the first message, as each partner and the operator would."""
        if self.state_root is None:
            return
        roster = self.state_root / "roster.txt"
        if not roster.is_file():  # the same partners in a later run keep their roster
            cfg = from_flat_record(dict(msg.content[W.CONFIG]))
            lines = [enrol(Path(str(c.node_config["state-dir"])), delta=cfg.delta,
                           max_epsilon=cfg.max_epsilon) for c in self.contexts.values()]
            roster.write_text("\n".join(lines) + "\n")
        for c in self.contexts.values():
            c.node_config.setdefault("federation-roster", str(roster))

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self._enrol(msg)
            self.sent.append(msg)
            # a fresh id per delivery, as Flower's (its ids hash the creation time): unique
            # across processes too (a resumed server is another process, and the nodes'
            # state on disk remembers the ids they handled)
            msg.metadata.__dict__["_message_id"] = f"msg-{os.getpid()}-{next(_ids)}"
            node = msg.metadata.dst_node_id
            try:
                handler = {"train.secagg": client_app.secagg_stage,
                           "train.receipts": client_app.receipts}.get(
                    msg.metadata.message_type, client_app.train)
                reply = handler(msg, self.contexts[node])
            except Exception as exc:  # the runtime turns a ClientApp exception into an error
                reply = Message(Error(code=0, reason=str(exc)), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def copy_message(msg: Message) -> Message:
    """The same content to the same node as a new message (a re-send gets a new id)."""
    return Message(content=msg.content, dst_node_id=msg.metadata.dst_node_id,
                   message_type=msg.metadata.message_type)
