"""A resumed server continues with the same server-optimizer moments (no runtime needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.server.federation import Federation


def one_step(fed: Federation, seed: int) -> None:
    """What a round does to the weights: the mean delta goes through `Federation.server_step`."""
    rng = np.random.default_rng(seed)
    # sorted: a checkpoint does not keep the dict order of the weights
    delta = {k: rng.normal(scale=0.01, size=fed.global_state[k].shape)
             for k in sorted(fed.global_state)}
    fed.global_state = fed.server_step(delta)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_checkpoint_carries_the_moments_and_resume_restores_them(tmp_path: Path,
                                                                 kind: str) -> None:
    values = {"model": "tiny", "clients": 2, "max-length": 16, "server-optimizer": kind,
              "server-momentum": 0.9, "server-learning-rate": 0.01, "out": str(tmp_path)}
    fed = Federation.create(grid=None, cfg=build_config(values), out_dir=tmp_path)  # type: ignore[arg-type]
    one_step(fed, 0)
    # as a real round does: the ledger's digest of the weights resume will check
    fed.record(E.ModelDigest(round=1, sha256=E.weights_digest(fed.global_state)))
    fed.rounds_completed = 1
    fed.save_checkpoint()
    one_step(fed, 1)  # the uninterrupted run's round 2
    assert fed.ledger is not None
    fed.ledger.close()  # the "crashed" server lets go of the ledger

    again = Federation.resume(grid=None, cfg=build_config(values | {"resume": True}),  # type: ignore[arg-type]
                       out_dir=tmp_path)
    opt = again.inner.optimizer
    assert opt.kind == kind and opt.steps == 1
    assert set(opt.m) == set(fed.global_state)
    one_step(again, 1)
    for k, v in fed.global_state.items():
        assert again.global_state[k].tobytes() == v.tobytes(), k
