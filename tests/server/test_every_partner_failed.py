"""A configuration every partner fails on (seen: DP full fine-tuning of a causal LM with tied
input/output embeddings under ghost clipping, which Opacus refuses) must not go through
every round and finish "completed" with nothing aggregated: the run stops in round 1 naming
the partners' error, and `grad-sample-mode = 'auto'` avoids the failure in the first place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confide.audit.verify import verify_run
from confide.clients.opacus_compat import resolve_grad_sample_mode, tied_trainable_parameters
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.server.federation import Federation
from confide.server.recovery import EveryPartnerFailed
from confide.tasks import build_model
from confide.tasks.inputs import model_spec
from tests.inprocess import InProcessGrid
from tests.tasks.test_causal_lm_task import write_csv

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _config(tmp_path: Path, **extra: object):
    data = write_csv(tmp_path / "e2e.csv",
                     rows=[(f"name[P{i}]", f"P{i} is a pub.") for i in range(24)])
    return build_config({"task": "causal-lm", "model": "tiny", "fine-tune": "full",
                         "data": str(data), "eval-data": str(data), "prompt-column": "mr",
                         "completion-column": "ref", "clients": 2, "rounds": 2,
                         "max-length": 16, "batch-size": 8, "physical-batch-size": 8,
                         "preflight": "off", "generate-prompts": 1, "max-new-tokens": 2,
                         "out": str(tmp_path / "run"), **extra})


def test_tied_weights_get_hooks_under_auto_and_a_clear_error_under_ghost(tmp_path: Path
                                                                         ) -> None:
    cfg = _config(tmp_path)
    model = build_model(model_spec(cfg, 0))
    assert tied_trainable_parameters(model), "the tiny causal LM ties its embeddings"
    assert resolve_grad_sample_mode("auto", "full", model) == "hooks"
    assert resolve_grad_sample_mode("auto", "full") == "ghost"  # no model: as before
    with pytest.raises(RuntimeError, match="tied"):
        resolve_grad_sample_mode("ghost", "full", model)


def test_run_stops_in_round_one_when_every_partner_fails(tmp_path: Path) -> None:
    cfg = _config(tmp_path, **{"grad-sample-mode": "ghost"})
    out = Path(cfg.out)
    with pytest.raises(EveryPartnerFailed) as caught:
        Federation.open(InProcessGrid(2), cfg, out).run()
    message = str(caught.value)
    assert "round 1: every sampled partner failed (2 of 2)" in message
    assert "tied" in message and "grad-sample-mode" in message
    assert not (out / "summary.json").exists()
    types = [json.loads(x)["type"] for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert E.ROUND_COMPLETED not in types and E.EXAMPLE_DP not in types
    assert verify_run(out).ok  # the stopped run's record is intact


def test_auto_trains_the_same_model(tmp_path: Path) -> None:
    cfg = _config(tmp_path, rounds=1)
    summary = Federation.open(InProcessGrid(2), cfg, Path(cfg.out)).run()
    assert summary["rounds_completed"] == 1
    assert len(summary["privacy"]["example_level"]) == 2
