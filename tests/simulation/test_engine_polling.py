"""confide.simulation.engine_polling against Flower 1.41's own poller, on a real
InMemoryLinkState built as Flower's run_simulation builds it (no Ray, no training)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from queue import Empty, Queue
from typing import Any, cast

import flwr
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend.backend import Backend
from flwr.server.superlink.fleet.vce.metrics import VceMetrics
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

NODES = 60  # registered and in the engine's mapping
OUTSIDERS = 2  # registered in the state, not in the mapping


@dataclass
class Link:
    """A link state as Flower's simulation sets it up, plus the tag of each pushed message."""

    factory: LinkStateFactory
    state: InMemoryLinkState
    run: Run
    grid: InMemoryGrid
    mapping: dict[int, int]  # node id -> partition, what the engine polls
    outsiders: list[int]
    tags: dict[str, str] = field(default_factory=dict)  # message id -> tag

    @property
    def nodes(self) -> list[int]:
        return list(self.mapping)

    def push(self, node_id: int, tag: str, ttl: float | None = None) -> Message:
        TaskIdentity.run_id = self.run.run_id  # Message() reads it (restored by the fixture)
        content = RecordDict({"tag": ConfigRecord({"tag": tag})})
        msg = Message(content, dst_node_id=node_id, message_type="train", ttl=ttl)
        (msg_id,) = self.grid.push_messages([msg])  # Flower's own path into the state
        self.tags[msg_id] = tag
        return msg


@pytest.fixture
def make_link(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Link]:
    """Builds link states like flwr.simulation.run_simulation._main_loop and vce_api do."""

    def build() -> Link:
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                                   ObjectStoreFactory())
        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        run.federation_id = NOOP_FEDERATION_ID
        state = cast(InMemoryLinkState, factory.state())
        state.run_ids[run.run_id] = RunRecord(run=run)
        state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id,
                                                     run_id=run.run_id)
        registered = vce_api._register_nodes(num_nodes=NODES + OUTSIDERS, state_factory=factory)
        ids = list(registered)
        # Message() takes run and source from the process's task identity, as in
        # run_simulation; monkeypatch restores it after the test
        monkeypatch.setattr(TaskIdentity, "_task_id", 1)
        monkeypatch.setattr(TaskIdentity, "_run_id", run.run_id)
        monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
        grid = InMemoryGrid(state_factory=factory)
        grid.set_run(run)
        return Link(factory, state, run, grid, {i: registered[i] for i in ids[:NODES]},
                    ids[NODES:])

    return build


def fill(link: Link) -> None:
    """Messages for some of the nodes: one each for 12 nodes, two for 3 of them (one per
    poll), one already delivered, one expired, one each for the nodes outside the mapping."""
    nodes = link.nodes
    for i in range(0, 48, 4):
        link.push(nodes[i], f"n{i}-a")
    for i in (0, 8, 40):
        link.push(nodes[i], f"n{i}-b")
    delivered = link.push(nodes[50], "n50-delivered")
    delivered.metadata.delivered_at = "2025-01-01T00:00:00+00:00"
    link.push(nodes[51], "n51-expired", ttl=0.001)
    for j, node_id in enumerate(link.outsiders):
        link.push(node_id, f"outsider{j}")
    time.sleep(0.01)  # n51's message has expired by the first poll


def drain(queue: Queue[Message]) -> list[Message]:
    out = []
    while True:
        try:
            out.append(queue.get_nowait())
        except Empty:
            return out


def tags(link: Link, msgs: list[Message]) -> list[str]:
    return [link.tags[m.metadata.message_id] for m in msgs]


def polls(link: Link, poll: Callable[[Any, Queue[Message], dict[int, int]], None],
          n: int) -> list[list[Message]]:
    queue: Queue[Message] = Queue()
    out = []
    for _ in range(n):
        poll(link.state, queue, link.mapping)
        out.append(drain(queue))
    return out


def count_calls(monkeypatch: pytest.MonkeyPatch, state: InMemoryLinkState) -> list[int]:
    """Node ids of every get_message_ins call; the real method still runs (a wrapper)."""
    calls: list[int] = []
    real = state.get_message_ins

    def counting(node_id: int, limit: int | None, **kwargs: Any) -> list[Message]:
        calls.append(node_id)
        return real(node_id=node_id, limit=limit, **kwargs)

    monkeypatch.setattr(state, "get_message_ins", counting)
    return calls


def test_patched_poll_puts_exactly_what_flowers_poll_puts(make_link: Callable[[], Link]) -> None:
    flower, ours = make_link(), make_link()
    fill(flower)
    fill(ours)
    want = polls(flower, engine_polling.flower_poll_once, 3)
    got = polls(ours, engine_polling.poll_once, 3)
    assert [tags(flower, p) for p in want] == [tags(ours, p) for p in got]
    assert tags(ours, got[0]) == [f"n{i}-a" for i in range(0, 48, 4)]
    assert tags(ours, got[1]) == ["n0-b", "n8-b", "n40-b"]
    assert got[2] == []
    delivered = [m for p in got for m in p]
    assert len({m.metadata.message_id for m in delivered}) == len(delivered) == 15  # each once
    assert all(m.metadata.delivered_at != "" for m in delivered)
    for link in (flower, ours):
        stored = {link.tags[i]: m for i, m in link.state.message_ins_store.items()}
        assert "n51-expired" not in stored  # deleted by Flower's expiry check, never queued
        # messages to nodes the engine does not run stay undelivered
        assert [stored[f"outsider{j}"].metadata.delivered_at for j in range(OUTSIDERS)] == \
            [""] * OUTSIDERS


