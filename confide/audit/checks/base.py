"""What every check shares: its result, and the tolerance of numeric comparisons."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from confide.privacy.ledger import Problem

REL_TOLERANCE = 0.01


def close(a: float | None, b: float | None, rel: float = REL_TOLERANCE) -> bool:
    """|a - b| <= rel * |b| (b = the independent replay), with inf == inf, None == None."""
    if a is None or b is None:
        return a is None and b is None
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rel * abs(b) + 1e-9


@dataclass
class CheckResult:
    """The findings of one check: its problems (each naming the ledger entry where it can),
    a one-line detail, and whether it had nothing to check (SKIP)."""

    name: str
    problems: list[Problem] = field(default_factory=list)
    detail: str = ""
    skipped: bool = False

    @property
    def status(self) -> str:
        if self.problems:
            return "FAIL"
        return "SKIP" if self.skipped else "PASS"

    def add(self, reason: str, index: int | None = None) -> None:
        self.problems.append(Problem(self.name, reason, index))
