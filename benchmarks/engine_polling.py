"""One poll of Flower 1.41's simulation engine: Flower's loop against Confide's.

Flower's `vce_api.add_messages_to_queue` asks the link state for every registered node's
next message every 0.1 s; `confide.simulation.engine_polling` asks only for the nodes with an
undelivered message, found in one pass over the stored messages. This times one poll of each
on the same real `InMemoryLinkState` (built as `run_simulation` builds it, nodes registered by
Flower's `_register_nodes`, messages pushed through Flower's `InMemoryGrid`), no training:

  delivery  the messages were just pushed, none delivered yet: the poll hands them all out
            (once per round)
  steady    every message delivered, replies not back yet: what the engine does every 0.1 s
            while the sampled partners train

Times are CPU time of the polling thread (`time.thread_time`, so a busy machine does not
inflate them), median of the repeats; "core" is the share of one core the poller takes at
Flower's 0.1 s interval (t / (t + 100 ms)).

    python benchmarks/engine_polling.py                  # 100 and 1,000 nodes, 10 and 100 messages
    python benchmarks/engine_polling.py --nodes 1000 --messages 100 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from queue import Queue
from typing import cast

from flwr.app import Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from confide.simulation import engine_polling

Poll = Callable[[InMemoryLinkState, "Queue[Message]", dict[int, int]], None]
INTERVAL_MS = 1000 * engine_polling.POLL_INTERVAL_S


def link_state(nodes: int, messages: int) -> tuple[InMemoryLinkState, dict[int, int]]:
    """A fresh in-memory link state with `nodes` registered nodes and one undelivered
    message for each of the first `messages` of them (as a round's sampled partners)."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    state = cast(InMemoryLinkState, factory.state())
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    mapping = vce_api._register_nodes(num_nodes=nodes, state_factory=factory)
    # Message() reads the process's task identity, as run_simulation sets it
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = \
        1, run.run_id, SUPERLINK_NODE_ID
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    pushed = grid.push_messages([Message(RecordDict(), dst_node_id=node_id, message_type="train")
                                 for node_id in list(mapping)[:messages]])
    assert len(list(pushed)) == messages
    return state, mapping


def cpu_ms(poll: Poll, state: InMemoryLinkState, mapping: dict[int, int]) -> tuple[float, int]:
    """CPU milliseconds of one poll, and the number of messages it queued."""
    queue: Queue[Message] = Queue()
    start = time.thread_time()
    poll(state, queue, mapping)
    return 1000 * (time.thread_time() - start), queue.qsize()


def measure(poll: Poll, nodes: int, messages: int, repeats: int) -> tuple[float, float]:
    """Median CPU ms of a delivery poll (fresh state each time) and of a steady poll."""
    delivery, steady = [], []
    for _ in range(repeats):
        state, mapping = link_state(nodes, messages)
        ms, queued = cpu_ms(poll, state, mapping)
        assert queued == messages, (queued, messages)  # every message handed out, once
        delivery.append(ms)
    for _ in range(repeats):  # on the last state: all delivered, replies pending
        ms, queued = cpu_ms(poll, state, mapping)
        assert queued == 0
        steady.append(ms)
    return statistics.median(delivery), statistics.median(steady)


def core(ms: float) -> str:
    return f"{100 * ms / (ms + INTERVAL_MS):.0f}%"


def ratio(flower: float, ours: float) -> str:
    r = flower / ours
    return f"{r:.1f}x" if r < 10 else f"{r:,.0f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="100,1000", help="registered nodes, comma-separated")
    ap.add_argument("--messages", default="10,100", help="messages in flight, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"one poll of Flower {engine_polling.FLOWER_VERSION}'s simulation engine, CPU ms "
          f"(median of {args.repeats}); core = share of one core at a "
          f"{INTERVAL_MS:.0f} ms interval\n")
    print("| nodes | messages | poll | Flower ms (core) | Confide ms (core) | Flower / Confide |")
    print("|---|---|---|---|---|---|")
    for nodes in (int(n) for n in args.nodes.split(",")):
        for messages in (int(m) for m in args.messages.split(",")):
            if messages > nodes:
                continue
            flower = measure(engine_polling.flower_poll_once, nodes, messages, args.repeats)
            ours = measure(engine_polling.poll_once, nodes, messages, args.repeats)
            for name, f, o in zip(("delivery", "steady"), flower, ours, strict=True):
                print(f"| {nodes:,} | {messages} | {name} | {f:.2f} ({core(f)}) | "
                      f"{o:.3f} ({core(o)}) | {ratio(f, o)} |", flush=True)


if __name__ == "__main__":
    main()
