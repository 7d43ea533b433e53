"""Canary exposure (Carlini et al. 2019): the math on known rankings and distributions,
seeded insertion into one partner's rows, and `confide audit empirical` on a causal-lm
configuration end to end (tiny causal LM, no DP, many repeats: inserted secrets rank far
above never-inserted controls; the secrets stay out of the run folder)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from confide.audit.canary import (
    CONTROL,
    INSERTED,
    CanaryFormat,
    CanaryFormatError,
    candidate_pool,
    extrapolated_exposures,
    rank,
    rank_exposure,
    rank_exposures,
    sample_secrets,
)
from confide.cli import main
from confide.empirical.canaries import (
    SECRETS_FILE,
    CanaryAuditError,
    check_trained,
    insert_rows,
)
from confide.run_layout import CANARY_EXPOSURE_FILE
from confide.tasks.causal_lm import PromptDataset

# End to end: the inserted secret must beat the controls' mean exposure by this many bits.
# One secret: a tiny random-init LM trained a few steps learns which symbol follows at each
# position rather than whole sequences, so with two inserted secrets a control mixing their
# symbols can rank as high as they do; with one, position-wise learning IS memorisation.
MARGIN_BITS = 3.0


# -- the math -------------------------------------------------------------------------------

def test_rank_and_exposure_on_known_rankings() -> None:
    cand = np.arange(1.0, 16.0)  # 15 candidates with log-perplexity 1..15
    assert rank(0.5, cand) == 1 and rank_exposure(1, 15) == pytest.approx(4.0)  # log2 16
    assert rank(15.5, cand) == 16 and rank_exposure(16, 15) == 0.0
    assert rank(3.5, cand) == 4 and rank_exposure(4, 15) == pytest.approx(2.0)
    assert rank(3.0, cand) == 4  # a tie ranks the secret after the candidate it ties
    got = rank_exposures([0.5, 3.5, 3.0, 15.5], cand)
    assert got == pytest.approx([4.0, 2.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="outside"):
        rank_exposure(17, 15)


def test_never_seen_secrets_average_one_over_ln2_bits() -> None:
    """A secret scored like any candidate has a uniform rank: E[exposure] -> 1/ln 2."""
    rng = np.random.default_rng(0)
    cand = rng.normal(size=20000)
    controls = rng.normal(size=4000)
    assert rank_exposures(controls, cand).mean() == pytest.approx(1 / math.log(2), abs=0.08)


@pytest.mark.parametrize("family", ["normal", "skewnorm"])
def test_extrapolation_recovers_the_tail_beyond_the_sample(family: str) -> None:
    rng = np.random.default_rng(1)
    cand = rng.normal(10.0, 2.0, size=5000)
    expected = -stats.norm.logcdf(-4.0) / math.log(2)  # 4 sd below: ~15.1 bits
    got = extrapolated_exposures([2.0, 10.0, 30.0], cand, family=family, space_bits=40.0)
    assert got[0] == pytest.approx(expected, abs=1.0)
    assert got[0] > math.log2(len(cand) + 1)  # beyond what the rank can show
    assert got[1] == pytest.approx(1.0, abs=0.15) and got[2] == pytest.approx(0.0, abs=0.01)
    capped = extrapolated_exposures([-100.0], cand, family=family, space_bits=13.0)
    assert capped[0] == 13.0
    with pytest.raises(ValueError, match="family"):
        extrapolated_exposures([1.0], cand, family="cauchy")


def test_format_sampling_and_exhaustive_candidates() -> None:
    fmt = CanaryFormat(slots=3, alphabet=("a", "b"))
    assert fmt.space_size == 8 and fmt.space_bits == pytest.approx(3.0)
    assert fmt.text((0, 1, 1)) == "a b b" and "_ _ _" in fmt.describe()
    drawn = sample_secrets(fmt, 2, np.random.default_rng(3))
    assert drawn == sample_secrets(fmt, 2, np.random.default_rng(3))  # seeded
    cands, exhaustive = candidate_pool(fmt, 100, np.random.default_rng(4), exclude=drawn)
    assert exhaustive and len(cands) == 6 and not set(cands) & set(drawn)
    with pytest.raises(CanaryFormatError, match="cannot draw 7"):
        sample_secrets(fmt, 7, np.random.default_rng(0), exclude=drawn)

    big = CanaryFormat()  # 10^6 six-digit codes: sampled, distinct, uniform per slot
    secrets_ = sample_secrets(big, 20, np.random.default_rng(5))
    cands, exhaustive = candidate_pool(big, 3000, np.random.default_rng(6), exclude=secrets_)
    assert not exhaustive and len(set(cands)) == 3000 and not set(cands) & set(secrets_)
    counts = np.bincount(np.asarray(cands).ravel(), minlength=10)
    assert stats.chisquare(counts).pvalue > 1e-3
    for bad in (dict(slots=0), dict(alphabet=("1",)), dict(alphabet=("1", "1")),
                dict(prefix=" ")):
        with pytest.raises(CanaryFormatError):
            CanaryFormat(**bad)  # type: ignore[arg-type]


def test_insertion_is_seeded_counted_and_keeps_the_partners_rows() -> None:
    own = PromptDataset(texts=[f"p{i}" for i in range(20)], labels=np.zeros(20, np.int64),
                        completions=[f"c{i}" for i in range(20)])
    secrets_ = [("my secret code is", "1 2 3"), ("my secret code is", "4 5 6")]
    a = insert_rows(own, secrets_, [3, 5], np.random.default_rng(7))
    b = insert_rows(own, secrets_, [3, 5], np.random.default_rng(7))
    c = insert_rows(own, secrets_, [3, 5], np.random.default_rng(8))
    assert len(a) == 28 and a.completions.count("1 2 3") == 3 \
        and a.completions.count("4 5 6") == 5
    assert a.completions == b.completions and a.completions != c.completions
    natural = [(p, q) for p, q in zip(a.texts, a.completions, strict=True) if p != secrets_[0][0]]
    assert natural == list(zip(own.texts, own.completions, strict=True))  # order kept
    assert len(own) == 20  # the partner's dataset itself is untouched


# -- end to end through the CLI ---------------------------------------------------------------

NAMES = ["Aromi", "Cotto", "Zizzi", "Wildwood", "Loch Fyne", "The Vaults"]
FOODS = ["Chinese", "Italian", "French", "Indian"]


def _rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        name, food = str(rng.choice(NAMES)), str(rng.choice(FOODS))
        out.append((f"name[{name}], food[{food}]", f"{name} serves {food} food."))
    return out


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mr", "ref"])
        w.writerows(rows)
    return path


def _in_process_simulate(cfg: Any, console: Any = None, verbose: bool = False
                         ) -> tuple[Path, dict[str, Any]]:
    """confide simulate's federation (ServerApp round loop, real ClientApp, DP trainer,
    ledger, run folder) with messages delivered in this process instead of through Ray."""
    from confide.server.federation import Federation
    from tests.inprocess import InProcessGrid

    out = Path(cfg.out)
    return out, Federation.open(InProcessGrid(cfg.clients), cfg, out).run()


@pytest.fixture(scope="module")
def audit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    import confide.simulation.runner as runner

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("canary")
    train = _write(root / "train.csv", _rows(12, 0))
    evaluation = _write(root / "eval.csv", _rows(4, 1))
    sets = {"task": "causal-lm", "model": "tiny", "fine-tune": "full", "clients": 2,
            "rounds": 1, "local-epochs": 6, "learning-rate": 0.02, "batch-size": 16,
            "physical-batch-size": 16, "max-length": 24, "data": str(train),
            "eval-data": str(evaluation), "prompt-column": "mr", "completion-column": "ref",
            "example-dp": False, "generate-prompts": 1, "max-new-tokens": 2,
            "preflight": "off"}
    argv = ["audit", "empirical", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")],
            "--canaries", "1", "--repeats", "16", "--controls", "10", "--candidates", "300",
            "--canary-slots", "4", "--audit-seed", "1", "--out", str(root / "audit")]
    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "simulate", _in_process_simulate)
    try:
        assert main(argv) == 0
    finally:
        mp.undo()
    return root / "audit"


def test_inserted_secrets_are_exposed_far_above_controls(audit_dir: Path) -> None:
    record = json.loads((audit_dir / "run" / CANARY_EXPOSURE_FILE).read_text())
    inserted = [s for s in record["secrets"] if s["kind"] == INSERTED]
    controls = [s for s in record["secrets"] if s["kind"] == CONTROL]
    assert len(inserted) == 1 and len(controls) == 10
    assert {s["repeats"] for s in inserted} == {16} and record["partner"] == 0
    mean_in = np.mean([s["rank_exposure"] for s in inserted])
    mean_ctl = np.mean([s["rank_exposure"] for s in controls])
    assert mean_in > mean_ctl + MARGIN_BITS, (mean_in, mean_ctl)
    assert np.mean([s["extrapolated_exposure"] for s in inserted]) > \
        np.mean([s["extrapolated_exposure"] for s in controls]) + 2.0
    assert record["claimed_epsilon"] is None and not record["example_dp"]


def test_secrets_are_recorded_only_in_the_audit_folder(audit_dir: Path) -> None:
    secret = json.loads((audit_dir / SECRETS_FILE).read_text())
    texts = [s["completion"] for s in secret["secrets"]]
    assert secret["partner"] == 0 and isinstance(secret["seed"], int) and len(texts) == 11
    with (audit_dir / "data" / "partners" / "partner000.csv").open() as fh:
        mine = [row["ref"] for row in csv.DictReader(fh)]
    with (audit_dir / "data" / "partners" / "partner001.csv").open() as fh:
        other = [row["ref"] for row in csv.DictReader(fh)]
    for s in secret["secrets"]:
        assert mine.count(s["completion"]) == s["repeats"]  # controls: 0
        assert s["completion"] not in other
    run = audit_dir / "run"
    for path in run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".toml", ".md", ".html",
                                              ".csv", ".txt"):
            body = path.read_text(errors="replace")
            assert not [t for t in texts if t in body], path


def test_report_shows_the_exposure_summary(audit_dir: Path) -> None:
    from confide.audit.report import CANARY_TITLE

    md = (audit_dir / "run" / "report.md").read_text()
    assert CANARY_TITLE in md and "inserted, 16 repeats" in md
    assert "controls (never inserted)" in md and "partner 0" in md
    assert CANARY_TITLE in (audit_dir / "run" / "report.html").read_text()


def test_bad_canary_settings_name_the_flag(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = _write(tmp_path / "t.csv", _rows(4, 2))
    base = ["audit", "empirical", "--set", "task=causal-lm", "--set", "model=tiny",
            "--set", f"data={data}", "--set", "prompt-column=mr", "--set",
            "completion-column=ref", "--set", "clients=2"]
    assert main([*base, "--canary-partner", "2", "--out", str(tmp_path / "a")]) == 2
    assert "canary partner = 2; allowed: 0..1" in capsys.readouterr().err
    assert main([*base, "--repeats", "1,x", "--out", str(tmp_path / "b")]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert main([*base, "--canary-alphabet", "7", "--out", str(tmp_path / "c")]) == 2
    assert "alphabet" in capsys.readouterr().err


def test_a_run_that_trained_nothing_is_not_measured(tmp_path: Path) -> None:
    """Every round failed (seen: Opacus ghost clipping refusing tied weights): the model is
    the initial one; its low exposure must not pass for privacy."""
    rows = [{"round": r, "num_clients_aggregated": 0} for r in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CanaryAuditError, match="no round aggregated"):
        check_trained(tmp_path)
    rows[1]["num_clients_aggregated"] = 1
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_trained(tmp_path)
