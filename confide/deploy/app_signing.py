"""Signed app bundles: the publisher signs the exact file list of the FAB, partners run
only bundles signed by a publisher they trust.

Why Confide does this itself: Flower 1.41's `flower-supernode --trusted-entities` checks
signatures that only Flower Hub supplies (the `verifications` of a FAB fetched from the Hub);
a FAB sent by `flwr run` to a self-hosted SuperLink carries none, so with trusted entities set
the SuperNode refuses every such run ("App verification is not supported by the connected
SuperLink"). Confide therefore ships the signature inside the bundle
(`confide-app-signature.json`) and checks it on the node before the bundle's code is
imported (see `verified_clientapp`). Key type and trusted-publisher file format are Flower's
(ssh-ed25519 lines in a YAML map `{key_id: 'ssh-ed25519 ...'}`), so the same file also
works as `--trusted-entities` for Hub apps.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from cryptography.exceptions import InvalidSignature

from confide.deploy import pki
from confide.run_layout import canonical_json

SIGNATURE_FILE = "confide-app-signature.json"
FORMAT = "confide-app-signature/1"


class AppVerificationError(RuntimeError):
    """The app bundle is unsigned, signed by an untrusted key, or was altered."""


def fab_file_digests(fab: bytes) -> dict[str, str]:
    """sha256 of every file in a FAB, without Flower's own manifest and the signature."""
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        return {name: hashlib.sha256(zf.read(name)).hexdigest()
                for name in sorted(zf.namelist())
                if not name.endswith("/") and not name.startswith(".info/")
                and name != SIGNATURE_FILE}


def build_unsigned_fab(app_dir: Path) -> bytes:
    """The FAB `flwr run APP_DIR` would build, minus the signature file. Flower's own builder,
    so include/exclude rules and the rewritten pyproject.toml match byte for byte."""
    from flwr.cli.build import build_fab_from_files, collect_files

    files = dict(collect_files(app_dir.expanduser().resolve()))
    files.pop(SIGNATURE_FILE, None)
    return build_fab_from_files(files)[0]


def _signed_bytes(payload: Mapping[str, Any]) -> bytes:
    # ASCII-escaped, as bundles have always been signed: signed bundles keep verifying
    return canonical_json(payload, ascii_escaped=True)


def sign_app(app_dir: Path, key_path: Path) -> Path:
    """Write APP_DIR/confide-app-signature.json over the bundle's files. Re-run after any
    change to the app: a changed file invalidates the signature on every partner node."""
    key = pki.load_publisher_private(key_path)
    public = key.public_key()
    payload = {
        "format": FORMAT,
        "publisher": pki.publisher_key_id(public),
        "public_key": pki.public_key_line(public),
        "signed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": fab_file_digests(build_unsigned_fab(app_dir)),
    }
    signed = {**payload, "signature": key.sign(_signed_bytes(payload)).hex()}
    out = app_dir / SIGNATURE_FILE
    out.write_text(json.dumps(signed, indent=1, sort_keys=True) + "\n")
    return out


def load_trusted_publishers(path: Path) -> dict[str, str]:
    """A YAML map key id -> 'ssh-ed25519 ...' (Flower's --trusted-entities format)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise AppVerificationError(f"trusted publishers file {path}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise AppVerificationError(f"trusted publishers file {path} must map key ids to "
                                   "'ssh-ed25519 ...' keys and list at least one")
    return {str(k): str(v) for k, v in data.items()}


def add_trusted_publisher(path: Path, public_key_file: Path) -> str:
    """Add a publisher's public key to a trusted-publishers file (created if absent)."""
    line = public_key_file.read_text().strip()
    key = pki.load_publisher_public(line)
    key_id = pki.publisher_key_id(key)
    current = load_trusted_publishers(path) if path.exists() else {}
    current[key_id] = " ".join(line.split()[:2])
    path.write_text(yaml.safe_dump(current, default_flow_style=False))
    return key_id


def verify_fab(fab: bytes, trusted: Mapping[str, str]) -> str:
    """Return the publisher id when a trusted publisher signed exactly this bundle."""
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        if SIGNATURE_FILE not in zf.namelist():
            raise AppVerificationError("app bundle is not signed (no "
                                       f"{SIGNATURE_FILE}); refusing to run it")
        signed = json.loads(zf.read(SIGNATURE_FILE))
    publisher = str(signed.get("publisher", ""))
    if signed.get("format") != FORMAT or publisher not in trusted:
        raise AppVerificationError(f"app bundle is signed by {publisher or 'nobody'}, "
                                   "who is not in this node's trusted publishers")
    # The key comes from the partner's own list, never from the bundle.
    key = pki.load_publisher_public(trusted[publisher])
    payload = {k: v for k, v in signed.items() if k != "signature"}
    try:
        key.verify(bytes.fromhex(str(signed.get("signature", ""))), _signed_bytes(payload))
    except (InvalidSignature, ValueError):
        raise AppVerificationError(f"bad signature by {publisher} on the app bundle") from None
    actual = fab_file_digests(fab)
    if actual != payload.get("files"):
        signed_files = payload.get("files") or {}
        changed = sorted(set(actual) ^ set(signed_files)
                         | {p for p in actual if signed_files.get(p) != actual[p]})
        raise AppVerificationError(f"app bundle differs from what {publisher} signed: "
                                   f"{', '.join(changed[:5])}")
    return publisher
