"""Ledger writer: chain format, durability, resume, torn tail, keys."""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from confide.privacy import ledger_events as ev
from confide.privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerError,
    canonical_json,
    entry_hash_of,
    generate_key,
    load_entries,
    load_or_create_key,
    load_private_key,
    load_public_key,
    public_key_hex,
    save_private_key,
    save_public_key,
    verify_chain,
)
from confide.privacy.mechanisms import ClientLevelGaussian, SecureAggregationAbort


@dataclass(frozen=True)
class MadeUp(ev.LedgerEvent):
    TYPE: ClassVar[str] = "made_up"


def _start(led: Ledger) -> dict:
    return led.append(ev.RunStarted(config={"rounds": 2}, config_digest="ab" * 32,
                                    code_version="test", ledger_public_key=led.public_key_hex,
                                    delta=1e-5))


def test_entries_are_chained_hashed_and_signed(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "ledger.jsonl"
    with Ledger.create(path, key) as led:
        first = _start(led)
        second = led.append(ev.RoundConfigured(round=1, sampled=["a", "b"]))
    assert first["prev_hash"] == GENESIS_HASH and first["index"] == 0
    assert second["prev_hash"] == first["entry_hash"] and second["index"] == 1
    assert first["time"].endswith("Z")
    assert entry_hash_of(second) == second["entry_hash"]
    raw = path.read_bytes().splitlines(keepends=True)
    assert raw[1] == canonical_json(second) + b"\n"  # one canonical line per entry
    assert verify_chain(load_entries(path), key.public_key()) == []
    assert verify_chain(load_entries(path), generate_key().public_key()) != []


def test_a_signature_letter_changed_to_upper_case_is_an_edit(tmp_path: Path) -> None:
    # bytes.fromhex reads "AB" as "ab": the same signature bytes, an edited file
    key = generate_key()
    path = tmp_path / "ledger.jsonl"
    with Ledger.create(path, key) as led:
        entry = _start(led)
    at = next(i for i, c in enumerate(entry["signature"]) if c in "abcdef")
    signature = entry["signature"][:at] + entry["signature"][at].upper() + \
        entry["signature"][at + 1:]
    path.write_bytes(canonical_json({**entry, "signature": signature}) + b"\n")
    problems = verify_chain(load_entries(path), key.public_key())
    assert [(p.check, p.index) for p in problems] == [("signature", 0)], problems


def test_canonical_json_is_sorted_compact_utf8_and_round_trips_floats() -> None:
    obj = {"b": 0.1, "a": [1, 1e-05, "é"], "c": None}
    assert canonical_json(obj) == '{"a":[1,1e-05,"é"],"b":0.1,"c":null}'.encode()
    assert canonical_json(json.loads(canonical_json(obj))) == canonical_json(obj)
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_append_validates_payloads_and_requires_run_started_first(tmp_path: Path) -> None:
    with Ledger.create(tmp_path / "l.jsonl", generate_key()) as led:
        with pytest.raises(LedgerError, match="run_started"):
            led.append(ev.ModelDigest(round=1, sha256="0" * 64))
        _start(led)
        with pytest.raises(ev.PayloadError, match=r"round_configured.*round"):
            led.append(ev.RoundConfigured(round=0, sampled=["a"]))
        with pytest.raises(ev.PayloadError, match="unknown"):
            led.append(MadeUp())
        with pytest.raises(TypeError, match="typed ledger event"):
            led.append({"round": 1, "sampled": ["a"]})  # type: ignore[arg-type]  # the old shape


def test_resume_continues_the_chain(tmp_path: Path) -> None:
    key, path = generate_key(), tmp_path / "ledger.jsonl"
    with Ledger.create(path, key) as led:
        _start(led)
        last = led.append(ev.RoundConfigured(round=1, sampled=["a"]))
    with pytest.raises(LedgerError, match="already exists"):
        Ledger.create(path, key)
    with Ledger.open(path, key) as led:
        resumed = led.append(ev.RunResumed(from_round=0))
    assert resumed["index"] == 2 and resumed["prev_hash"] == last["entry_hash"]
    assert verify_chain(load_entries(path), key) == []


def test_open_refuses_a_broken_ledger_or_another_key(tmp_path: Path) -> None:
    key, path = generate_key(), tmp_path / "ledger.jsonl"
    with Ledger.create(path, key) as led:
        _start(led)
        led.append(ev.RoundConfigured(round=1, sampled=["a"]))
    with pytest.raises(LedgerError, match="broken"):
        Ledger.open(path, generate_key())
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["payload"]["sampled"] = ["b"]
    path.write_text(lines[0] + "\n" + canonical_json(entry).decode() + "\n")
    with pytest.raises(LedgerError, match="entry 1"):
        Ledger.open(path, key)


def test_torn_last_line_is_detected_and_can_be_moved_aside(tmp_path: Path) -> None:
    key, path = generate_key(), tmp_path / "ledger.jsonl"
    with Ledger.create(path, key) as led:
        _start(led)
        led.append(ev.RoundConfigured(round=1, sampled=["a"]))
    whole = path.read_bytes()
    path.write_bytes(whole[:-25])  # crash in the middle of the second append
    with pytest.raises(LedgerError, match="torn"):
        Ledger.open(path, key)
    with Ledger.open(path, key, repair_torn_tail=True) as led:
        entry = led.append(ev.RunResumed(from_round=0))
    assert entry["index"] == 1
    assert verify_chain(load_entries(path), key) == []
    assert len(list(tmp_path.glob("ledger.jsonl.torn-*"))) == 1


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    key, path = generate_key(), tmp_path / "ledger.jsonl"
    with Ledger.create(path, key) as led:
        _start(led)
        with pytest.raises(LedgerError, match="another process"):
            Ledger.open(path, key)


def test_key_files(tmp_path: Path) -> None:
    key = generate_key()
    save_private_key(key, tmp_path / "ledger_key.pem")
    assert stat.S_IMODE((tmp_path / "ledger_key.pem").stat().st_mode) == 0o600
    assert public_key_hex(load_private_key(tmp_path / "ledger_key.pem")) == public_key_hex(key)
    save_public_key(key, tmp_path / "pub.pem")
    assert public_key_hex(load_public_key(tmp_path / "pub.pem")) == public_key_hex(key)
    created = load_or_create_key(tmp_path / "sub" / "k.pem")
    assert public_key_hex(load_or_create_key(tmp_path / "sub" / "k.pem")) == \
        public_key_hex(created)


def test_typed_events_round_trip() -> None:
    events = [
        ev.ClientDpEvent(round=2, mechanism=ClientLevelGaussian(1.0, 0.5, 10, 4), delta=1e-5,
                         epsilon_claimed=float("inf"), extra_params={"a": 1}),
        ev.SecureAggregationEvent(round=1, participants=["a"], dropouts=[], threshold=1,
                                  bits=32, neighbours=2),
        ev.SecureAggregationEvent(round=2, participants=[], dropouts=["a"], threshold=1,
                                  bits=32, neighbours=2,
                                  abort=SecureAggregationAbort("too few survivors")),
        ev.BudgetRefusal(round=3, partner="p", spent_epsilon=1.0, max_epsilon=2.0,
                         would_be_epsilon=2.5),
        ev.RoundCompleted(round=1, replied=["a"], aggregated=["a"], dropped=[], accuracy=0.5),
        ev.RunFinished(rounds_completed=3),
    ]
    for e in events:
        payload = json.loads(canonical_json(e.to_payload()))
        assert ev.parse_payload(e.TYPE, payload) == e
    with pytest.raises(ev.PayloadError, match="exceeds population"):
        ev.ClientDpEvent.from_payload({**events[0].to_payload(), "sampled": 11})


def test_the_head_partners_countersign_and_its_entry(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    key = generate_key()
    with Ledger.create(path, key) as led:
        assert led.head() is None and led.entry_hash_at(0) is None
        first = _start(led)
        assert led.head() == (0, first["entry_hash"])
        countersigned = led.append(ev.HeadCountersigned(
            round=1, partner="p-000000000001", index=0, hash=first["entry_hash"],
            countersignature={"payload": {}, "public_key": "", "signature": ""}))
        assert led.head() == (1, countersigned["entry_hash"])
        assert led.entry_hash_at(0) == first["entry_hash"]
        assert led.entry_hash_at(2) is None and led.entry_hash_at(-1) is None
    with Ledger.open(path, key) as again:  # resumed: the same head
        assert again.head() == (1, countersigned["entry_hash"])
    with pytest.raises(ev.PayloadError, match="hash"):
        ev.parse_payload(ev.HEAD_COUNTERSIGNED, {**countersigned["payload"], "hash": "x"})
