"""A cheaper message poller for Flower 1.41.0's simulation engine.

Why: Flower 1.41's simulation engine hands instructions to its workers from one thread,
`vce_api.add_messages_to_queue`, which every 0.1 s calls
`state.get_message_ins(node_id, limit=1)` for EVERY registered node; with Flower's
`InMemoryLinkState` each such call walks every stored message (and runs
`_check_stored_messages` on each). One poll therefore costs O(registered nodes x messages in
flight): with 1,000 partners and 100 sampled per round, 100,000 message checks per poll, about
one of two cores spent polling instead of training (benchmarks/results/scale.md).

What this does: per poll, one pass over the link state's stored messages (under its lock)
runs Flower's own expiry and federation check on all of them and collects the destination
nodes of the undelivered ones; then the real `state.get_message_ins(node_id, limit=1)` is
called for those nodes only, in Flower's node order. Delivery, the `delivered_at` marking and
the expiry checks stay Flower's code; the queue receives the same messages in the same order
as Flower's loop would put them. Any state class other than `InMemoryLinkState` (exactly; a
subclass may store messages elsewhere) gets Flower's own loop unchanged.

Scope: `apply()` replaces the module attribute `vce_api.add_messages_to_queue`, which
`vce_api.run_api` looks up when it starts the poller thread, so it must run before
`run_simulation`. It is applied only when `flwr.__version__ == "1.41.0"`: the pass reads
`InMemoryLinkState`'s private `message_ins_store`, `lock` and `_check_stored_messages`,
which another Flower version may change; there Flower is left alone (and nothing of
Flower's internals is imported here, so a version that moved them cannot break a run).

What upstream would need: an index of undelivered instruction messages by destination node
in `InMemoryLinkState` (filled by `store_message_ins`, emptied on delivery and deletion), or
a `LinkState` method returning the nodes with pending messages, so that the engine polls
those nodes only (or gets all pending messages in one call).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from queue import Queue
from typing import TYPE_CHECKING, TypeGuard

import flwr

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState

log = logging.getLogger(__name__)

FLOWER_VERSION = "1.41.0"  # the only version whose link state internals this pass reads
POLL_INTERVAL_S = 0.1  # Flower's own interval between polls (vce_api.add_messages_to_queue)
VCE_API = "flwr.server.superlink.fleet.vce.vce_api"  # the module whose poller is replaced

# Flower's signature (vce_api.NodeToPartitionMapping is dict[int, int]: node id -> partition)
Poller = Callable[["LinkState", "Queue[Message]", dict[int, int], threading.Event], None]

_flower_poller: list[Poller] = []  # Flower's own add_messages_to_queue, kept by apply()


def _is_flowers_own(poller: object) -> bool:
    return (getattr(poller, "__module__", None) == VCE_API
            and getattr(poller, "__qualname__", None) == "add_messages_to_queue")


def flower_add_messages_to_queue() -> Poller:
    """Flower's own `vce_api.add_messages_to_queue`, whether or not `apply()` replaced it."""
    from flwr.server.superlink.fleet.vce import vce_api

    current: Poller = vce_api.add_messages_to_queue
    return _flower_poller[0] if current is add_messages_to_queue else current


def flower_poll_once(state: LinkState, queue: Queue[Message],
                     nodes_mapping: dict[int, int]) -> None:
    """One pass of Flower 1.41's `add_messages_to_queue` loop body, verbatim (the reference)."""
    for node_id in nodes_mapping:
        for msg in state.get_message_ins(node_id=node_id, limit=1):
            queue.put(msg)


def nodes_with_pending_messages(state: InMemoryLinkState) -> set[int]:
    """Destination nodes of the undelivered, unexpired instruction messages in `state`:
    one pass over the stored messages under the state's lock."""
    with state.lock:
        # Flower's own check, once over all messages: Flower's loop runs it on every stored
        # message during each poll (through get_message_ins), deleting expired ones
        state._check_stored_messages(set(state.message_ins_store))
        return {msg.metadata.dst_node_id for msg in state.message_ins_store.values()
                if msg.metadata.delivered_at == ""}


def _is_in_memory(state: LinkState) -> TypeGuard[InMemoryLinkState]:
    from flwr.server.superlink.linkstate import InMemoryLinkState

    # exactly the class: a subclass may keep its messages elsewhere
    return type(state) is InMemoryLinkState


def poll_once(state: LinkState, queue: Queue[Message], nodes_mapping: dict[int, int]) -> None:
    """One poll: the same messages, in the same order, as `flower_poll_once`, asking the state
    only about nodes that have an undelivered message."""
    if not _is_in_memory(state):
        flower_poll_once(state, queue, nodes_mapping)
        return
    pending = nodes_with_pending_messages(state)
    if not pending:
        return
    for node_id in nodes_mapping:  # Flower's node order; unregistered destinations are skipped
        if node_id in pending:
            # the real method: it delivers, marks delivered_at and checks expiry itself
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)


def add_messages_to_queue(state: LinkState, queue: Queue[Message],
                          nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Drop-in replacement for `vce_api.add_messages_to_queue` (same signature and loop)."""
    if not _is_in_memory(state):
        flower_add_messages_to_queue()(state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        poll_once(state, queue, nodes_mapping)
        f_stop.wait(POLL_INTERVAL_S)


def apply() -> bool:
    """Put `add_messages_to_queue` in place of Flower's poller when Flower is 1.41.0.

    Idempotent; replaces only Flower's own function (a poller someone else installed is left
    alone) and changes nothing else. Returns whether this module's poller is in place.
    """
    if flwr.__version__ != FLOWER_VERSION:
        log.debug("engine polling patch not applied: it is written for Flower %s, this is %s",
                  FLOWER_VERSION, flwr.__version__)
        return False
    from flwr.server.superlink.fleet.vce import vce_api

    current = vce_api.add_messages_to_queue
    if current is add_messages_to_queue:
        return True
    if not _is_flowers_own(current):
        log.debug("engine polling patch not applied: %s.add_messages_to_queue is not Flower's "
                  "own (%r)", VCE_API, current)
        return False
    _flower_poller[:] = [current]
    # run_api looks the name up in its module when it starts the poller thread
    vce_api.add_messages_to_queue = add_messages_to_queue
    log.debug("engine polling patch applied to %s", VCE_API)
    return True
