"""Fast checks of the deployment helpers: key files, certificate names, app signatures,
and the launchers' refusal of insecure mode."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from flwr.cli.build import build_fab_from_disk

from confide.cli import main as confide_main
from confide.deploy import app_signing, pki


def test_key_files_and_server_names(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    cert_path, key_path = pki.server_cert(tmp_path, ["fl.example.org", "10.0.0.5"])
    node_key, node_pub = pki.node_key(tmp_path / "nodes", "partner")
    for private in (tmp_path / pki.CA_KEY, key_path, node_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    san = x509.load_pem_x509_certificate(cert_path.read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.5")} <= set(
        san.get_values_for_type(x509.IPAddress))
    assert pki.check_node_public_key(node_pub).fingerprint.startswith("SHA256:")
    with pytest.raises(pki.PkiError, match="refusing to overwrite"):
        pki.node_key(tmp_path / "nodes", "partner")


def _app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "pkg" / "__init__.py").write_text("")
    (app / "pkg" / "client.py").write_text("app = None\n")
    (app / "pyproject.toml").write_text(
        '[project]\nname = "demo"\nversion = "1.0.0"\n'
        '[tool.flwr.app]\npublisher = "demo"\n'
        '[tool.flwr.app.components]\nserverapp = "pkg.client:app"\n'
        'clientapp = "pkg.client:app"\n[tool.flwr.app.config]\nrounds = 1\n')
    return app


def test_signed_bundle_verifies_and_tampering_is_caught(tmp_path: Path) -> None:
    app = _app(tmp_path)
    key, pub = pki.publisher_key(tmp_path / "pub")
    trusted_file = tmp_path / "trusted.yaml"
    app_signing.add_trusted_publisher(trusted_file, pub)
    trusted = app_signing.load_trusted_publishers(trusted_file)
    with pytest.raises(app_signing.AppVerificationError, match="not signed"):
        app_signing.verify_fab(build_fab_from_disk(app), trusted)
    app_signing.sign_app(app, key)
    assert app_signing.verify_fab(build_fab_from_disk(app), trusted) in trusted
    (app / "pkg" / "client.py").write_text("app = 'exfiltrate'\n")
    with pytest.raises(app_signing.AppVerificationError, match=r"pkg/client\.py"):
        app_signing.verify_fab(build_fab_from_disk(app), trusted)
    _, other_pub = pki.publisher_key(tmp_path / "other")
    other = tmp_path / "other.yaml"
    app_signing.add_trusted_publisher(other, other_pub)
    app_signing.sign_app(app, key)
    with pytest.raises(app_signing.AppVerificationError, match="not in this node's trusted"):
        app_signing.verify_fab(build_fab_from_disk(app), app_signing.load_trusted_publishers(
            other))


def test_insecure_needs_explicit_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["deploy", "superlink", "--state", str(tmp_path / "s"), "--dry-run"]
    assert confide_main([*base, "--insecure"]) == 2
    assert "--i-understand-insecure" in capsys.readouterr().err
    assert confide_main([*base, "--insecure", "--i-understand-insecure"]) == 0
    captured = capsys.readouterr()
    assert "INSECURE MODE" in captured.err and "--insecure" in captured.out
    assert confide_main(base) == 2  # TLS by default: certificates are required
    pki.init_ca(tmp_path / "pki")
    pki.server_cert(tmp_path / "pki")
    assert confide_main([*base, "--certs", str(tmp_path / "pki")]) == 0
    out = capsys.readouterr().out
    assert "--enable-supernode-auth" in out and "--ssl-certfile" in out
    assert "--insecure" not in out
