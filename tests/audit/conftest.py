"""A consistent synthetic run folder: 3 partners, 3 rounds, example-level DP with signed
receipts, client-level DP, secure aggregation, one budget refusal, summary.json,
metrics.jsonl and model/weights.safetensors, written through the ledger's own API."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant as FlwrRdp
from safetensors.numpy import save_file

from confide.privacy import ledger_events as ev
from confide.privacy.accountant import PartnerAccountant, Spend
from confide.privacy.ledger import Ledger, save_public_key
from confide.privacy.mechanisms import ClientLevelGaussian, SampledGaussian
from confide.privacy.receipts import dp_receipt_payload, pseudonym_of, sign_receipt
from confide.run_layout import LEDGER_FILE, LEDGER_PUBLIC_KEY_FILE

DELTA = 1e-5
ROUNDS = 3
# (sample_rate, noise_multiplier, steps) per partner; partner 2 refuses round 3.
PARTNER_PARAMS = [(0.02, 1.1, 50), (0.05, 1.3, 20), (0.01, 0.9, 100)]
# Budgets such that partner 2 refuses round 3 under either accountant of its claims.
MAX_EPSILON = {"pld": [10.0, 10.0, 1.3], "rdp": [10.0, 10.0, 1.9]}
CLIENT_SIGMA, CLIENT_CLIP = 1.5, 1.0
CONFIG = {"rounds": ROUNDS, "clients": 3, "example-dp": True, "delta": DELTA,
          "client-dp": True, "client-dp-noise-multiplier": CLIENT_SIGMA,
          "client-dp-clipping-norm": CLIENT_CLIP, "secure-aggregation": True,
          "distributed-dp": False, "secagg-bits": 32}


@dataclass
class RunInfo:
    dir: Path
    server_key: Ed25519PrivateKey
    partner_keys: list[Ed25519PrivateKey]
    partners: list[str]


def _weights(r: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(r)
    return {"lora_A": rng.normal(size=(4, 8)).astype(np.float32),
            "lora_B": rng.normal(size=(8, 4)).astype(np.float32)}


def build_run(run_dir: Path, *, rounds: int = ROUNDS, seed: int = 7,
              accountant: str = "pld") -> RunInfo:
    """Write the whole run folder; the claimed epsilons come from the partners' accountant
    (PLD today; accountant="rdp" writes a run as earlier versions did) and flwr's
    RdpAccountant (client level, as earlier versions did)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    server_key = Ed25519PrivateKey.generate()
    keys = [Ed25519PrivateKey.generate() for _ in PARTNER_PARAMS]
    names = [pseudonym_of(k) for k in keys]
    accountants = [PartnerAccountant(DELTA, m, accountant) for m in MAX_EPSILON[accountant]]
    client_acc = FlwrRdp(PrivacyConfig(DELTA, len(keys), NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       SamplingMethod.POISSON))
    blob = json.dumps(CONFIG, sort_keys=True, separators=(",", ":")).encode()
    import hashlib

    led = Ledger.create(run_dir / LEDGER_FILE, server_key)
    save_public_key(server_key, run_dir / LEDGER_PUBLIC_KEY_FILE)
    led.append(ev.RunStarted(config=dict(CONFIG), config_digest=hashlib.sha256(blob).hexdigest(),
                             code_version="confide 0.1.0+test",
                             ledger_public_key=led.public_key_hex, delta=DELTA))
    metrics = []
    for r in range(1, rounds + 1):
        led.append(ev.RoundConfigured(round=r, sampled=[f"node-{i}" for i in range(len(keys))]))
        replied, aggregated = [], []
        for key, name, acc, (q, sigma, steps) in zip(keys, names, accountants, PARTNER_PARAMS,
                                                     strict=True):
            spend = Spend(SampledGaussian(sigma, q, steps), r, led.public_key_hex)
            replied.append(name)
            try:
                acc.check(spend)
            except Exception as exc:  # BudgetExhausted
                led.append(ev.BudgetRefusal(round=r, partner=name, spent_epsilon=exc.spent,
                                            max_epsilon=exc.max_epsilon,
                                            would_be_epsilon=exc.would_be))
                continue
            eps = acc.record(spend)
            receipt = sign_receipt(dp_receipt_payload(
                spend.mechanism, round_=r, partner=name, delta=DELTA, epsilon=eps,
                accountant=acc.accountant), key)
            led.append(ev.ExampleDpEvent.from_receipt(receipt))
            aggregated.append(name)
        client_acc.compose(GaussianPrivacyEvent(CLIENT_SIGMA, len(aggregated), len(keys)))
        client_eps = client_acc.get_epsilon(DELTA)
        led.append(ev.SecureAggregationEvent(round=r, participants=aggregated, dropouts=[],
                                             threshold=2, bits=32, neighbours=2))
        # as earlier versions recorded it: flwr's RDP, Poisson sampling at sampled/population
        led.append(ev.ClientDpEvent(round=r, mechanism=ClientLevelGaussian(
            CLIENT_SIGMA, CLIENT_CLIP, len(keys), len(aggregated)), delta=DELTA,
            epsilon_claimed=client_eps, extra_params={"neighboring": "add-or-remove-one"}))
        led.append(ev.ModelDigest(round=r, sha256=ev.weights_digest(_weights(r))))
        acc_r, loss_r = 0.5 + 0.1 * r, 1.0 / r
        led.append(ev.RoundCompleted(round=r, replied=replied, aggregated=aggregated,
                                     dropped=[], accuracy=acc_r, loss=loss_r))
        metrics.append({"round": r, "num_clients_sampled": len(keys),
                        "num_clients_aggregated": len(aggregated), "accuracy": acc_r,
                        "loss": loss_r,
                        "epsilon_example_level": {n: a.epsilon() for n, a in
                                                  zip(names, accountants, strict=True)},
                        "epsilon_client_level": client_eps, "bytes_uploaded": 1000 * r,
                        "seconds": 1.5})
    led.append(ev.RunFinished(rounds_completed=rounds))
    led.close()
    (run_dir / "model").mkdir(exist_ok=True)
    save_file(_weights(rounds), str(run_dir / "model" / "weights.safetensors"))
    # what a simulation's run folder also holds: the server's last checkpoint and each
    # virtual partner's own node state (its accountant remembers what it spent)
    (run_dir / "checkpoint").mkdir(exist_ok=True)
    save_file(_weights(rounds), str(run_dir / "checkpoint" / f"global_round{rounds}.safetensors"))
    (run_dir / "checkpoint" / "server_state.json").write_text(json.dumps(
        {"round": rounds, "weights": f"global_round{rounds}.safetensors",
         "config_digest": hashlib.sha256(blob).hexdigest()}))
    for i, (key, acc) in enumerate(zip(keys, accountants, strict=True)):
        write_node_state(run_dir / "partners" / f"partition-{i}", key, acc)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    summary = {"rounds_completed": rounds,
               "final_metrics": {"accuracy": metrics[-1]["accuracy"],
                                 "loss": metrics[-1]["loss"]},
               "privacy": {"delta": DELTA,
                           "example_level": {n: a.epsilon() for n, a in
                                             zip(names, accountants, strict=True)},
                           "client_level_epsilon": metrics[-1]["epsilon_client_level"],
                           "accountant": accountant},
               "secure_aggregation": True, "distributed_dp": False}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunInfo(run_dir, server_key, keys, names)


def write_node_state(folder: Path, key: Ed25519PrivateKey, acc: PartnerAccountant,
                     pending: dict[str, list[str]] | None = None) -> None:
    """A partner's node_state.json as confide.clients.node_state writes it."""
    from cryptography.hazmat.primitives import serialization

    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node_state.json").write_text(json.dumps(
        {"accountant": acc.state_dict(), "key": raw.hex(), "noise_multiplier": None,
         "noise_run": "", "handled": [], "pending_receipts": pending or {}}))


@pytest.fixture(scope="session")
def template_run(tmp_path_factory: pytest.TempPathFactory) -> RunInfo:
    return build_run(tmp_path_factory.mktemp("template") / "run")


@pytest.fixture
def run(template_run: RunInfo, tmp_path: Path) -> RunInfo:
    """A fresh copy of the template run that a test may tamper with."""
    target = tmp_path / "run"
    shutil.copytree(template_run.dir, target)
    return RunInfo(target, template_run.server_key, template_run.partner_keys,
                   template_run.partners)
