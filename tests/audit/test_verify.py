"""verify_run: a consistent run passes; every kind of tampering is detected and named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.audit.verify import main, render_verdict, verify_run
from confide.privacy.ledger import canonical_json, entry_hash_of, public_key_hex
from confide.privacy.receipts import sign_receipt

from .conftest import RunInfo, build_run


def _lines(run: RunInfo) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run.dir / "ledger.jsonl").read_text().splitlines()]


def _write(run: RunInfo, entries: list[dict[str, Any]]) -> None:
    (run.dir / "ledger.jsonl").write_bytes(b"".join(canonical_json(e) + b"\n" for e in entries))


def _resign(entries: list[dict[str, Any]], key: Ed25519PrivateKey, relink: bool = True) -> None:
    prev = "0" * 64
    for i, e in enumerate(entries):
        if relink:
            e["index"], e["prev_hash"] = i, prev
        e["entry_hash"] = entry_hash_of(e)
        e["signature"] = key.sign(bytes.fromhex(e["entry_hash"])).hex()
        prev = e["entry_hash"]


def _changed(value: Any) -> Any:
    """A different value of a similar kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.001
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1") if value else "x"
    if isinstance(value, list):
        return [*value, "extra"]
    if isinstance(value, dict):
        return {**value, "extra": 1}
    return 0  # None


def test_consistent_run_passes(template_run: RunInfo) -> None:
    result = verify_run(template_run.dir)
    assert result.ok, render_verdict(result)
    assert result.rounds_completed == 3
    assert all(c.status == "PASS" for c in result.checks)
    assert "VERDICT: PASS" in render_verdict(result)
    assert main([str(template_run.dir)]) == 0
    # today's partners claim PLD: each claim replays through PRV, below the RDP opinion
    for rep in result.example_level.values():
        assert set(rep.methods) == {"prv"}
        assert rep.final == pytest.approx(result.claimed_example[rep.partner], rel=0.01)
        assert rep.final < rep.final_rdp


def test_run_of_the_previous_version_with_rdp_claims_still_verifies(tmp_path: Path) -> None:
    info = build_run(tmp_path / "run", accountant="rdp")
    result = verify_run(info.dir)
    assert result.ok, render_verdict(result)
    assert all(set(rep.methods) == {"rdp"} for rep in result.example_level.values())


def test_claim_below_the_independent_replay_is_detected(tmp_path: Path) -> None:
    """A partner whose PLD claims are 2% low (an optimistic accountant) fails the
    independent PRV replay, entry by entry."""
    from confide.privacy.accountant import PartnerAccountant

    original = PartnerAccountant.record

    def optimistic(self: PartnerAccountant, event):  # type: ignore[no-untyped-def]
        return 0.98 * original(self, event)

    PartnerAccountant.record = optimistic  # type: ignore[method-assign]
    try:
        info = build_run(tmp_path / "run")
    finally:
        PartnerAccountant.record = original  # type: ignore[method-assign]
    result = verify_run(info.dir)
    assert not result.ok
    assert "independent prv replay" in str(result.check("replay").problems[0])


