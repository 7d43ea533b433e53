"""The privacy ledger: an append-only, hash-chained, Ed25519-signed JSON-lines file.

File format (`ledger.jsonl`, one entry per line, each line ends with "\\n"):

    {"entry_hash":..,"index":..,"payload":{..},"prev_hash":..,"signature":..,"time":..,"type":..}

* Canonical JSON (`confide.run_layout.canonical_json`): `json.dumps(obj, sort_keys=True,
  separators=(",", ":"), ensure_ascii=False, allow_nan=False)` encoded as UTF-8. Keys
  sorted, no whitespace, floats as Python's shortest round-trip `repr` (so parse +
  re-encode gives the same bytes), integers as integers, no NaN/Infinity (an infinite
  epsilon is written "inf").
  Every line of the file must be byte-identical to the canonical encoding of what it
  parses to, so there is exactly one byte string per entry and no byte of the file can
  change without changing a hashed or signed value.
* `entry_hash` = SHA-256 (hex) of canonical_json({index, time, type, payload, prev_hash}).
* `signature` = Ed25519 signature, by the server's ledger key, over the 32 raw bytes of
  entry_hash (hex).
* `prev_hash` = the previous entry's entry_hash; the first entry has 64 zeros.
* `index` counts from 0; `time` is UTC ISO 8601 with microseconds and a "Z".

Every append writes one whole line with a single write, then flush + fsync, so a crash
leaves at most one torn last line, which `Ledger.open` detects (and, when asked, moves
aside) instead of silently continuing after it. Deleting entries at the end cannot be
seen from the chain alone: the audit checks `run_finished` against `summary.json` and the
final model digest against the model file for that.

The server holds the signing key, so the chain is tamper-evident only against others: a
server can rewrite and re-sign it. Partners therefore countersign the chain head in every
round they take part in (`head_countersigned` entries; confide.privacy.receipts.sign_head)
and keep what they signed; `confide audit partner` compares their record with the chain.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from confide.privacy import ledger_events as ev
from confide.run_layout import canonical_json

GENESIS_HASH = "0" * 64
ENTRY_FIELDS = frozenset({"index", "time", "type", "payload", "prev_hash", "entry_hash",
                          "signature"})
HASHED_FIELDS = ("index", "time", "type", "payload", "prev_hash")


class LedgerError(RuntimeError):
    """The ledger cannot be written or continued (broken chain, torn line, wrong key)."""


# -- hashing ----------------------------------------------------------------------------

def entry_hash_of(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: entry[k] for k in HASHED_FIELDS})).hexdigest()


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- keys -------------------------------------------------------------------------------

def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def as_public_key(key: Ed25519PublicKey | Ed25519PrivateKey | bytes | str) -> Ed25519PublicKey:
    """Accept a key object, raw 32 bytes or their hex."""
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key
    raw = bytes.fromhex(key) if isinstance(key, str) else key
    return Ed25519PublicKey.from_public_bytes(raw)


def save_private_key(key: Ed25519PrivateKey, path: Path | str) -> None:
    """PEM (PKCS#8, unencrypted), created with mode 0600 so it is never world-readable,
    not even between create and chmod."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{path} is not an Ed25519 private key")
    return key


def save_public_key(key: Ed25519PrivateKey | Ed25519PublicKey, path: Path | str) -> None:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    Path(path).write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo))


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{path} is not an Ed25519 public key")
    return key


def load_or_create_key(path: Path | str) -> Ed25519PrivateKey:
    """The server's ledger key at `path`, generated (0600) on first use."""
    path = Path(path)
    if path.exists():
        return load_private_key(path)
    key = generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_private_key(key, path)
    return key


# -- reading ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LedgerLine:
    """One line of the file as read: its 0-based position, bytes, and parse outcome."""

    position: int
    raw: bytes
    entry: dict[str, Any] | None
    error: str | None  # why the line is not a well-formed entry (None when it is)


