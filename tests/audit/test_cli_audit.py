"""`confide audit verify` and `confide audit report` through the command line: a ledger key
obtained out of band (--public-key), a machine-readable verdict (--json), the report's
paths one per line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from confide.cli import main
from confide.privacy.ledger import public_key_hex, save_public_key
from tests.audit.conftest import RunInfo


def _verify(run: RunInfo, *extra: str) -> int:
    return main(["audit", "verify", str(run.dir), *extra])


def test_verify_with_the_servers_key_from_out_of_band_passes(
        template_run: RunInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pem = tmp_path / "server.pem"
    save_public_key(template_run.server_key, pem)
    assert _verify(template_run, "--public-key", str(pem)) == 0
    assert "VERDICT: PASS" in capsys.readouterr().out
    hex_file = tmp_path / "server.hex"  # the run key as partners see it: 64 hex digits
    hex_file.write_text(public_key_hex(template_run.server_key) + "\n")
    assert _verify(template_run, "--public-key", str(hex_file)) == 0


def test_verify_with_another_key_fails_and_says_so(
        template_run: RunInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pem = tmp_path / "other.pem"
    save_public_key(Ed25519PrivateKey.generate(), pem)
    assert _verify(template_run, "--public-key", str(pem)) == 1
    out = capsys.readouterr().out
    assert "VERDICT: FAIL" in out
    assert "ledger_public_key differs from the given key" in out


@pytest.mark.parametrize("content", ["", "not a key", "zz" * 32, "-----BEGIN PUBLIC KEY-----\n"])
def test_verify_with_an_unusable_key_file_is_a_clear_error(
        template_run: RunInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        content: str) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text(content)
    assert _verify(template_run, "--public-key", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"--public-key {bad}" in err
    assert "Traceback" not in err
    assert _verify(template_run, "--public-key", str(tmp_path / "missing.pem")) == 2


def test_verify_json_is_a_machine_readable_verdict(
        template_run: RunInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify(template_run, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["verdict"] == "PASS"
    assert result["first_problem"] is None
    assert set(result["epsilon_example_level"]) == set(template_run.partners)
    pem = tmp_path / "other.pem"
    save_public_key(Ed25519PrivateKey.generate(), pem)
    assert _verify(template_run, "--json", "--public-key", str(pem)) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["verdict"] == "FAIL"
    assert result["first_bad_entry"] == 0
    assert "differs from the given key" in result["first_problem"]


def test_report_prints_its_paths_one_per_line(
        run: RunInfo, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "report", str(run.dir)]) == 0
    out = capsys.readouterr().out
    assert "PosixPath" not in out and "(" not in out
    lines = out.splitlines()
    assert lines == ["report written:", f"  {run.dir / 'report.html'}",
                     f"  {run.dir / 'report.md'}"]
    assert (run.dir / "report.html").is_file() and (run.dir / "report.md").is_file()


def test_report_help_names_the_real_default_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["audit", "report", "--help"])
    out = capsys.readouterr().out
    assert "RUN_DIR/report.html" in out
    assert "audit_report.html" not in out
