"""The import structure of docs/ARCHITECTURE.md holds: the import-linter contracts in
pyproject.toml (layers, node and server independent of each other, audit off the server,
no cycles) are all kept, and the document names every layer of the contract."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    # a subprocess: import-linter puts the working directory on sys.path and builds its own
    # graph; the test process's imports must not leak into it
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_architecture_doc_names_every_layer_of_the_contract() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    names = {part.strip(" ()") for layer in layers for part in layer.replace("|", ":").split(":")}
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = sorted(n for n in names if f"`{n}" not in doc and f"{n}/" not in doc
                     and f"{n}.py" not in doc)
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"


def test_no_contract_excuses_an_import() -> None:
    # "no import cycle anywhere": an ignored import would be a cycle or an
    # upward import let through
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    excused = {c["name"]: c.get("ignore_imports") for c in config["contracts"]
               if c.get("ignore_imports") or c.get("allow_indirect_imports")}
    assert not excused, excused