@dataclass(frozen=True)
class Problem:
    """One finding of a check. `index` is the ledger position of the bad entry, if any."""

    check: str
    reason: str
    index: int | None = None

    def __str__(self) -> str:
        where = f"entry {self.index}: " if self.index is not None else ""
        return f"[{self.check}] {where}{self.reason}"


def _parse_line(position: int, raw: bytes, last: bool) -> LedgerLine:
    if not raw.endswith(b"\n"):
        why = "torn last line (no newline: a crash during append?)" if last else "no newline"
        return LedgerLine(position, raw, None, why)
    body = raw[:-1]
    try:
        entry = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return LedgerLine(position, raw, None, f"unparseable line: {exc}")
    if not isinstance(entry, dict):
        return LedgerLine(position, raw, None, "line is not a JSON object")
    if set(entry) != ENTRY_FIELDS:
        missing = sorted(ENTRY_FIELDS - set(entry))
        extra = sorted(set(entry) - ENTRY_FIELDS)
        return LedgerLine(position, raw, entry, f"fields missing {missing} / unexpected {extra}")
    try:
        canonical = canonical_json(entry)
    except ValueError as exc:
        return LedgerLine(position, raw, entry, f"not encodable canonically: {exc}")
    if canonical != body:
        return LedgerLine(position, raw, entry, "line is not in canonical JSON encoding")
    return LedgerLine(position, raw, entry, None)


def read_lines(path: Path | str) -> list[LedgerLine]:
    """Every line of the ledger file, parsed, with problems noted (never raises on content)."""
    data = Path(path).read_bytes()
    raws = data.splitlines(keepends=True)
    return [_parse_line(i, raw, i == len(raws) - 1) for i, raw in enumerate(raws)]


def load_entries(path: Path | str) -> list[LedgerLine]:
    """Alias of read_lines: what `verify_chain` takes."""
    return read_lines(path)


# -- verification -----------------------------------------------------------------------

def _verify_signature(public_key: Ed25519PublicKey, entry_hash: str, signature: Any) -> bool:
    # lower-case hex only: bytes.fromhex also reads "AB", so an edited letter's case would
    # otherwise verify (the signature is the one field outside entry_hash)
    if not _is_hex(signature, 128):
        return False
    try:
        public_key.verify(bytes.fromhex(signature), bytes.fromhex(entry_hash))
    except (InvalidSignature, ValueError):
        return False
    return True


def _is_hex(text: Any, length: int) -> bool:
    return (isinstance(text, str) and len(text) == length
            and all(c in "0123456789abcdef" for c in text))


def verify_chain(entries: Sequence[LedgerLine | Mapping[str, Any]],
                 public_key: Ed25519PublicKey | Ed25519PrivateKey | bytes | str
                 ) -> list[Problem]:
    """All chain problems, in file order: unparseable/torn/non-canonical lines, wrong
    index, broken prev link, bad entry hash, bad signature. Pure (reads nothing).

    Each later entry is checked against its actual predecessor, so one edited entry yields
    problems at that entry (and its successor's prev link, for an entry_hash edit) only.
    """
    key = as_public_key(public_key)
    problems: list[Problem] = []
    prev_hash: str | None = GENESIS_HASH
    for pos, item in enumerate(entries):
        line = item if isinstance(item, LedgerLine) else LedgerLine(pos, b"", dict(item), None)
        entry = line.entry
        if entry is None or set(entry) != ENTRY_FIELDS:
            reason = line.error or (f"fields are {sorted(entry or {})}, "
                                    f"expected {sorted(ENTRY_FIELDS)}")
            problems.append(Problem("chain", reason, pos))
            prev_hash = None  # unknown: do not report a cascade at the next entry
            continue
        if line.error is not None:  # parseable but non-canonical bytes
            problems.append(Problem("chain", line.error, pos))
        if entry["index"] != pos or isinstance(entry["index"], bool):
            problems.append(Problem("chain", f"index is {entry['index']!r}, expected {pos} "
                                             "(entry deleted, inserted or reordered?)", pos))
        if prev_hash is not None and entry["prev_hash"] != prev_hash:
            problems.append(Problem("chain", "prev_hash does not match the previous entry's "
                                             "entry_hash (entry deleted or reordered?)", pos))
        try:
            recomputed = entry_hash_of(entry)
        except (ValueError, TypeError) as exc:
            problems.append(Problem("chain", f"cannot hash entry: {exc}", pos))
            prev_hash = None
            continue
        if entry["entry_hash"] != recomputed:
            problems.append(Problem("chain", "entry_hash does not match the entry's content "
                                             "(entry edited?)", pos))
        if not _is_hex(entry["entry_hash"], 64) or not _verify_signature(
                key, entry["entry_hash"], entry["signature"]):
            problems.append(Problem("signature", "signature is not valid for the ledger key",
                                    pos))
        if not isinstance(entry["type"], str) or entry["type"] not in ev.EVENT_TYPES:
            problems.append(Problem("chain", f"unknown entry type {entry['type']!r}", pos))
        prev_hash = entry["entry_hash"] if isinstance(entry["entry_hash"], str) else None
    return problems


