"""Shared-noise mode on the node: Opacus per-example gradients, clipped and summed through
the secure sum, give the central DP-SGD step on the union of the partners' sampled records
(noise off: exactly, up to quantisation)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from confide.clients.dp_training import clipped_example_gradients
from confide.clients.opacus_compat import has_opacus_state, make_opacus_ready, strip_opacus_state
from confide.model import ModelSpec, trainable_state
from confide.privacy.secagg import SecAggConfig
from confide.privacy.secagg.inprocess import run_round
from confide.privacy.secagg.shared_noise import ExampleSumEncoder, SharedNoiseConfig, decode_sum
from confide.tasks import build_model
from confide.wire import flatten
from tests.clients.test_opacus_per_sample import make_batch, perturb_lora_b

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LENGTHS = [10, 6, 3, 8, 12, 5, 7, 9, 4, 11, 6, 8]
CLIP = 0.05  # small enough that every example is clipped (and some exactly at the clip)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _central_clipped_sum(model, ids, mask, labels) -> np.ndarray:
    """Opacus' own DP-SGD clipping (DPOptimizer.clip_and_accumulate, noise 0) on the union:
    the clipped per-example gradient sum a central DP-SGD step adds its noise to."""
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    wrapper = make_opacus_ready(model)
    gsm = GradSampleModule(wrapper, batch_first=True, loss_reduction="sum", strict=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0,
                      max_grad_norm=CLIP, expected_batch_size=len(labels),
                      loss_reduction="sum")
    try:
        torch.nn.functional.cross_entropy(gsm(ids, mask), labels, reduction="sum").backward()
        opt.clip_and_accumulate()
        names = {id(p): n for n, p in model.named_parameters()}
        summed = {names[id(p)]: p.summed_grad.detach().double().numpy() for p in params}
    finally:
        gsm.to_standard_module()
        strip_opacus_state(model)
        model.zero_grad(set_to_none=True)
    return flatten(summed)


def test_secure_sum_of_partner_shares_is_the_central_dp_sgd_step_without_noise() -> None:
    model = build_model(ModelSpec("tiny", 2, fine_tune="lora", pooling="mean"))
    perturb_lora_b(model)
    ids, mask, labels = make_batch(LENGTHS)
    central = _central_clipped_sum(model, ids, mask, labels)
    d = central.size
    assert d == sum(v.size for v in trainable_state(model).values())

    parts = {1: slice(0, 3), 2: slice(3, 8), 3: slice(8, 12)}  # three partners' records
    secagg = SecAggConfig(os.urandom(16), num_clients=3, vector_length=d)
    shared = SharedNoiseConfig(clip=CLIP, noise_multiplier=1.0, num_clients=3,
                               min_survivors=int(secagg.min_survivors), colluders=0,
                               max_examples=len(LENGTHS), vector_length=d, bits=secagg.bits)
    encoded, plain = {}, {}
    for c, rows in parts.items():
        enc = ExampleSumEncoder(shared)
        got: list[np.ndarray] = []

        def take(block: np.ndarray, enc=enc, got=got) -> None:
            got.append(block)
            enc.add_examples(block)

        data = {"input_ids": ids[rows], "attention_mask": mask[rows], "labels": labels[rows]}
        res = clipped_example_gradients(model, data, sample_rate=1.0, max_grad_norm=CLIP,
                                        physical_batch_size=2, on_rows=take,
                                        private_randomness=False)
        assert res.sampled == len(labels[rows])  # q = 1: full-batch DP-GD
        assert all(np.linalg.norm(b, axis=1).max() <= CLIP for b in got)
        plain[c] = np.concatenate(got).sum(axis=0)
        encoded[c] = enc.encode(noise=False)
    assert not has_opacus_state(model)
    # the float sum of the partners' clipped rows is Opacus' central clipped sum
    np.testing.assert_allclose(sum(plain.values()), central, rtol=1e-5,
                               atol=1e-6 * np.abs(central).max())
    result, _ = run_round(secagg, {c: np.zeros(d) for c in parts}, encoded=encoded)
    total = decode_sum(result.ring_sum, shared)
    # rounding moves each example's coordinates by < 1 step; float32 gradients add ~1e-6
    tol = len(LENGTHS) / shared.scale + 1e-5 * np.abs(central).max()
    assert np.max(np.abs(total - central)) <= tol
    expected_batch = float(len(LENGTHS))  # sum_i q_i n_i with q = 1
    np.testing.assert_allclose(total / expected_batch, central / expected_batch,
                               atol=tol / expected_batch)


def test_poisson_sample_at_rate_q_takes_about_q_n_examples() -> None:
    model = build_model(ModelSpec("tiny", 2, fine_tune="head", pooling="mean"))
    ids, mask, labels = make_batch([6] * 40)
    counts = []
    for _ in range(5):
        res = clipped_example_gradients(
            model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
            sample_rate=0.25, max_grad_norm=1.0, physical_batch_size=8,
            on_rows=lambda block: None)
        counts.append(res.sampled)
    assert 0 < np.mean(counts) < 20 and len(set(counts)) > 1  # random sample, not fixed
