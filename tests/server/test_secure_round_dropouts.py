"""A partner killed in a secure run is counted once, named by partner,
and each round's abort is logged in round order (in-process grid, real SecAgg core)."""

from __future__ import annotations

import pytest

from confide.privacy import ledger_events as E
from tests.server.test_secure_round import make, run, task_identity  # noqa: F401


def test_two_partners_one_killed_counts_one_dropout_names_it_in_round_order(
        flwr_records: pytest.LogCaptureFixture) -> None:
    fed, secure = make(n=2, rounds=2)
    # both partners trained before: the server knows which partner each node is
    run(fed, secure, 1)
    # partner p1001 is killed: from now on its node answers every message with an error
    killed = 1001
    for r in (2, 3):
        fed.grid.drop[(r, "train")] = {killed}
        fed.grid.drop[(r, "secagg")] = {killed}
    flwr_records.clear()
    fed2, secure2 = fed, secure
    fed2.cfg = fed2.cfg.replace(rounds=3)
    r2 = run(fed2, secure2, 2)
    assert r2["secagg_aborted"]  # 1 survivor < threshold 2: nothing unmasked
    assert r2["aggregated"] == []
    assert r2["secagg_survivors"] == 1 and r2["secagg_dropouts"] == 1  # was 0 and 2
    events = fed.ledger.of(E.SECURE_AGGREGATION)
    assert events[-1]["dropouts"] == ["p1001"]
    r3 = run(fed2, secure2, 3)  # its keys for round 3 were never shared: aborts as well
    assert r3["secagg_survivors"] == 1 and r3["secagg_dropouts"] == 1
    aborts = [r.getMessage() for r in flwr_records.records if "aborted" in r.getMessage()]
    assert [m.split(" aborted")[0] for m in aborts] == ["secure round 2", "secure round 3"]
    failed = [r.getMessage() for r in flwr_records.records if "failed" in r.getMessage()]
    # one name per partner: its pseudonym (Flower's node id only in verbose logs)
    assert failed and all("p1001 failed" in m and "1001)" not in m for m in failed), failed
    for message in aborts:  # by partner; the core's client ids translated
        assert "dropped: p1001" in message and "node 1001" not in message, message
        assert "p1000" not in message.split("dropped:")[1]
