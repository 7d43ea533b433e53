"""Fixtures of the server tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.strategies.conftest import task_identity  # noqa: F401  (autouse fixture)


@pytest.fixture
def flwr_records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Flower's log records as a deployed process emits them (confide.logs: no
    propagation, one record each)."""
    flwr = logging.getLogger("flwr")
    propagate = flwr.propagate
    flwr.propagate = False
    flwr.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="flwr")
    yield caplog
    flwr.removeHandler(caplog.handler)
    flwr.propagate = propagate
