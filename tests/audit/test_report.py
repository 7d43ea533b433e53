"""Report: self-contained HTML with embedded PNGs, and Markdown."""

from __future__ import annotations

import pytest

from confide.audit.report import RunReport, main, write_report, write_report_after_run
from confide.run_layout import REPORT_HTML_FILE, REPORT_MD_FILE

from .conftest import RunInfo


def test_report_html_and_markdown(run: RunInfo) -> None:
    html_path, md_path = write_report(run.dir)
    html = html_path.read_text()
    assert "Verification: <span style='color:#1a7f37'>PASS" in html
    assert html.count("data:image/png;base64,") == 2
    for partner in run.partners:
        assert partner in html
    assert "gaussian_fixed_clipping" in html and "secure aggregation" in html
    assert "budget refusal" in html
    md = md_path.read_text()
    assert "**PASS**" in md and "report_assets/epsilon.png" in md
    assert (run.dir / "report_assets" / "epsilon.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_tampered_run_says_fail(run: RunInfo) -> None:
    (run.dir / "model" / "weights.safetensors").write_bytes(b"x")
    assert main([str(run.dir)]) == 0
    assert "FAIL" in (run.dir / "report.html").read_text()


def test_report_labels_a_synthetic_data_run(run: RunInfo) -> None:
    import json

    html_path, md_path = write_report(run.dir)
    assert "SYNTHETIC" not in html_path.read_text()
    summary_path = run.dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "synthetic_data": True}))
    html_path, md_path = write_report(run.dir)
    assert "SYNTHETIC demo corpus" in html_path.read_text()
    assert "SYNTHETIC demo corpus" in md_path.read_text()


def test_driver_report_after_a_run_writes_both_files(run: RunInfo) -> None:
    warnings: list[str] = []
    paths = write_report_after_run(run.dir, 3, warnings.append)
    assert paths == (run.dir / REPORT_HTML_FILE, run.dir / REPORT_MD_FILE)
    assert not warnings and all(p.is_file() for p in paths)


def test_driver_report_that_fails_otherwise_is_a_warning_and_the_run_stands(
        run: RunInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_plot(_self: RunReport) -> str:
        raise RuntimeError("no font")
    monkeypatch.setattr(RunReport, "html", broken_plot)
    warnings: list[str] = []
    assert write_report_after_run(run.dir, 3, warnings.append) is None
    assert len(warnings) == 1 and "no font" in warnings[0]
    assert f"confide audit report {run.dir}" in warnings[0]
    assert not (run.dir / REPORT_HTML_FILE).exists()
