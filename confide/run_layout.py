"""Writing run and node files so that a crash or a full disk never leaves half a file.

Every file a run or a node writes goes through `atomic_write_bytes` / `atomic_write_text`:
temp file in the same folder, fsync, rename, fsync of the folder. A failure leaves the old
file (or none) and raises, so the caller can stop with a message instead of going on with a
torn file. (Issue 12 moves the run folder's file names here too.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The trained model of a finished run: written by the server, read by `confide.tasks.use`.
MODEL_DIR = "model"
WEIGHTS_FILE = "weights.safetensors"
MODEL_INFO_FILE = "model_info.json"


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