def _field_cases() -> list[tuple[int, str, str | None]]:
    import tempfile

    info = build_run(Path(tempfile.mkdtemp()) / "run")
    cases: list[tuple[int, str, str | None]] = []
    for line in (info.dir / "ledger.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for key in entry:
            if key != "payload":
                cases.append((entry["index"], key, None))
        for pkey in entry["payload"]:
            cases.append((entry["index"], "payload", pkey))
    shutil.rmtree(info.dir.parent)
    return cases


FIELD_CASES = _field_cases()


@pytest.mark.parametrize(("index", "key", "pkey"), FIELD_CASES,
                         ids=[f"{i}-{k}{'.' + p if p else ''}" for i, k, p in FIELD_CASES])
def test_editing_any_field_of_any_entry_is_detected(run: RunInfo, index: int, key: str,
                                                    pkey: str | None) -> None:
    entries = _lines(run)
    if pkey is None:
        entries[index][key] = _changed(entries[index][key])
    else:
        entries[index]["payload"][pkey] = _changed(entries[index]["payload"][pkey])
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert not result.ok
    assert result.first_bad_index == index, render_verdict(result)
    assert f"first bad entry {index}" in render_verdict(result)


def test_edit_resigned_with_the_server_key_is_still_caught_by_receipt(run: RunInfo) -> None:
    """A server that under-reports a partner and re-signs its own chain: the partner's
    receipt still says the true numbers."""
    entries = _lines(run)
    i = next(e["index"] for e in entries if e["type"] == "example_dp")
    entries[i]["payload"]["steps"] -= 10
    _resign(entries, run.server_key)
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert result.check("chain").status == "PASS"
    assert result.check("receipts").status == "FAIL"
    assert result.first_bad_index == i


@pytest.mark.parametrize("victim", [1, 5, 13, 24])
def test_deleting_an_entry_is_detected(run: RunInfo, victim: int) -> None:
    entries = _lines(run)
    del entries[victim]
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert not result.ok
    assert result.first_bad_index == victim


def test_deleting_and_relinking_without_the_key_fails_signatures(run: RunInfo) -> None:
    entries = _lines(run)
    del entries[4]
    _resign(entries, Ed25519PrivateKey.generate())
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert result.check("chain").status == "FAIL"
    assert result.first_bad_index == 0


def test_reordering_entries_is_detected(run: RunInfo) -> None:
    entries = _lines(run)
    entries[6], entries[7] = entries[7], entries[6]
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert result.first_bad_index == 6


@pytest.mark.parametrize("keep", [25, 20, 10, 1])
def test_truncating_entries_is_detected(run: RunInfo, keep: int) -> None:
    entries = _lines(run)
    _write(run, entries[:keep])
    result = verify_run(run.dir, pld=False)
    assert not result.ok
    assert result.first_bad_index == keep, render_verdict(result)
    assert result.check("completeness").status == "FAIL"


def test_torn_last_line_is_detected(run: RunInfo) -> None:
    path = run.dir / "ledger.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    result = verify_run(run.dir, pld=False)
    assert result.first_bad_index == 25
    assert "torn" in str(result.first_problem)


def test_signing_with_a_wrong_key_is_detected(run: RunInfo) -> None:
    entries = _lines(run)
    _resign(entries, Ed25519PrivateKey.generate(), relink=False)
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert result.check("chain").status == "FAIL"
    assert result.first_bad_index == 0


def test_whole_ledger_forged_with_a_new_key_is_caught_by_the_pinned_key(run: RunInfo) -> None:
    forger = Ed25519PrivateKey.generate()
    entries = _lines(run)
    entries[0]["payload"]["ledger_public_key"] = public_key_hex(forger)
    _resign(entries, forger)
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert result.first_bad_index == 0
    assert "ledger_public_key.pem" in str(result.first_problem)
    # Without the pem the forgery is self-consistent: pinning the key is what stops it.
    (run.dir / "ledger_public_key.pem").unlink()
    assert verify_run(run.dir, pld=False).check("chain").status == "PASS"
    assert verify_run(run.dir, run.server_key.public_key(), pld=False).first_bad_index == 0


def _example_index(entries: list[dict[str, Any]]) -> int:
    return next(e["index"] for e in entries if e["type"] == "example_dp")


def test_receipt_signed_by_another_partner_key_is_detected(run: RunInfo) -> None:
    entries = _lines(run)
    i = _example_index(entries)
    payload = entries[i]["payload"]
    other = run.partner_keys[1]
    signed = dict(payload["receipt"]["payload"], partner=run.partners[1])
    payload["receipt"] = sign_receipt(signed, other).to_dict()
    _resign(entries, run.server_key)
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert result.check("receipts").status == "FAIL"
    assert result.first_bad_index == i
    assert "partner" in str(result.first_problem)


def test_receipt_with_swapped_public_key_is_detected(run: RunInfo) -> None:
    entries = _lines(run)
    i = _example_index(entries)
    entries[i]["payload"]["receipt"]["public_key"] = public_key_hex(run.partner_keys[1])
    _resign(entries, run.server_key)
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert result.check("receipts").status == "FAIL"
    assert result.first_bad_index == i


@pytest.mark.parametrize("field", ["noise_multiplier", "sample_rate", "steps", "epsilon"])
def test_receipt_with_an_altered_number_is_detected(run: RunInfo, field: str) -> None:
    entries = _lines(run)
    i = _example_index(entries)
    signed = entries[i]["payload"]["receipt"]["payload"]
    signed[field] = signed[field] * 2
    _resign(entries, run.server_key)
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert result.check("receipts").status == "FAIL"
    assert result.first_bad_index == i


def test_summary_epsilon_off_by_two_percent_is_detected(run: RunInfo) -> None:
    path = run.dir / "summary.json"
    summary = json.loads(path.read_text())
    p = run.partners[0]
    summary["privacy"]["example_level"][p] *= 1.02
    path.write_text(json.dumps(summary))
    result = verify_run(run.dir, pld=False)
    assert [c.name for c in result.checks if c.problems] == ["summary"]
    assert p in str(result.first_problem)
    assert main([str(run.dir)]) == 1


def test_summary_epsilon_within_half_a_percent_passes(run: RunInfo) -> None:
    path = run.dir / "summary.json"
    summary = json.loads(path.read_text())
    summary["privacy"]["example_level"][run.partners[0]] *= 1.005
    path.write_text(json.dumps(summary))
    assert verify_run(run.dir, pld=False).ok


def test_summary_client_epsilon_and_metrics_mismatch_detected(run: RunInfo) -> None:
    path = run.dir / "summary.json"
    summary = json.loads(path.read_text())
    summary["privacy"]["client_level_epsilon"] *= 0.97
    path.write_text(json.dumps(summary))
    rows = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    rows[1]["epsilon_example_level"][run.partners[2]] *= 0.9
    (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = verify_run(run.dir, pld=False)
    assert result.check("summary").status == "FAIL"
    assert result.check("metrics").status == "FAIL"
    assert "round 2" in str(result.check("metrics").problems[0])


def test_partner_missing_from_summary_is_detected(run: RunInfo) -> None:
    path = run.dir / "summary.json"
    summary = json.loads(path.read_text())
    del summary["privacy"]["example_level"][run.partners[1]]
    path.write_text(json.dumps(summary))
    assert "omits partner" in str(verify_run(run.dir, pld=False).first_problem)


def test_model_file_swapped_is_detected(run: RunInfo) -> None:
    (run.dir / "model" / "weights.safetensors").write_bytes(b"not the model")
    result = verify_run(run.dir, pld=False)
    assert [c.name for c in result.checks if c.problems] == ["model"]


def test_unknown_client_mechanism_fails_clearly(run: RunInfo) -> None:
    entries = _lines(run)
    for e in entries:
        if e["type"] == "client_dp":
            e["payload"]["mechanism"] = "mystery_noise"
    _resign(entries, run.server_key)
    _write(run, entries)
    result = verify_run(run.dir, pld=False)
    assert result.check("replay").status == "FAIL"
    assert "mystery_noise" in str(result.check("replay").problems[0])


def test_main_exit_codes(run: RunInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                         ) -> None:
    assert main([str(tmp_path / "nothing")]) == 2
    assert main([str(run.dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0, 1, exclude_max=True), new=st.integers(0, 255))
def test_any_one_byte_edit_of_the_ledger_is_detected(template_run: RunInfo, tmp_path: Path,
                                                     position: float, new: int) -> None:
    original = (template_run.dir / "ledger.jsonl").read_bytes()
    pos = int(position * len(original))
    if original[pos] == new:
        new = (new + 1) % 256
    edited = original[:pos] + bytes([new]) + original[pos + 1:]
    target = tmp_path / "run"
    if not target.exists():
        shutil.copytree(template_run.dir, target)
    (target / "ledger.jsonl").write_bytes(edited)
    result = verify_run(target, pld=False)
    assert not result.ok
    # The bad entry named is the edited line (or the next one, for an edited newline).
    line = original[:pos].count(b"\n")
    assert result.first_bad_index in (line, line + 1)
