"""A plain run with client-level DP (the server's Gaussian noise, fixed clipping), end to
end: the ledger holds one ClientLevelGaussian per round, the run's claim is PLD of them,
and the audit verifies it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from confide.audit.verify import verify_run
from confide.config import build_config
from confide.privacy import ledger_events as E
from confide.privacy.accountant import PLD, pld_epsilon
from confide.privacy.mechanisms import ClientLevelGaussian
from confide.server.federation import Federation
from tests.inprocess import InProcessGrid

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_client_level_dp_run_records_its_releases_and_verifies(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    cfg = build_config({"model": "tiny", "clients": 3, "rounds": 2, "client-dp": True,
                        "client-dp-noise-multiplier": 1.2, "client-dp-clipping-norm": 0.5,
                        "preflight": "off", "seed": 3, "out": str(out)})
    summary = Federation.open(InProcessGrid(3), cfg, out).run()
    entries = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    events = [E.ClientDpEvent.from_payload(e["payload"]) for e in entries
              if e["type"] == E.CLIENT_DP]
    assert [e.round for e in events] == [1, 2]
    assert all(e.mechanism == ClientLevelGaussian(1.2, 0.5, 3, 3, sample_rate=1.0)
               and e.accountant == PLD for e in events)
    assert summary["privacy"]["client_level_epsilon"] == pld_epsilon(
        [e.mechanism for e in events], cfg.delta) == events[-1].epsilon_claimed
    result = verify_run(out)
    assert result.ok, [str(p) for c in result.checks for p in c.problems]


def test_the_servers_noise_is_not_a_function_of_the_recorded_configuration(
        tmp_path: Path) -> None:
    # The attacker: anyone holding a run folder (its config.toml records the seed) re-runs
    # the recorded configuration on the same partners' updates. If the server's Gaussian
    # noise were drawn from the configuration's seed, the re-run would draw the same noise:
    # the attacker learns it and subtracts it from the released model, and client-level DP
    # protects nothing. Without example-level DP the partners' updates are deterministic,
    # so the two released models may differ only by the server's noise.
    torch.set_num_threads(1)
    digests, configs = [], []
    for attempt in ("released", "attacker"):
        out = tmp_path / attempt
        cfg = build_config({"model": "tiny", "clients": 3, "rounds": 1, "client-dp": True,
                            "example-dp": False, "client-dp-noise-multiplier": 1.0,
                            "client-dp-clipping-norm": 0.5, "preflight": "off", "seed": 3,
                            "out": str(out)})
        Federation.open(InProcessGrid(3), cfg, out).run()
        entries = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
        configs.append({k: v for k, v in entries[0]["payload"]["config"].items()
                        if k != "out"})
        digests.append([e["payload"]["sha256"] for e in entries
                        if e["type"] == E.MODEL_DIGEST])
    assert configs[0] == configs[1]  # the recorded configuration (but the folder), re-run
    assert digests[0] != digests[1], "the server's noise was reproduced"
