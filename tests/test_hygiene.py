"""Code hygiene that neither ruff nor mypy checks: every `type: ignore` names its error
code and says why (`# type: ignore[code]  # reason`); the repository speaks only of the
product, never of how it was made (no work-log references such as a numbered session,
issue or item); no function in the package is longer than a reader can hold."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<rest>.*)$")
WITH_REASON = re.compile(r"^\[[a-z-]+(,[a-z-]+)*\]\s+#\s*\S")


def test_every_type_ignore_has_a_code_and_a_reason() -> None:
    bare = []
    for path in sorted((ROOT / "confide").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = IGNORE.search(line)
            if match and not WITH_REASON.match(match.group("rest")):
                bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bare, "type: ignore without [code]  # reason:\n" + "\n".join(bare)


# A numbered reference to the work log: "session", "issue" or "item" (any case, plural too)
# followed by its number after a space, '#', ':', '-' or '_' (a file name such as
# "test_issueN_inputs.py" too). The examples below write the number as {n}, so that this
# file passes its own test.
WORK_LOG = re.compile(r"(?<![a-z])(session|issue|item)s?[ \t#:_-]{0,2}\d", re.IGNORECASE)
SPOKEN = ("README.md", "docs", "confide", "tests", "benchmarks")


def _spoken_files() -> Iterator[Path]:
    for name in SPOKEN:
        top = ROOT / name
        paths = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in paths:
            if path.is_file() and "__pycache__" not in path.parts:
                yield path


def test_the_repository_speaks_only_of_the_product() -> None:
    found = []
    for path in _spoken_files():
        rel = path.relative_to(ROOT)
        if WORK_LOG.search(str(rel)):
            found.append(f"{rel}: the file name")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary fixtures (weights, keys) hold no prose
        for number, line in enumerate(text.splitlines(), start=1):
            for match in WORK_LOG.finditer(line):
                shown = line[max(0, match.start() - 30):match.end() + 30]
                found.append(f"{rel}:{number}: ...{shown}...")
    assert not found, ("say what the product does, not which work item made it:\n"
                       + "\n".join(found))


def test_the_work_log_pattern_catches_what_it_is_for() -> None:
    for template in ("Session {n}", "(issue {n}, item {n})", "Issue {n} item {n}", "Items {n}",
                     "issue #{n}", "sessions {n}-19", "test_issue{n}_inputs.py",
                     "the session-{n} server step", "ISSUE:{n}"):
        text = template.format(n=24)
        assert WORK_LOG.search(text), text
    for text in ("sessions[0]", "key=lambda item: item[0]", "an open issue", "session key",
                 "item_count", "issuer 3"):
        assert not WORK_LOG.search(text), text


MAX_FUNCTION_LINES = 80


def _function_lengths() -> dict[str, int]:
    """'path::Class.method' (nested functions as 'outer.inner') -> lines from `def` to the
    last line of the body, for every function in the package."""
    lengths: dict[str, int] = {}

    def walk(node: ast.AST, rel: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                lengths[f"{rel}::{name}"] = (child.end_lineno or child.lineno) - child.lineno + 1
                walk(child, rel, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, rel, prefix + child.name + ".")
            else:
                walk(child, rel, prefix)

    for path in sorted((ROOT / "confide").rglob("*.py")):
        walk(ast.parse(path.read_text()), str(path.relative_to(ROOT)), "")
    return lengths


def test_no_function_over_80_lines() -> None:
    lengths = _function_lengths()
    assert "confide/server/federation.py::Federation.run_round" in lengths  # methods are seen
    long = sorted(f"{name}: {n} lines" for name, n in lengths.items()
                  if n > MAX_FUNCTION_LINES)
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (split them):\n"
                      + "\n".join(long))
