"""Shared helpers for the secure-aggregation core tests."""

from __future__ import annotations

import os

import numpy as np
import pytest

from confide.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer


def make_config(n: int = 6, d: int = 20, **kw: object) -> SecAggConfig:
    return SecAggConfig(os.urandom(16), num_clients=n, vector_length=d, **kw)  # type: ignore[arg-type]


def make_updates(n: int, d: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {cid: rng.uniform(-1, 1, d) for cid in range(1, n + 1)}


class Parties:
    """A round's server and clients advanced stage by stage, for tests that tamper."""

    def __init__(self, config: SecAggConfig, round_number: int = 1) -> None:
        self.config = config
        self.server = SecAggServer(config, round_number)
        self.clients = {
            c: SecAggClient(config, c, round_number) for c in range(1, config.num_clients + 1)
        }

    def to_share_keys(self):
        for c in self.clients.values():
            self.server.receive(c.advertise_keys())
        return self.server.key_directory()

    def to_masked_input(self):
        directory = self.to_share_keys()
        for c in self.clients.values():
            self.server.receive(c.share_keys(directory))
        return self.server.masked_input_requests()


@pytest.fixture
def parties() -> Parties:
    return Parties(make_config())
