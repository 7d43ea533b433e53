"""Book-keeping clipping against the ground truth: one backward pass per example.

The per-example norms and the sum of clipped per-example gradients that
`BookKeepingClipper` computes from one batched pass are compared with per-example backward
passes (each example alone at its own length, no padding), on the tiny model, on a model
that reuses its layers, and on the real packaged MiniLM. `train_dp` with it is compared with
Opacus hooks step for step in test_ghost_clipping.py (beside ghost clipping).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from confide.clients.book_keeping import (
    BookKeepingClipper,
    BookKeepingError,
    unsupported_parameters,
)
from confide.clients.opacus_compat import (
    OpacusCompatError,
    make_opacus_ready,
    resolve_grad_sample_mode,
)
from confide.config import ConfigError, build_config
from confide.model import ModelSpec
from confide.tasks import build_model
from tests.clients.test_opacus_per_sample import make_batch, perturb_lora_b

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LENGTHS = [10, 6, 3, 8]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def reference(model: nn.Module, inputs: list[tuple[torch.Tensor, ...]], clip: float,
              loss_fn: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-example gradients by separate backward passes: their norms and clipped sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for example in inputs:
        model.zero_grad(set_to_none=True)
        loss_fn(model, *example).backward()  # type: ignore[operator]
        grads = [p.grad.double() if p.grad is not None else torch.zeros_like(p).double()
                 for p in params]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / (norm.item() + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    model.zero_grad(set_to_none=True)
    return torch.stack(norms), total


def book_keeping(model: nn.Module, batch: tuple[torch.Tensor, ...], clip: float,
                 loss_fn: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    clipper = BookKeepingClipper(model, clip)
    with clipper.recording():
        loss_fn(model, *batch).backward()  # type: ignore[operator]
    norms = clipper.clip_into_grads()
    grads = [p.grad.double() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return norms, grads


def assert_same(got: tuple[torch.Tensor, list[torch.Tensor]],
                want: tuple[torch.Tensor, list[torch.Tensor]], rel: float = 1e-4) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=rel, atol=1e-9)
    scale = max(float(w.abs().max()) for w in want[1])
    assert scale > 0
    for g, w in zip(got[1], want[1], strict=True):
        # against the largest gradient entry: some entries are round-off (a key bias has
        # an exactly zero true gradient, softmax being shift-invariant)
        assert float((g - w).abs().max()) <= rel * scale


def classifier_loss(wrapper: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(wrapper(ids, mask), labels, reduction="sum")


def classifier_case(spec: ModelSpec, clip: float, vocab: int = 30522
                    ) -> tuple[tuple[torch.Tensor, list[torch.Tensor]],
                               tuple[torch.Tensor, list[torch.Tensor]]]:
    torch.manual_seed(0)
    model = build_model(spec)
    if spec.fine_tune == "lora":
        perturb_lora_b(model)
    wrapper = make_opacus_ready(model)
    wrapper.eval()  # no dropout: the batched and the per-example passes see the same net
    ids, mask, labels = make_batch(LENGTHS, vocab=vocab)
    ids[0, 2] = ids[0, 5] = ids[3, 7] = ids[0, 1]  # repeated tokens: embedding cross terms
    alone = [(ids[i:i + 1, :n], mask[i:i + 1, :n], labels[i:i + 1])
             for i, n in enumerate(LENGTHS)]
    return (book_keeping(wrapper, (ids, mask, labels), clip, classifier_loss),
            reference(wrapper, alone, clip, classifier_loss))


@pytest.mark.parametrize("fine_tune", ["full", "lora", "bitfit", "head"])
@pytest.mark.parametrize("clip", [0.05, 1e6])  # binding for every example / for none
def test_norms_and_clipped_sum_match_per_example_backward(fine_tune: str, clip: float
                                                           ) -> None:
    got, want = classifier_case(ModelSpec("tiny", 2, fine_tune=fine_tune), clip, vocab=5000)
    assert_same(got, want)
    if clip < 1:
        assert bool((want[0] > clip).all())  # the clipping really was exercised


def test_real_minilm_full_fine_tune_matches_per_example_backward() -> None:
    got, want = classifier_case(ModelSpec("minilm", 2, fine_tune="full"), clip=0.5)
    assert_same(got, want, rel=2e-4)
    assert got[1][0].shape == (30522, 384)  # the word embeddings are clipped and summed


class Reuser(nn.Module):
    """One embedding (with a padding row), one Linear applied twice (once per token, once
    on the pooled vector), one LayerNorm applied twice: the uses' gradients add up."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.proj(self.embed(ids))))
        pooled = self.norm(self.proj(h.mean(1)))
        return self.head(pooled)


