"""Drive one round with N in-process parties (tests, benchmarks, simulations).

Messages go through ``to_bytes()``/``from_bytes()`` when ``serialize=True``, exactly as a
transport adapter would carry them. ``drop`` maps a stage name to the client ids that fall
silent at that stage (they send nothing from then on). ``identities``: each client's
Ed25519 identity; given, every client runs the authenticated protocol with the roster of
all of them (:mod:`.identity`), including the consistency round after a masked-input dropout.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .config import SecAggConfig
from .identity import Roster, raw_public
from .messages import (
    STAGE_ADVERTISE,
    STAGE_CONSISTENCY,
    STAGE_MASKED_INPUT,
    STAGE_SHARE,
    STAGE_UNMASK,
    Message,
)
from .protocol import SecAggClient, SecAggResult, SecAggServer

M = TypeVar("M", bound=Message)


@dataclass
class RoundTrace:
    """Timings (seconds, summed over clients for client stages) and upload sizes (bytes)."""

    seconds: dict[str, float] = field(default_factory=dict)
    upload_bytes: dict[int, int] = field(default_factory=dict)

    def add(self, key: str, dt: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + dt


def _wire(msg: M, serialize: bool, trace: RoundTrace, sender: int | None = None) -> M:
    if not serialize:
        return msg
    data = msg.to_bytes()
    if sender is not None:
        trace.upload_bytes[sender] = trace.upload_bytes.get(sender, 0) + len(data)
    return type(msg).from_bytes(data)


def run_round(
    config: SecAggConfig,
    updates: Mapping[int, np.ndarray],
    weights: Mapping[int, float] | None = None,
    *,
    round_number: int = 1,
    drop: Mapping[str, Sequence[int]] | None = None,
    serialize: bool = True,
    trace: RoundTrace | None = None,
    encoded: Mapping[int, np.ndarray] | None = None,
    identities: Mapping[int, Ed25519PrivateKey] | None = None,
) -> tuple[SecAggResult, SecAggServer]:
    """``encoded``: per client, a ring vector encoded by the caller (shared-noise mode);
    it replaces that client's update."""
    dropping = {k: set(v) for k, v in (drop or {}).items()}
    trace = trace if trace is not None else RoundTrace()
    server = SecAggServer(config, round_number)
    roster = None if identities is None else Roster(
        frozenset(raw_public(k) for k in identities.values()))
    clients = {cid: SecAggClient(config, cid, round_number,
                                 identity=None if identities is None else identities[cid],
                                 roster=roster) for cid in updates}
    gone: set[int] = set()

    def alive(stage: str) -> list[int]:
        gone.update(dropping.get(stage, ()))
        return [c for c in sorted(clients) if c not in gone]

    for cid in alive(STAGE_ADVERTISE):
        t0 = time.perf_counter()
        msg = clients[cid].advertise_keys()
        trace.add("client advertise_keys", time.perf_counter() - t0)
        server.receive(_wire(msg, serialize, trace, cid))
    directory = _wire(server.key_directory(), serialize, trace)

    for cid in alive(STAGE_SHARE):
        t0 = time.perf_counter()
        shares = clients[cid].share_keys(directory)
        trace.add("client share_keys", time.perf_counter() - t0)
        server.receive(_wire(shares, serialize, trace, cid))
    t0 = time.perf_counter()
    requests = server.masked_input_requests()
    trace.add("server route shares", time.perf_counter() - t0)

    for cid in alive(STAGE_MASKED_INPUT):
        if cid not in requests:
            continue
        w = 1.0 if weights is None else weights[cid]
        t0 = time.perf_counter()
        masked = clients[cid].masked_input(_wire(requests[cid], serialize, trace), updates[cid],
                                           w, encoded=None if encoded is None else encoded[cid])
        trace.add("client masked_input", time.perf_counter() - t0)
        wired = _wire(masked, serialize, trace, cid)
        t0 = time.perf_counter()
        server.receive(wired)
        trace.add("server sum masked inputs", time.perf_counter() - t0)
    consistency = server.consistency_request()
    if consistency is not None:
        consistency = _wire(consistency, serialize, trace)
        for cid in alive(STAGE_CONSISTENCY):
            if cid in consistency.survivors:
                server.receive(_wire(clients[cid].consistency_vote(consistency), serialize,
                                     trace, cid))
    unmask = _wire(server.unmask_request(), serialize, trace)

    for cid in alive(STAGE_UNMASK):
        if cid not in unmask.survivors:
            continue
        t0 = time.perf_counter()
        unmasked = clients[cid].unmask(unmask)
        trace.add("client unmask", time.perf_counter() - t0)
        server.receive(_wire(unmasked, serialize, trace, cid))
    t0 = time.perf_counter()
    result = server.result()
    trace.add("server unmask+decode", time.perf_counter() - t0)
    return result, server
