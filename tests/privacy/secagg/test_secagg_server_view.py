"""What the server holds looks uniform and is uncorrelated with any client's input."""

from __future__ import annotations

import numpy as np
from conftest import Parties, make_config
from scipy import stats

from confide.privacy.secagg import Message


def _masked_inputs(n=6, d=4000, bits=32, updates=None):
    p = Parties(make_config(n, d, bits=bits))
    requests = p.to_masked_input()
    if updates is None:
        updates = {c: np.full(d, 0.5) for c in p.clients}  # highly structured inputs
    msgs = {}
    for c, client in p.clients.items():
        msg = client.masked_input(requests[c], updates[c])
        msgs[c] = Message.from_bytes(msg.to_bytes())
        p.server.receive(msgs[c])
    return p, msgs, updates


def test_masked_inputs_bytes_are_uniform():
    _, msgs, _ = _masked_inputs()
    for msg in msgs.values():
        counts = np.bincount(msg.vector.view(np.uint8), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
        high = (msg.vector >> np.uint32(28)).astype(np.int64)  # top 4 bits
        assert stats.chisquare(np.bincount(high, minlength=16)).pvalue > 1e-4


def test_masked_input_uncorrelated_with_input():
    d = 4000
    rng = np.random.default_rng(1)
    updates = {c: rng.uniform(-1, 1, d) for c in range(1, 7)}
    p, msgs, _ = _masked_inputs(d=d, updates=updates)
    for c, msg in msgs.items():
        r = stats.pearsonr(msg.vector[:-1].astype(np.float64), updates[c]).statistic
        assert abs(r) < 0.08  # ~5 standard errors at d = 4000
    # the running sum of all masked inputs still hides each input: subtracting every other
    # client's masked vector leaves client 1's masked vector, not its encoding
    held = p.server.masked_sum
    rest = sum((m.vector for c, m in msgs.items() if c != 1), np.zeros(d + 1, np.uint32))
    residual = held - rest
    np.testing.assert_array_equal(residual, msgs[1].vector)
    r = stats.pearsonr(residual[:-1].astype(np.float64), updates[1]).statistic
    assert abs(r) < 0.08


def test_same_input_different_rounds_give_unrelated_masks():
    _, a, _ = _masked_inputs(d=2000)
    _, b, _ = _masked_inputs(d=2000)
    assert np.mean(a[1].vector == b[1].vector) < 0.01