# -- writing ----------------------------------------------------------------------------

class Ledger:
    """Append-only writer of one run's ledger. One writer per file (an exclusive flock).

    Use `Ledger.create` for a new run and `Ledger.open` on resume; both return a ledger
    whose `append` continues the chain. Thread-safe.
    """

    def __init__(self, path: Path, signing_key: Ed25519PrivateKey, next_index: int,
                 prev_hash: str, entries: list[dict[str, Any]]) -> None:
        self.path = path
        self._key = signing_key
        self._next_index = next_index
        self._prev_hash = prev_hash
        self._entries = entries
        self._lock = threading.Lock()
        # A seam for fault injection (the server's crash points), called before each line is
        # written with the entry's type, its round and a function that writes part of the
        # line durably (what a dying process gets out); None: nothing is injected.
        self.before_write: Callable[[str, int, Callable[[], None]], None] | None = None
        self._fh = open(path, "ab")  # noqa: SIM115 -- held for the writer's lifetime
        try:
            # A second server process appending to the same file would fork the chain.
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise LedgerError(f"{path} is open for writing by another process") from None

    @property
    def public_key_hex(self) -> str:
        return public_key_hex(self._key)

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self._entries)

    def head(self) -> tuple[int, str] | None:
        """(index, entry_hash) of the last entry: what partners countersign. None while
        the ledger is empty."""
        with self._lock:
            if not self._entries:
                return None
            return self._next_index - 1, self._prev_hash

    def entry_hash_at(self, index: int) -> str | None:
        """The entry_hash of entry `index`, None when there is no such entry."""
        with self._lock:
            if isinstance(index, bool) or not 0 <= index < len(self._entries):
                return None
            return str(self._entries[index]["entry_hash"])

    @classmethod
    def create(cls, path: Path | str, signing_key: Ed25519PrivateKey) -> Ledger:
        """A new, empty ledger; refuses to overwrite an existing non-empty file."""
        path = Path(path)
        if path.exists() and path.stat().st_size > 0:
            raise LedgerError(f"{path} already exists: use Ledger.open to continue it")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        _fsync_dir(path.parent)
        return cls(path, signing_key, 0, GENESIS_HASH, [])

    @classmethod
    def open(cls, path: Path | str, signing_key: Ed25519PrivateKey, *,
             repair_torn_tail: bool = False) -> Ledger:
        """Continue an existing ledger (resume). Verifies the whole chain first.

        A torn last line (crash during an append) is an error unless `repair_torn_tail`,
        in which case its bytes are moved to `<path>.torn-<time>` and the file truncated to
        the last complete entry (that append never completed, so nothing signed is lost).
        Any other problem, or a ledger started with another key, raises LedgerError.
        """
        path = Path(path)
        if not path.exists():
            raise LedgerError(f"{path} does not exist: use Ledger.create for a new run")
        lines = read_lines(path)
        torn: LedgerLine | None = None
        if lines and lines[-1].error and not lines[-1].raw.endswith(b"\n"):
            # A last line without its newline is an append that never completed: `append`
            # writes the whole line and fsyncs before the server acts on the entry, so
            # nothing was decided on it. What it would have recorded is recorded again by
            # the resumed round (a partner's spend: from the receipts of the lost attempt
            # the partner attaches to its next reply; a round's result: the round re-runs).
            # Its bytes are kept aside for the auditor, never deleted. Only the last line
            # is treated so: every complete entry must still verify (no tampering passes).
            if not repair_torn_tail:
                raise LedgerError(f"{path}: entry {len(lines) - 1} is a torn last line "
                                  "(crash during append); pass repair_torn_tail=True to "
                                  "move it aside and continue")
            torn = lines.pop()
        problems = verify_chain(lines, signing_key.public_key())
        if problems:  # checked before anything is moved: a refusal changes nothing
            raise LedgerError(f"{path} is broken, refusing to continue it: {problems[0]}")
        entries = [line.entry for line in lines if line.entry is not None]
        if entries:
            first = entries[0]
            if first["type"] != ev.RUN_STARTED:
                raise LedgerError(f"{path}: entry 0 is {first['type']!r}, not run_started")
            if first["payload"].get("ledger_public_key") != public_key_hex(signing_key):
                raise LedgerError(f"{path} was started with another ledger key")
        if torn is not None:
            aside = path.with_name(f"{path.name}.torn-{utc_now().replace(':', '')}")
            aside.write_bytes(torn.raw)
            with open(path, "r+b") as fh:
                fh.truncate(sum(len(line.raw) for line in lines))
                fh.flush()
                os.fsync(fh.fileno())
        prev = entries[-1]["entry_hash"] if entries else GENESIS_HASH
        return cls(path, signing_key, len(entries), prev, entries)

    def append(self, event: ev.LedgerEvent) -> dict[str, Any]:
        """Sign and durably append one typed event's entry; returns it (its "index" is
        where a partner's acknowledgement points)."""
        if not isinstance(event, ev.LedgerEvent):
            raise TypeError("Ledger.append takes a typed ledger event, not "
                            f"{type(event).__name__}")
        kind, body = event.TYPE, event.to_payload()
        ev.parse_payload(kind, body)  # fail at the writer, not later at the auditor
        with self._lock:
            if self._fh.closed:
                raise LedgerError("ledger is closed")
            if not self._entries and kind != ev.RUN_STARTED:
                raise LedgerError("the first ledger entry must be run_started")
            entry: dict[str, Any] = {"index": self._next_index, "time": utc_now(),
                                     "type": kind, "payload": body,
                                     "prev_hash": self._prev_hash}
            entry["entry_hash"] = entry_hash_of(entry)
            entry["signature"] = self._key.sign(bytes.fromhex(entry["entry_hash"])).hex()
            line = canonical_json(entry) + b"\n"
            if self.before_write is not None:
                self.before_write(kind, _round_of(body),
                                  lambda: self._write_durably(line[: len(line) // 2]))
            self._write_durably(line)  # one write of one whole line
            self._entries.append(entry)
            self._next_index += 1
            self._prev_hash = entry["entry_hash"]
            return entry

    def _write_durably(self, data: bytes) -> None:
        self._fh.write(data)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
                self._fh.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _round_of(payload: Mapping[str, Any]) -> int:
    """The round an entry belongs to (-1 for run-level entries), for crash points."""
    value = payload.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _fsync_dir(path: Path) -> None:
    # The new file's directory entry must survive a crash too.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
