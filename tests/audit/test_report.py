"""Report: self-contained HTML with embedded PNGs, and Markdown."""

from __future__ import annotations

from confide.audit.report import main, write_report

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
