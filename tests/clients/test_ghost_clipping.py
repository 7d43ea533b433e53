"""Ghost and book-keeping clipping in train_dp: the same mechanism as hooks, computed
another way (their per-example norms are checked in test_book_keeping.py and
test_opacus_per_sample.py)."""

from __future__ import annotations

import pytest
import torch

from confide.clients.dp_training import train_dp
from confide.clients.opacus_compat import has_opacus_state, resolve_grad_sample_mode
from confide.config import build_config
from confide.model import ModelSpec, trainable_state
from confide.tasks import build_model
from confide.tasks.inputs import model_spec
from tests.clients.test_dp_training import easy_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def train(mode: str, spec: ModelSpec, data: dict[str, torch.Tensor], **overrides: object):
    model = build_model(spec)
    settings: dict[str, object] = dict(
        noise_multiplier=0.0, max_grad_norm=0.05, batch_size=12, physical_batch_size=5,
        epochs=2.0, optimizer="sgd", learning_rate=0.5, seed=3, dp=True,
        private_randomness=False)
    settings.update(overrides)
    result = train_dp(model, data, grad_sample_mode=mode, **settings)  # type: ignore[arg-type]
    assert not has_opacus_state(model)
    # book-keeping switches requires_grad off during its passes: it must come back
    assert [p.requires_grad for p in model.parameters()] == \
        [p.requires_grad for p in build_model(spec).parameters()]
    return model, result


@pytest.mark.parametrize("mode", ["ghost", "bookkeeping"])
@pytest.mark.parametrize("noise", [0.0, 0.7])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_ghost_step_equals_hooks_step(mode: str, noise: float, pooling: str) -> None:
    """Same Poisson batches (seeded), clip 0.05 (binding for every example), physical
    batches of 5: the clipped sum, noise (same seeded generator) and divisor agree."""
    spec = ModelSpec("tiny", 2, fine_tune="full", pooling=pooling)
    data = easy_task(n=30)
    start = trainable_state(build_model(spec))
    hooks, r_hooks = train("hooks", spec, data, noise_multiplier=noise)
    ghost, r_ghost = train(mode, spec, data, noise_multiplier=noise)
    # the facts the accountant reads are unchanged
    assert (r_ghost.steps, r_ghost.sample_rate, r_ghost.noise_multiplier) == \
        (r_hooks.steps, r_hooks.sample_rate, r_hooks.noise_multiplier)
    assert r_ghost.steps == round(2.0 / (12 / 30))
    assert r_ghost.mean_loss == pytest.approx(r_hooks.mean_loss, rel=1e-4)
    a, b = trainable_state(hooks), trainable_state(ghost)
    moved = 0.0
    for name in a:
        torch.testing.assert_close(torch.from_numpy(b[name]), torch.from_numpy(a[name]),
                                   rtol=1e-4, atol=2e-6)
        moved = max(moved, float(abs(a[name] - start[name]).max()))
    assert moved > 1e-3  # the comparison is between real updates, not two no-ops


@pytest.mark.parametrize("mode", ["ghost", "bookkeeping"])
def test_ghost_with_empty_poisson_batches_still_takes_every_noisy_step(mode: str) -> None:
    spec = ModelSpec("tiny", 2, fine_tune="full", freeze_embeddings=True)
    data = easy_task(n=8)
    # q = 1/8 over 16 steps: with this seed several logical batches are empty
    model, result = train(mode, spec, data, batch_size=1, physical_batch_size=1,
                          epochs=2.0, noise_multiplier=0.5)
    assert result.steps == 16
    hooks, _ = train("hooks", spec, data, batch_size=1, physical_batch_size=1, epochs=2.0,
                     noise_multiplier=0.5)
    a, b = trainable_state(hooks), trainable_state(model)
    for name in a:
        torch.testing.assert_close(torch.from_numpy(b[name]), torch.from_numpy(a[name]),
                                   rtol=1e-4, atol=2e-6)


def test_freeze_embeddings_freezes_only_the_embedding_tables() -> None:
    cfg = build_config({"model": "tiny", "fine-tune": "full", "freeze-embeddings": True})
    model = build_model(model_spec(cfg, 2))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.embeddings.word_embeddings.weight",
                      "encoder.embeddings.position_embeddings.weight",
                      "encoder.embeddings.token_type_embeddings.weight"}
    full = build_model(model_spec(cfg.replace(freeze_embeddings=False), 2))
    assert all(p.requires_grad for p in full.parameters())


def test_auto_mode_is_ghost_for_full_and_hooks_otherwise() -> None:
    assert resolve_grad_sample_mode("auto", "full") == "ghost"
    for fine_tune in ("lora", "head", "bitfit"):
        assert resolve_grad_sample_mode("auto", fine_tune) == "hooks"
    assert resolve_grad_sample_mode("hooks", "full") == "hooks"
    assert resolve_grad_sample_mode("ghost", "lora") == "ghost"
    assert build_config({}).grad_sample_mode == "auto"
