"""Report with many partners: the full per-partner table (sortable, scrollable), an epsilon
plot that shows their spread instead of one line each, and whole-number round ticks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.audit import report
from confide.audit.report import RunReport, write_report
from confide.privacy import ledger_events as ev
from confide.privacy.accountant import PartnerAccountant, Spend
from confide.privacy.ledger import Ledger, save_public_key
from confide.privacy.mechanisms import SampledGaussian
from confide.privacy.receipts import dp_receipt_payload, pseudonym_of, sign_receipt
from confide.run_layout import LEDGER_FILE, LEDGER_PUBLIC_KEY_FILE

DELTA = 1e-5
PARTNERS = 22  # above report.PLOT_PARTNERS_MAX
ROUNDS = 3


def build_many(run_dir: Path) -> list[str]:
    """22 partners, 3 rounds, example-level DP receipts; partner i trains in the rounds
    where (i + round) % 3 != 0 (so rounds trained differ), through the ledger's own API."""
    run_dir.mkdir(parents=True)
    server = Ed25519PrivateKey.generate()
    keys = [Ed25519PrivateKey.generate() for _ in range(PARTNERS)]
    names = [pseudonym_of(k) for k in keys]
    # one mechanism for all: the replays are cached, so 22 partners verify quickly
    accountants = [PartnerAccountant(DELTA, 50.0, "pld") for _ in keys]
    config = {"rounds": ROUNDS, "clients": PARTNERS, "example-dp": True, "delta": DELTA}
    blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    led = Ledger.create(run_dir / LEDGER_FILE, server)
    save_public_key(server, run_dir / LEDGER_PUBLIC_KEY_FILE)
    led.append(ev.RunStarted(config=config, config_digest=hashlib.sha256(blob).hexdigest(),
                             code_version="confide 0.1.0+test",
                             ledger_public_key=led.public_key_hex, delta=DELTA))
    metrics: list[dict[str, Any]] = []
    for r in range(1, ROUNDS + 1):
        led.append(ev.RoundConfigured(round=r, sampled=[f"node-{i}" for i in range(PARTNERS)]))
        trained = []
        for i, (key, name, acc) in enumerate(zip(keys, names, accountants, strict=True)):
            if (i + r) % 3 == 0:
                continue
            spend = Spend(SampledGaussian(1.0, 0.05, 10), r)
            eps = acc.record(spend)
            led.append(ev.ExampleDpEvent.from_receipt(sign_receipt(dp_receipt_payload(
                spend.mechanism, round_=r, partner=name, delta=DELTA, epsilon=eps,
                accountant="pld"), key)))
            trained.append(name)
        led.append(ev.RoundCompleted(round=r, replied=trained, aggregated=trained, dropped=[],
                                     accuracy=0.5 + 0.05 * r, loss=1.0 / r))
        metrics.append({"round": r, "num_clients_sampled": PARTNERS,
                        "num_clients_aggregated": len(trained), "accuracy": 0.5 + 0.05 * r,
                        "loss": 1.0 / r,
                        "epsilon_example_level": {n: a.epsilon() for n, a in
                                                  zip(names, accountants, strict=True)},
                        "epsilon_client_level": None, "bytes_uploaded": 10, "seconds": 1.0})
    led.append(ev.RunFinished(rounds_completed=ROUNDS))
    led.close()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return names


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunReport, list[str]]:
    """The run and its report (verified once: the replay of 22 partners takes a while)."""
    run_dir = tmp_path_factory.mktemp("many") / "run"
    names = build_many(run_dir)
    return RunReport(run_dir), names


def test_full_partner_table_is_sortable_and_counts_rounds(
        many: tuple[RunReport, list[str]]) -> None:
    rep, names = many
    html_path, md_path = write_report(rep.run_dir, result=rep.result)
    html = html_path.read_text()
    table = html.split("Final epsilon per partner", 1)[1].split("</table>", 1)[0]
    assert f"({PARTNERS} partners; click a column to sort)" in html
    assert "<table class='sortable'>" in table and "max-height:480px" in html
    assert all(name in table for name in names)  # every partner, no summary
    assert "document.currentScript.previousElementSibling" in html  # the sort script
    md = md_path.read_text()
    assert all(f"| {name} |" in md for name in names)
    # rounds trained per partner, from the ledger: partner i skips the round r with
    # (i + r) % 3 == 0, i.e. one of the three rounds
    rows = rep._epsilon_rows()
    assert [row[5] for row in rows] == ["2"] * PARTNERS


def test_plots_use_whole_rounds_and_many_partners_a_band(
        many: tuple[RunReport, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    figures: list[Any] = []

    def keep(fig: Any) -> bytes:  # the figures themselves, to read their axes
        figures.append(fig)
        return b""

    monkeypatch.setattr(report, "_png", keep)
    many[0].figures()
    assert len(figures) == 2  # epsilon, accuracy
    for fig in figures:
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    assert legend == [f"{PARTNERS} partners: min-max", "median partner"]


def test_step_value() -> None:
    assert report._step_value([1, 3], [0.5, 0.9], 0) == 0.0
    assert report._step_value([1, 3], [0.5, 0.9], 2) == 0.5
    assert report._step_value([1, 3], [0.5, 0.9], 3) == 0.9