def reuser_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids), labels, reduction="sum")


def test_layers_used_twice_and_padding_rows() -> None:
    torch.manual_seed(0)
    model = Reuser()
    ids = torch.tensor([[3, 3, 0, 5], [7, 0, 0, 7], [1, 2, 3, 4]])  # 0 = padding row
    labels = torch.tensor([0, 2, 1])
    alone = [(ids[i:i + 1], labels[i:i + 1]) for i in range(3)]
    for clip in (0.1, 1e6):
        assert_same(book_keeping(model, (ids, labels), clip, reuser_loss),
                    reference(model, alone, clip, reuser_loss), rel=1e-5)
    _, grads = book_keeping(model, (ids, labels), 1e6, reuser_loss)
    assert float(grads[0][0].abs().max()) == 0.0  # the padding row gets no gradient


def test_parameters_stay_trainable_and_nothing_is_kept_after_an_error() -> None:
    model = Reuser()
    clipper = BookKeepingClipper(model, 1.0)
    with pytest.raises(RuntimeError, match="boom"), clipper.recording():
        model(torch.tensor([[1, 2]]))
        raise RuntimeError("boom")
    assert all(p.requires_grad for p in model.parameters())
    assert not model.embed._forward_hooks
    with clipper.recording():  # a fresh pass does not see the failed one's inputs
        reuser_loss(model, torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])).backward()
    assert clipper.clip_into_grads().shape == (2,)
    assert all(p.grad is not None for p in model.parameters())


def test_unsupported_layers_and_tied_weights_are_named() -> None:
    conv = nn.Sequential(nn.Conv1d(2, 2, 1), nn.Linear(2, 2))
    assert unsupported_parameters(conv) == ["0.bias (a Conv1d layer)",
                                            "0.weight (a Conv1d layer)"]
    with pytest.raises(BookKeepingError, match=r"0\.weight \(a Conv1d layer\)"):
        BookKeepingClipper(conv, 1.0)
    tied = Reuser()
    out = nn.Linear(8, 20, bias=False)
    out.weight = tied.embed.weight
    tied.add_module("out", out)
    assert unsupported_parameters(tied) == ["embed.weight (shared with out.weight)"]
    conv[0].requires_grad_(False)  # frozen layers of any type are fine
    assert unsupported_parameters(conv) == []


def test_auto_picks_book_keeping_for_full_fine_tuning_where_it_can() -> None:
    full = build_model(ModelSpec("tiny", 2, fine_tune="full"))
    assert resolve_grad_sample_mode("auto", "full", full) == "bookkeeping"
    assert resolve_grad_sample_mode("auto", "lora", full) == "hooks"
    causal = build_model(ModelSpec("tiny", 0, fine_tune="full", task="causal-lm"))
    # RMSNorm and tied input/output embeddings: neither book-keeping nor ghost
    assert resolve_grad_sample_mode("auto", "full", causal) == "hooks"
    with pytest.raises(OpacusCompatError, match=r"'bookkeeping' cannot clip.*RMSNorm"):
        resolve_grad_sample_mode("bookkeeping", "full", causal)


def test_config_accepts_it_and_the_shared_noise_mode_refuses_it() -> None:
    assert build_config({"grad-sample-mode": "bookkeeping"}).grad_sample_mode == "bookkeeping"
    with pytest.raises(ConfigError, match="'bookkeeping' is not supported"):
        build_config({"grad-sample-mode": "bookkeeping", "secure-aggregation": True,
                      "example-dp-noise": "shared"})
    auto = build_config({"grad-sample-mode": "bookkeeping", "secure-aggregation": True})
    assert auto.example_dp_noise == "local"


def test_half_precision_model_is_clipped() -> None:
    """A bfloat16 model trains through book-keeping (norms in float32 from its bfloat16
    gradients; gradients written in the parameters' dtype): close to the float32 result
    within what a bfloat16 forward pass changes."""
    torch.manual_seed(0)
    model = Reuser()
    ids = torch.tensor([[3, 3, 0, 5], [7, 0, 0, 7], [1, 2, 3, 4]])
    labels = torch.tensor([0, 2, 1])
    want, _ = book_keeping(model, (ids, labels), 0.1, reuser_loss)
    model.to(torch.bfloat16)
    got, grads = book_keeping(model, (ids, labels), 0.1, reuser_loss)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=3e-2, atol=0)  # bf16 forward, fp32 sums
    assert all(bool(torch.isfinite(g).all()) for g in grads)
