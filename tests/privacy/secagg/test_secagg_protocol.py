"""End-to-end correctness of the SecAgg+ core: exact ring sums, dropouts, aborts, folding."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Parties, make_config, make_updates
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.privacy.secagg import SecAggAbort, SecAggClient, SecAggServer, UpdateEncoder
from confide.privacy.secagg.inprocess import run_round
from confide.privacy.secagg.prg import PURPOSE_ROUNDING, ChaChaStream
from confide.privacy.secagg.quantize import to_ring


@st.composite
def round_cases(draw):
    n = draw(st.integers(2, 12))
    k = n - 1 if n <= 3 else draw(st.sampled_from([n - 1, *range(2, n - 1, 2)]))
    t = draw(st.integers(2, k + 1))
    bits = draw(st.integers(16, 64))
    d = draw(st.integers(1, 500))
    drops = draw(st.lists(st.integers(1, n), max_size=n // 2, unique=True))
    stages = draw(
        st.lists(
            st.sampled_from(["share_keys", "masked_input", "unmask"]),
            min_size=len(drops),
            max_size=len(drops),
        )
    )
    return n, k, t, bits, d, drops, stages


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=round_cases(), seed=st.integers(0, 2**32 - 1))
def test_sum_is_exact_in_the_ring(case, seed):
    n, k, t, bits, d, drops, stages = case
    cfg = make_config(n, d, degree=k, threshold=t, min_survivors=t, bits=bits, max_weight=4.0)
    ups = make_updates(n, d, seed)
    rng = np.random.default_rng(seed)
    weights = {c: float(rng.uniform(0, 5)) for c in ups}
    seeds = {c: rng.bytes(32) for c in ups}
    server = SecAggServer(cfg, 7)
    clients = {
        c: SecAggClient(cfg, c, 7, rounding_stream=ChaChaStream(seeds[c], PURPOSE_ROUNDING))
        for c in ups
    }
    drop_at = dict(zip(drops, stages, strict=True))
    order = ["share_keys", "masked_input", "unmask"]

    def alive(stage):
        return [c for c in ups if c not in drop_at or order.index(drop_at[c]) > order.index(stage)]

    try:
        for c in ups:
            server.receive(clients[c].advertise_keys())
        directory = server.key_directory()
        for c in alive("share_keys"):
            server.receive(clients[c].share_keys(directory))
        requests = server.masked_input_requests()
        for c in alive("masked_input"):
            server.receive(clients[c].masked_input(requests[c], ups[c], weights[c]))
        request = server.unmask_request()
        for c in alive("unmask"):
            server.receive(clients[c].unmask(request))
        result = server.result()
    except SecAggAbort as abort:
        # a legitimate abort: the shortfall is real and nothing unmasked is kept
        assert abort.available < abort.required
        assert server.masked_sum is None and server.reconstructed_secrets == 0
        return
    survivors = list(result.survivors)
    assert set(survivors) == set(alive("masked_input"))
    enc = UpdateEncoder(cfg)
    expected = np.zeros(cfg.encoded_length, dtype=np.uint64)
    for c in survivors:
        e = enc.encode(ups[c], weights[c], rounding_stream=ChaChaStream(seeds[c], PURPOSE_ROUNDING))
        expected += e.astype(np.uint64)
    expected = to_ring(expected.view(np.int64), cfg)
    np.testing.assert_array_equal(result.ring_sum, expected)
    # and the decoded float sum is within the documented rounding bound
    w = {c: min(weights[c], 4.0) for c in survivors}
    plain = sum((w[c] * np.clip(ups[c], -1, 1) for c in survivors), np.zeros(d))
    bound = enc.sum_error_bound(len(survivors)) * 1.0001 + 1e-9
    assert np.max(np.abs(result.weighted_sum - plain)) <= bound
    assert abs(result.total_weight - sum(w.values())) <= bound


@pytest.mark.parametrize("stage", ["share_keys", "masked_input", "unmask"])
def test_dropouts_up_to_threshold_at_every_stage(stage):
    n, d = 10, 50
    cfg = make_config(n, d, degree=n - 1, threshold=6, min_survivors=6)
    ups = make_updates(n, d)
    dropped = [2, 5, 9, 10]  # n - 4 = 6 = t remain
    result, _ = run_round(cfg, ups, drop={stage: dropped})
    counted = [c for c in ups if stage == "unmask" or c not in dropped]
    plain = sum(ups[c] for c in counted)
    bound = UpdateEncoder(cfg).sum_error_bound(len(counted))
    assert np.max(np.abs(result.weighted_sum - plain)) <= bound
    assert result.total_weight == pytest.approx(len(counted), abs=1e-6)


def test_sparse_graph_dropouts_unmask_pairwise_masks():
    n, d = 12, 30
    cfg = make_config(n, d, degree=6, threshold=3, min_survivors=8)
    ups = make_updates(n, d, 3)
    result, _ = run_round(cfg, ups, drop={"masked_input": [1, 4], "unmask": [7]})
    assert result.dropped == (1, 4)
    plain = sum(ups[c] for c in ups if c not in (1, 4))
    assert np.max(np.abs(result.weighted_sum - plain)) <= UpdateEncoder(cfg).sum_error_bound(10)


@pytest.mark.parametrize("stage", ["share_keys", "masked_input", "unmask"])
def test_below_threshold_aborts_and_reveals_nothing(stage):
    n, d = 8, 16
    cfg = make_config(n, d, degree=n - 1, threshold=5, min_survivors=5)
    ups = make_updates(n, d)
    with pytest.raises(SecAggAbort) as info:
        run_round(cfg, ups, drop={stage: [1, 2, 3, 4]})
    abort = info.value
    assert abort.stage == stage and abort.available < abort.required
    assert "aborted at stage" in str(abort)


def test_abort_at_unmask_keeps_server_blind():
    n, d = 6, 8
    p = Parties(make_config(n, d, degree=n - 1, threshold=4, min_survivors=4))
    requests = p.to_masked_input()
    for c, client in p.clients.items():
        p.server.receive(client.masked_input(requests[c], make_updates(n, d)[c]))
    request = p.server.unmask_request()
    for c in (1, 2, 3):  # only 3 < t answer
        p.server.receive(p.clients[c].unmask(request))
    with pytest.raises(SecAggAbort):
        p.server.result()
    assert p.server.masked_sum is None
    assert p.server.reconstructed_secrets == 0


def test_folded_rounds_interleave():
    """Round r+1's keys advertised and shared while round r is still masking/unmasking."""
    n, d = 5, 12
    cfg = make_config(n, d)
    ups = make_updates(n, d)
    s1, s2 = SecAggServer(cfg, 1), SecAggServer(cfg, 2)
    c1 = {c: SecAggClient(cfg, c, 1) for c in ups}
    c2 = {c: SecAggClient(cfg, c, 2) for c in ups}
    for c in ups:
        s1.receive(c1[c].advertise_keys())
        s2.receive(c2[c].advertise_keys())  # folded into round 1's first exchange
    d1, d2 = s1.key_directory(), s2.key_directory()
    for c in ups:
        s1.receive(c1[c].share_keys(d1))
    req1 = s1.masked_input_requests()
    for c in ups:  # exchange: masked input of round 1 + share keys of round 2
        s1.receive(c1[c].masked_input(req1[c], ups[c]))
        s2.receive(c2[c].share_keys(d2))
    un1 = s1.unmask_request()
    for c in ups:
        s1.receive(c1[c].unmask(un1))
    r1 = s1.result()
    req2 = s2.masked_input_requests()
    for c in ups:
        s2.receive(c2[c].masked_input(req2[c], -ups[c]))
    un2 = s2.unmask_request()
    for c in ups:
        s2.receive(c2[c].unmask(un2))
    r2 = s2.result()
    np.testing.assert_allclose(r1.weighted_sum, -r2.weighted_sum, atol=1e-6)