def test_nodes_without_a_message_are_never_queried(make_link: Callable[[], Link],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    link = make_link()
    fill(link)
    calls = count_calls(monkeypatch, link.state)
    engine_polling.poll_once(link.state, Queue(), link.mapping)
    nodes = link.nodes
    assert calls == [nodes[i] for i in range(0, 48, 4)]
    calls.clear()
    engine_polling.poll_once(link.state, Queue(), link.mapping)
    assert calls == [nodes[0], nodes[8], nodes[40]]
    calls.clear()
    engine_polling.poll_once(link.state, Queue(), link.mapping)
    assert calls == []  # nothing pending: no node is asked
    engine_polling.flower_poll_once(link.state, Queue(), link.mapping)
    assert calls == nodes  # the wrapper sees Flower's loop ask every node


def test_other_state_classes_get_flowers_loop(make_link: Callable[[], Link],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    class OtherState(InMemoryLinkState):
        """May keep its messages elsewhere: the one-pass scan must not assume the layout."""

    link = make_link()
    fill(link)
    link.state.__class__ = OtherState
    calls = count_calls(monkeypatch, link.state)
    queue: Queue[Message] = Queue()
    engine_polling.poll_once(link.state, queue, link.mapping)
    assert calls == link.nodes
    assert tags(link, drain(queue)) == [f"n{i}-a" for i in range(0, 48, 4)]
    # the loop itself is Flower's: it asks every node
    calls.clear()
    f_stop = threading.Event()
    loop = threading.Thread(target=engine_polling.add_messages_to_queue,
                            args=(link.state, queue, link.mapping, f_stop))
    loop.start()
    try:
        assert tags(link, [queue.get(timeout=30) for _ in range(3)]) == \
            ["n0-b", "n8-b", "n40-b"]
    finally:
        f_stop.set()
        loop.join(timeout=30)
    assert calls[:NODES] == link.nodes


class EchoBackend(Backend):
    """Stands in for Ray: answers each instruction with an empty reply, in the worker."""

    def __init__(self) -> None:
        super().__init__({})

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        pass

    @property
    def num_workers(self) -> int:
        return 2

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        return Message(RecordDict(), reply_to=message), context


@pytest.fixture
def flower_poller(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's own poller in vce_api for the test, whatever an earlier test applied; the
    module attribute is restored afterwards."""
    monkeypatch.setattr(vce_api, "add_messages_to_queue",
                        engine_polling.flower_add_messages_to_queue())
    yield


@pytest.mark.usefixtures("flower_poller")
def test_apply_replaces_the_poller_run_api_starts(make_link: Callable[[], Link],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert flwr.__version__ == engine_polling.FLOWER_VERSION  # the pin this patch is for
    assert engine_polling.apply()
    assert engine_polling.apply()  # idempotent
    assert vce_api.add_messages_to_queue is engine_polling.add_messages_to_queue
    assert engine_polling.flower_add_messages_to_queue().__module__ == vce_api.__name__
    # Flower's engine, unchanged but for the poller: it delivers every message and stores
    # every reply, and nodes without a message are never asked
    link = make_link()
    sent = [link.push(link.nodes[i], f"n{i}") for i in range(0, NODES, 6)]
    calls = count_calls(monkeypatch, link.state)
    f_stop = threading.Event()
    stores = vce_api._register_node_info_stores(link.mapping, link.run)
    engine = threading.Thread(target=vce_api.run_api, args=(
        lambda: ClientApp(), EchoBackend, link.mapping, link.factory, stores, f_stop,
        VceMetrics()))
    engine.start()
    try:
        deadline = time.monotonic() + 30
        while (len(link.state.message_ins_id_to_message_res_id) < len(sent)
               and time.monotonic() < deadline):
            time.sleep(0.05)
    finally:
        f_stop.set()
        engine.join(timeout=30)
    assert not engine.is_alive()
    assert set(link.state.message_ins_id_to_message_res_id) == \
        {m.metadata.message_id for m in sent}
    assert set(calls) == {m.metadata.dst_node_id for m in sent}


@pytest.mark.usefixtures("flower_poller")
def test_not_applied_for_another_flower_version(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    flowers = vce_api.add_messages_to_queue
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    with caplog.at_level(logging.DEBUG, logger=engine_polling.__name__):
        assert not engine_polling.apply()
    assert vce_api.add_messages_to_queue is flowers
    assert flowers.__module__ == vce_api.__name__  # Flower's own, not Confide's
    assert "1.42.0" in caplog.text and "not applied" in caplog.text


def test_a_poller_installed_by_someone_else_is_left_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def theirs(*_: object) -> None:
        pass

    monkeypatch.setattr(vce_api, "add_messages_to_queue", theirs)
    assert not engine_polling.apply()
    assert vce_api.add_messages_to_queue is theirs
