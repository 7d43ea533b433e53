"""The server's access to the run folder of DESIGN.md's output contract, and the checkpoint
inside it (server-private: latest global weights, server state, ledger key). The file names
are `confide.run_layout`'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load_file, save_file

from confide.config import RunConfig
from confide.errors import ConfideError
from confide.run_layout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    EXAMPLES_FILE,
    LEDGER_FILE,
    LEDGER_KEY_FILE,
    LEDGER_PUBLIC_KEY_FILE,
    METRICS_FILE,
    MODEL_DIR,
    MODEL_INFO_FILE,
    REPORT_HTML_FILE,
    SERVER_STATE_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    atomic_write_text,
)
from confide.server.faults import crash_point

OPTIMIZER_PREFIX = "server_optimizer_round"


class CheckpointError(ConfideError, RuntimeError):
    """A checkpoint is missing, unreadable or does not match the run."""


@dataclass
class RunFolder:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_HTML_FILE

    @property
    def examples(self) -> Path:
        """Evaluation examples a task writes (causal-lm: generations with references)."""
        return self.root / EXAMPLES_FILE

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def ledger_key(self) -> Path:
        return self.checkpoint_dir / LEDGER_KEY_FILE

    @property
    def server_state(self) -> Path:
        """The checkpoint's commit point: it names the weights of the last checkpoint."""
        return self.checkpoint_dir / SERVER_STATE_FILE

    @property
    def ledger_public_key(self) -> Path:
        return self.root / LEDGER_PUBLIC_KEY_FILE

    def create(self, cfg: RunConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(exist_ok=True)
        os.chmod(self.checkpoint_dir, 0o700)
        cfg.write_toml(self.config)

    # -- metrics ---------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def append_examples(self, rows: list[dict[str, Any]]) -> None:
        with self.examples.open("a") as fh:
            fh.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a row cut short by a full disk: its round re-runs
                continue
        return rows

    def truncate_metrics(self, rounds: int) -> None:
        """Drop rows after `rounds` (a crash between metrics and checkpoint)."""
        rows = [r for r in self.read_metrics() if r["round"] <= rounds]
        atomic_write_text(self.metrics, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.summary, json.dumps(summary, indent=2, sort_keys=True) + "\n")

    # -- model -----------------------------------------------------------------------
    def save_model(self, state: dict[str, np.ndarray], cfg: RunConfig, extra: dict[str, Any]
                   ) -> Path:
        self.model_dir.mkdir(exist_ok=True)
        path = self.model_dir / WEIGHTS_FILE
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
        info = {"task": cfg.task, "max-length": cfg.max_length,
                "max-new-tokens": cfg.max_new_tokens, "model": cfg.model,
                "fine-tune": cfg.fine_tune, "lora-rank": cfg.lora_rank,
                "lora-alpha": cfg.lora_alpha, "lora-targets": cfg.lora_targets,
                "num-labels": cfg.num_labels, "seed": cfg.seed, "pooling": cfg.pooling,
                "lora-dropout": cfg.lora_dropout, "lora-freeze-a": cfg.lora_freeze_a,
                "freeze-embeddings": cfg.freeze_embeddings, **extra,
                "load": "confide.tasks.use.load_trained_model(run_dir)"}
        atomic_write_text(self.model_dir / MODEL_INFO_FILE, json.dumps(info, indent=2))
        return path

    # -- ledger key ------------------------------------------------------------------
    def ledger_signing_key(self) -> Ed25519PrivateKey:
        """The server's ledger key: created with the run, reused on resume."""
        if self.ledger_key.exists():
            key = serialization.load_pem_private_key(self.ledger_key.read_bytes(), None)
            if not isinstance(key, Ed25519PrivateKey):
                raise CheckpointError(f"{self.ledger_key} is not an Ed25519 key")
            return key
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        atomic_write_text(self.ledger_key, pem.decode())
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        atomic_write_text(self.ledger_public_key, public.decode())
        os.chmod(self.ledger_public_key, 0o644)
        return key

    # -- checkpoint ------------------------------------------------------------------
    def save_checkpoint(self, round_: int, state: dict[str, np.ndarray],
                        server_state: dict[str, Any],
                        optimizer_arrays: dict[str, np.ndarray] | None = None) -> None:
        """Weights (and server-optimizer moments) first, then the JSON that names them:
        the JSON is the commit point."""
        weights = self.checkpoint_dir / f"global_round{round_}.safetensors"
        tmp = weights.with_suffix(".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
        crash_point("mid-checkpoint", round_, run_dir=self.root)  # leaves the temp file
        os.replace(tmp, weights)
        server_state = {**server_state, "round": round_, "weights": weights.name}
        if optimizer_arrays:
            # moments are as large as the weights: binary, not JSON
            moments = self.checkpoint_dir / f"{OPTIMIZER_PREFIX}{round_}.safetensors"
            tmp = moments.with_suffix(".tmp")
            save_file({k: np.ascontiguousarray(v) for k, v in optimizer_arrays.items()},
                      str(tmp))
            os.replace(tmp, moments)
            server_state["optimizer_arrays"] = moments.name
        atomic_write_text(self.server_state, json.dumps(server_state, sort_keys=True))
        for old in self.checkpoint_dir.glob("global_round*.safetensors"):
            if old != weights:
                old.unlink()
        for old in self.checkpoint_dir.glob(f"{OPTIMIZER_PREFIX}*.safetensors"):
            if old.name != server_state.get("optimizer_arrays"):
                old.unlink()

    def load_checkpoint(self) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
        path = self.server_state
        if not path.exists():
            raise CheckpointError(f"no checkpoint in {self.checkpoint_dir}: nothing to resume")
        try:
            server_state = json.loads(path.read_text())
            weights = load_file(str(self.checkpoint_dir / server_state["weights"]))
        except (json.JSONDecodeError, KeyError, OSError, Exception) as exc:
            raise CheckpointError(f"checkpoint in {self.checkpoint_dir} is corrupted: {exc}") \
                from None
        return int(server_state["round"]), dict(weights), server_state

    def load_optimizer_arrays(self, server_state: dict[str, Any]) -> dict[str, np.ndarray]:
        """The server-optimizer moments a checkpoint names ({} when it names none)."""
        name = server_state.get("optimizer_arrays")
        if not name:
            return {}
        try:
            return dict(load_file(str(self.checkpoint_dir / name)))
        except Exception as exc:
            raise CheckpointError(f"server-optimizer state {name} in {self.checkpoint_dir} "
                                  f"is unreadable: {exc}") from None
