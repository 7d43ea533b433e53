"""Canary exposure, the math alone (Carlini, Liu, Erlingsson, Kos and Song 2019, "The
Secret Sharer"): secret formats, candidate sampling, ranks and exposure.

A *format* is a fixed prefix and `slots` random symbols from an `alphabet`, e.g.
"my secret code is" + "4 8 1 5 2 9": its *space* R holds len(alphabet)**slots secrets.
A model's log-perplexity of a secret is -log2 Pr(secret | prefix) (bits, summed over its
tokens); the lower, the more the model prefers it. The *exposure* of a secret s is

    exposure(s) = log2 |R| - log2 rank(s),

rank(s) being s's position (1 = lowest log-perplexity) among all of R. A secret the model
never saw sits somewhere in the middle (expected exposure about 1/ln 2 = 1.44 bits); a
memorised one ranks first, exposure log2 |R|.

When R is too large to score whole, two estimates (both in the paper, section 4.3):
- *by rank* against `n` candidates sampled uniformly from R: log2(n + 1) - log2 rank. It
  cannot exceed log2(n + 1) bits, the resolution of the sample.
- *by extrapolation*: fit a distribution (skew-normal as in the paper, or normal) to the
  candidates' log-perplexities and take exposure = -log2 F(log-perplexity of s), the
  estimated fraction of R that the model prefers to s. It reaches beyond log2(n + 1)
  (capped at log2 |R|), at the price of the fit's assumption.

Candidates never include a secret being measured (an inserted canary or a control), so
each secret is ranked against non-secret sequences only: "the space" of a secret is the
candidates plus itself. When the candidates are the whole space minus the secrets
(`candidate_pool` enumerates small spaces) the rank exposure is exact.

Ties in log-perplexity rank the secret after the candidates it ties with, so tie-breaking
never overstates exposure.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from confide.errors import ConfideError

Secret = tuple[int, ...]  # symbol indices into the format's alphabet, one per slot
FAMILIES = ("skewnorm", "normal")


class CanaryFormatError(ConfideError, ValueError):
    """A canary format or sampling request that cannot work (message names the value)."""


@dataclass(frozen=True)
class CanaryFormat:
    """Prefix (the prompt) and `slots` symbols from `alphabet` joined by `separator`
    (the completion): "my secret code is" -> "4 8 1 5 2 9"."""

    prefix: str = "my secret code is"
    slots: int = 6
    alphabet: tuple[str, ...] = tuple("0123456789")
    separator: str = " "

    def __post_init__(self) -> None:
        if not self.prefix.strip():
            raise CanaryFormatError("canary prefix is empty; give the fixed text before "
                                    "the secret, e.g. 'my secret code is'")
        if self.slots < 1:
            raise CanaryFormatError(f"canary slots = {self.slots}; allowed: >= 1")
        if len(self.alphabet) < 2:
            raise CanaryFormatError(f"canary alphabet {''.join(self.alphabet)!r} has "
                                    f"{len(self.alphabet)} symbol(s); allowed: >= 2")
        if len(set(self.alphabet)) != len(self.alphabet):
            raise CanaryFormatError(f"canary alphabet {''.join(self.alphabet)!r} repeats "
                                    "a symbol; symbols must be distinct")
        if any(not s.strip() or s != s.strip() for s in self.alphabet):
            raise CanaryFormatError("canary alphabet symbols must be non-blank, without "
                                    "surrounding spaces")

    @property
    def space_size(self) -> int:
        return len(self.alphabet) ** self.slots

    @property
    def space_bits(self) -> float:
        """log2 |R|: the largest exposure any secret of this format can have."""
        return self.slots * math.log2(len(self.alphabet))

    def text(self, secret: Secret) -> str:
        """The completion text of a secret (without the prefix)."""
        if len(secret) != self.slots:
            raise CanaryFormatError(f"secret has {len(secret)} symbols; format has "
                                    f"{self.slots} slots")
        return self.separator.join(self.alphabet[i] for i in secret)

    def describe(self) -> str:
        """The format without any secret, e.g. 'my secret code is _ _ _ _ _ _' (10^6)."""
        blanks = self.separator.join("_" for _ in range(self.slots))
        return (f"{self.prefix} {blanks} (alphabet {''.join(self.alphabet)!r}, "
                f"{len(self.alphabet)}^{self.slots} secrets)")


def sample_secrets(fmt: CanaryFormat, n: int, rng: np.random.Generator,
                   exclude: Collection[Secret] = ()) -> list[Secret]:
    """`n` distinct secrets drawn uniformly from the space, none of them in `exclude`."""
    available = fmt.space_size - len(set(exclude))
    if n < 0 or n > available:
        raise CanaryFormatError(f"cannot draw {n} distinct secrets: the format "
                                f"{fmt.describe()} leaves {available} after exclusions")
    if n > available // 2:  # dense: enumerate what is left and choose among it
        left = [s for s in _enumerate(fmt) if s not in set(exclude)]
        pick = rng.choice(len(left), size=n, replace=False)
        return [left[int(i)] for i in pick]
    seen = set(exclude)
    out: list[Secret] = []
    while len(out) < n:
        for row in rng.integers(0, len(fmt.alphabet), size=(2 * (n - len(out)) + 8,
                                                              fmt.slots)):
            secret = tuple(int(v) for v in row)
            if secret not in seen:
                seen.add(secret)
                out.append(secret)
                if len(out) == n:
                    break
    return out


def candidate_pool(fmt: CanaryFormat, n: int, rng: np.random.Generator,
                   exclude: Collection[Secret]) -> tuple[list[Secret], bool]:
    """Candidates to rank the secrets against: the whole space minus `exclude` when that
    is at most `n` sequences (exhaustive: exact exposure), else `n` sampled uniformly
    without replacement. Returns (candidates, exhaustive)."""
    if n < 1:
        raise CanaryFormatError(f"candidates = {n}; allowed: >= 1")
    excluded = set(exclude)
    if fmt.space_size - len(excluded) <= n:
        return [s for s in _enumerate(fmt) if s not in excluded], True
    return sample_secrets(fmt, n, rng, excluded), False


def _enumerate(fmt: CanaryFormat) -> list[Secret]:
    if fmt.space_size > 10_000_000:
        raise CanaryFormatError(f"{fmt.describe()} is too large to enumerate")
    return list(itertools.product(range(len(fmt.alphabet)), repeat=fmt.slots))


def rank(secret_score: float, candidate_scores: np.ndarray) -> int:
    """Position of the secret (1 = lowest log-perplexity) among itself and the candidates;
    candidates that tie with it rank before it."""
    scores = np.asarray(candidate_scores, dtype=np.float64)
    return 1 + int(np.count_nonzero(scores <= secret_score))


def rank_exposure(rank_: int, n_candidates: int) -> float:
    """log2(n + 1) - log2 rank: exposure in the space of the n candidates plus the secret."""
    if n_candidates < 1:
        raise ValueError(f"n_candidates = {n_candidates}; allowed: >= 1")
    if not 1 <= rank_ <= n_candidates + 1:
        raise ValueError(f"rank {rank_} outside 1..{n_candidates + 1}")
    return math.log2(n_candidates + 1) - math.log2(rank_)


def rank_exposures(secret_scores: Sequence[float] | np.ndarray,
                   candidate_scores: np.ndarray) -> np.ndarray:
    """Rank exposure of every secret against the same candidates."""
    cand = np.sort(np.asarray(candidate_scores, dtype=np.float64))
    ranks = 1 + np.searchsorted(cand, np.asarray(secret_scores, dtype=np.float64),
                                side="right")
    return np.log2(len(cand) + 1) - np.log2(ranks)


def extrapolated_exposures(secret_scores: Sequence[float] | np.ndarray,
                           candidate_scores: np.ndarray, *, family: str = "skewnorm",
                           space_bits: float = math.inf) -> np.ndarray:
    """-log2 F(score) for each secret, F the `family` distribution fitted to the
    candidates' log-perplexities (skew-normal by maximum likelihood, or normal by mean and
    standard deviation); at least 0, at most `space_bits` (log2 |R|)."""
    from scipy import stats

    cand = np.asarray(candidate_scores, dtype=np.float64)
    x = np.asarray(secret_scores, dtype=np.float64)
    if len(cand) < 3 or not np.all(np.isfinite(cand)):
        raise ValueError(f"need at least 3 finite candidate scores to fit, got {len(cand)}")
    sd = float(cand.std(ddof=1))
    if sd == 0.0:  # the model scores every candidate alike: a secret below them all
        bits = np.where(x < cand[0], space_bits, 0.0)
        return np.asarray(bits, dtype=np.float64)
    if family == "normal":
        logcdf = stats.norm.logcdf(x, loc=float(cand.mean()), scale=sd)
    elif family == "skewnorm":
        a, loc, scale = stats.skewnorm.fit(cand)
        logcdf = stats.skewnorm.logcdf(x, a, loc=loc, scale=scale)
    else:
        raise ValueError(f"family = {family!r}; allowed: {', '.join(FAMILIES)}")
    return np.clip(-np.asarray(logcdf) / math.log(2.0), 0.0, space_bits)


# -- the audit's record in the run folder (read by the audit and by the report) --------------
# (the file: confide.run_layout.CANARY_EXPOSURE_FILE, in the run folder: numbers only)
INSERTED, CONTROL = "inserted", "control"


def summary_rows(record: dict[str, Any]) -> list[list[str]]:
    """One row per group (inserted by repeat count, then controls) of a canary_exposure.json
    record; shared by the console table and the report."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for s in record["secrets"]:
        groups.setdefault((s["kind"], int(s["repeats"])), []).append(s)
    order = sorted((k for k in groups if k[0] == INSERTED), key=lambda k: k[1])
    order += [k for k in groups if k[0] == CONTROL]
    rows = []
    for kind, r in order:
        chosen = groups[(kind, r)]
        by_rank = [s["rank_exposure"] for s in chosen]
        extra = [s["extrapolated_exposure"] for s in chosen]
        name = (f"inserted, {r} repeat{'s' if r != 1 else ''}" if kind == INSERTED
                else "controls (never inserted)")
        rows.append([name, str(len(chosen)), f"{np.mean(by_rank):.2f}",
                     f"{np.median(by_rank):.2f}", f"{np.mean(extra):.2f}",
                     f"{np.max(extra):.2f}"])
    return rows


def summary_note(record: dict[str, Any]) -> str:
    eps = record.get("claimed_epsilon")
    privacy = (f"example-level DP, claimed epsilon {eps:.3f} (delta {record['delta']:g}) per "
               "record; r repeats of a secret are r records" if record.get("example_dp")
               and eps is not None else "no example-level DP")
    cands = (f"all {record['candidates']} other sequences of the format (exact)"
             if record.get("exhaustive") else f"{record['candidates']} random candidates")
    return (f"Format {record['format']}; secrets inserted into partner {record['partner']}'s "
            f"data; ranked against {cands}: rank exposure at most "
            f"{math.log2(record['candidates'] + 1):.2f} bits, extrapolated "
            f"({record['family']} fit) at most {record['space_bits']:.2f} bits. A secret "
            f"never seen has about 1.44 bits on average. {privacy}.")
