"""Key material for a deployment, in the formats Flower 1.41 reads.

- CA and server certificate (PEM): the SuperLink serves its Fleet, Control and Runtime
  APIs over TLS with them; nodes, `flwr` and the ServerApp process verify against the CA.
- Node key pairs (OpenSSH, ECDSA P-384): `flower-supernode --auth-supernode-private-key`
  loads the private key with `load_ssh_private_key` and `flwr supernode register` accepts
  only NIST-curve EC public keys in OpenSSH format.
- Publisher signing key (OpenSSH, Ed25519): the same key type and public-key format as
  Flower's `--trusted-entities`, so one trusted-publishers file serves both.

Private keys are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
PUBLISHER_KEY = "publisher.key"
PUBLISHER_PUB = "publisher.pub"
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")


class PkiError(ValueError):
    """Key material is missing, malformed or would be overwritten."""


def _write(path: Path, data: bytes, private: bool) -> Path:
    """Create `path` exclusively; private files are 0600 from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise PkiError(f"{path} exists; refusing to overwrite key material")
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)  # umask may have narrowed a public file; private stays 0600
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(directory: Path, name: str = "Confide federation CA", days: int = 3650
            ) -> tuple[Path, Path]:
    """A self-signed CA that signs the SuperLink's certificate (and nothing else)."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    key_path = _write(directory / CA_KEY, _pem_key(key), private=True)
    cert_path = _write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM),
                       private=False)
    return cert_path, key_path


def _san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # de-duplicated, order kept
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def server_cert(directory: Path, names: Sequence[str] = (), ca_dir: Path | None = None,
                days: int = 825) -> tuple[Path, Path]:
    """The SuperLink's TLS certificate. Its SANs always include localhost and 127.0.0.1,
    because the SuperLink's own ServerApp process connects to it on loopback with TLS."""
    ca_dir = ca_dir or directory
    try:
        ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {ca_dir} (run `confide deploy init-ca` first): {exc}") \
            from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{ca_dir / CA_KEY} is not an EC key")
    all_names = [*names, *DEFAULT_SERVER_NAMES]
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san_entries(all_names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    key_path = _write(directory / SERVER_KEY, _pem_key(key), private=True)
    cert_path = _write(directory / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM),
                       private=False)
    return cert_path, key_path


def node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A partner node's authentication key pair: `NAME` (private) and `NAME.pub`."""
    if not name or "/" in name or name.startswith("."):
        raise PkiError(f"node name {name!r} must be a plain file name")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    key_path = _write(directory / name, private, private=True)
    pub_path = _write(directory / f"{name}.pub", public + f" {name}\n".encode(), private=False)
    return key_path, pub_path


def publisher_key(directory: Path) -> tuple[Path, Path]:
    """The app publisher's Ed25519 signing key: `publisher.key` and `publisher.pub`."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    key_path = _write(directory / PUBLISHER_KEY, private, private=True)
    pub_path = _write(directory / PUBLISHER_PUB, public_key_line(key.public_key()).encode()
                      + b"\n", private=False)
    return key_path, pub_path


def public_key_line(key: ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()


def publisher_key_id(key: ed25519.Ed25519PublicKey) -> str:
    """A stable id for a publisher key, shaped like Flower's trusted-entity ids."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fpk_" + hashlib.sha256(raw).hexdigest()[:32]


def load_publisher_private(path: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_ssh_private_key(path.read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PkiError(f"{path} is not an Ed25519 key")
    return key


def load_publisher_public(line: str) -> ed25519.Ed25519PublicKey:
    key = serialization.load_ssh_public_key(line.strip().encode())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PkiError("a trusted publisher key must be ssh-ed25519")
    return key


@dataclass(frozen=True)
class NodePublicKey:
    path: Path
    fingerprint: str  # sha256 of the key blob, as `ssh-keygen -l` prints it


def check_node_public_key(path: Path) -> NodePublicKey:
    """Refuse what `flwr supernode register` would refuse, with a clearer message."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, FileNotFoundError) as exc:
        raise PkiError(f"{path}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(f"{path}: node keys must be NIST-curve EC keys (e.g. P-384)")
    blob = key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).split()[1]
    import base64

    digest = base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode()
    return NodePublicKey(path, "SHA256:" + digest.rstrip("="))
