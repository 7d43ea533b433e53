"""The shared-noise round's fixed physical budget (confide.clients.dp_training.
clipped_example_gradients with `slots`): the same work whatever the Poisson sample, the same
sum as the unpadded round, a random subset when the sample exceeds the budget; and local
DP-SGD computing its rate and divisor from the public row count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from confide.clients.dp_training import clipped_example_gradients, train_dp
from confide.model import ModelSpec
from confide.tasks import build_model
from confide.tasks.batches import DPTrainingError
from tests.clients.test_opacus_per_sample import make_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROWS = 24


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(ModelSpec("tiny", 2, fine_tune="head", pooling="mean"))


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    # rows of very different lengths: trimming per batch would make the work depend on them
    ids, mask, labels = make_batch([3 + (5 * i) % 11 for i in range(ROWS)])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _round(model, data, *, seed: int, slots: int | None, rate: float = 0.25,
           physical: int = 4) -> tuple[list[tuple[int, ...]], list[tuple[int, int]],
                                       np.ndarray, object]:
    """(shapes given to on_rows, (rows, width) of each forward pass, the summed rows,
    the result)."""
    blocks: list[np.ndarray] = []
    forwards: list[tuple[int, int]] = []
    emb = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    handle = emb.register_forward_hook(
        lambda _m, args, _out: forwards.append(tuple(args[0].shape)))
    try:
        result = clipped_example_gradients(
            model, data, sample_rate=rate, max_grad_norm=0.5, physical_batch_size=physical,
            on_rows=blocks.append, seed=seed, private_randomness=False, slots=slots)
    finally:
        handle.remove()
    total = np.concatenate(blocks).sum(axis=0) if blocks else np.zeros(1)
    return [b.shape for b in blocks], forwards, total, result


def test_every_round_does_the_same_work_whatever_its_sample(model, data) -> None:
    sampled, works = set(), set()
    for seed in range(8):
        shapes, forwards, _, result = _round(model, data, seed=seed, slots=10)
        sampled.add(result.sampled)
        assert result.slots == 10 and not result.truncated
        works.add((tuple(shapes), tuple(forwards)))
    assert len(sampled) > 2, "the Poisson samples must differ for this test to mean anything"
    assert len(works) == 1  # same blocks, same forward passes, same token width
    (shapes, forwards), = works
    assert [s[0] for s in shapes] == [4, 4, 2]
    assert {w for _, w in forwards} == {data["input_ids"].shape[1]}


def test_padding_adds_nothing_to_the_sum(model, data) -> None:
    for seed in range(4):
        _, _, padded, result = _round(model, data, seed=seed, slots=12)
        _, _, plain, same = _round(model, data, seed=seed, slots=None)
        assert result.sampled == same.sampled <= 12  # the same Poisson draw
        np.testing.assert_allclose(padded, plain, rtol=1e-6, atol=1e-9)


def test_a_sample_above_the_budget_is_truncated_to_a_random_subset(model, data) -> None:
    kept = set()
    for seed in range(3):
        shapes, forwards, _, result = _round(model, data, seed=seed, slots=5, rate=1.0)
        assert result.sampled == ROWS and result.truncated and result.slots == 5
        assert sum(r for r, _ in forwards) == 5 and sum(s[0] for s in shapes) == 5
        blocks: list[np.ndarray] = []
        clipped_example_gradients(model, data, sample_rate=1.0, max_grad_norm=0.5,
                                  physical_batch_size=4, on_rows=blocks.append,
                                  seed=seed, private_randomness=False, slots=5)
        rows = np.concatenate(blocks)
        assert int((np.abs(rows).sum(axis=1) > 0).sum()) == 5  # no padding: all real
        kept.add(tuple(np.round(rows[:, 0], 8)))
    assert len(kept) > 1  # which five is random


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_budget_that_is_not_a_count_of_slots_is_named(model, data, bad: object) -> None:
    with pytest.raises(DPTrainingError, match="slots must be an integer >= 1"):
        clipped_example_gradients(model, data, sample_rate=0.5, max_grad_norm=1.0,
                                  physical_batch_size=4, on_rows=lambda _b: None,
                                  slots=bad)  # type: ignore[arg-type]


def test_local_dp_sgd_takes_its_rate_and_divisor_from_the_public_row_count(model, data
                                                                           ) -> None:
    common = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "batch_size": 6,
              "physical_batch_size": 6, "epochs": 0.5, "learning_rate": 0.1, "seed": 1,
              "private_randomness": False}
    exact = train_dp(model, data, **common)
    public = train_dp(model, data, **common, public_rows=100)
    assert exact.sample_rate == pytest.approx(6 / ROWS) and exact.steps == 2
    # q = 6 / 100: neither the rate nor the step count reveals the 24 rows
    assert public.sample_rate == pytest.approx(0.06) and public.steps == 8
    with pytest.raises(DPTrainingError, match="public_rows = 10 must be an integer >= the 24"):
        train_dp(model, data, **common, public_rows=10)
