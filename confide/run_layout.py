"""The run folder: the name of every file in it, atomic writes, and canonical JSON.

    config.toml  metrics.jsonl  summary.json  ledger.jsonl  ledger_public_key.pem
    report.html  report.md  examples.jsonl  canary_exposure.json  model/  checkpoint/

Every module that reads or writes a run folder takes the names from here, so a run folder of
one version is what the next version's audit reads.

Every file a run or a node writes goes through `atomic_write_bytes` / `atomic_write_text`:
temp file in the same folder, fsync, rename, fsync of the folder. A failure leaves the old
file (or none) and raises, so the caller can stop with a message instead of going on with a
torn file.

A core module: it imports no other confide module.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# -- the run folder (DESIGN.md, "Output contract of a run") ------------------------------
CONFIG_FILE = "config.toml"  # the resolved configuration
METRICS_FILE = "metrics.jsonl"  # one JSON object per round
SUMMARY_FILE = "summary.json"  # written when the run finishes
LEDGER_FILE = "ledger.jsonl"  # the privacy ledger (confide.privacy.ledger)
LEDGER_PUBLIC_KEY_FILE = "ledger_public_key.pem"  # pins the ledger key for the audit
REPORT_HTML_FILE = "report.html"  # written by the driver after the run (confide.audit.report)
REPORT_MD_FILE = "report.md"
EXAMPLES_FILE = "examples.jsonl"  # evaluation generations of a causal-lm run
CANARY_EXPOSURE_FILE = "canary_exposure.json"  # the canary audit's numbers (never secrets)

# The trained model of a finished run: written by the server, read by `confide.tasks.use`.
MODEL_DIR = "model"
WEIGHTS_FILE = "weights.safetensors"
MODEL_INFO_FILE = "model_info.json"

# Server-private state for resuming: latest global weights, server state, ledger key.
CHECKPOINT_DIR = "checkpoint"
SERVER_STATE_FILE = "server_state.json"  # the checkpoint's commit point
LEDGER_KEY_FILE = "ledger_key.pem"


def canonical_json(obj: Any, *, ascii_escaped: bool = False) -> bytes:
    """The one byte encoding of `obj` that is hashed or signed: keys sorted, no whitespace,
    floats as Python's shortest round-trip `repr` (parse + re-encode gives the same bytes),
    UTF-8, and no NaN/Infinity (ValueError).

    `ascii_escaped=True` is the encoding the configuration digest and app-bundle signatures
    have always used: non-ASCII characters as \\uXXXX escapes, NaN/Infinity allowed. Kept
    byte for byte so that recorded digests and existing signatures keep verifying."""
    if ascii_escaped:
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write-then-rename with fsync: a crash leaves the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str, mode: int = 0o600) -> None:
    """`atomic_write_bytes` of UTF-8 text; private (0o600) by default: node state, keys."""
    atomic_write_bytes(path, text.encode(), mode)
