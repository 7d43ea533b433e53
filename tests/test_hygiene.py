"""Code hygiene that neither ruff nor mypy checks: every `type: ignore` names its error
code and says why (`# type: ignore[code]  # reason`)."""

from __future__ import annotations

import re
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
