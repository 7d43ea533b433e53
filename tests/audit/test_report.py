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
