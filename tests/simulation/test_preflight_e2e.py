"""The pre-flight check where it runs: the ServerApp's Federation (before the run folder and
the ledger exist), the `confide simulate` console and CLI, summary.json and the report.
Tiny model; one short simulated round."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from rich.console import Console

from confide.cli import main
from confide.config import RunConfig, build_config
from confide.privacy.preflight import PreflightRefused
from confide.server.federation import Federation
from confide.simulation.runner import preflight, simulate

# central client-level DP at multiplier 1 over 2 partners: noise sigma*sqrt(d)/n = 23x
# the largest signal per round for the tiny model's 2,114 LoRA + head parameters
HOPELESS = {"model": "tiny", "clients": 2, "rounds": 1, "client-dp": True,
            "client-dp-noise-multiplier": 1.0, "noise-multiplier": 1.0,
            "max-train-examples": 80, "max-eval-examples": 40, "max-length": 16,
            "batch-size": 8, "physical-batch-size": 8}


class InMemoryGrid:
    """Named like Flower's simulation grid (how the server tells simulation apart); the
    pre-flight check runs before any message, so it needs no nodes."""

    def get_node_ids(self) -> list[int]:
        raise AssertionError("the pre-flight check must not contact nodes")


def federation(tmp_path: Path, **changes: object) -> Federation:
    cfg = build_config({**HOPELESS, **changes, "out": str(tmp_path / "run")})
    return Federation.open(InMemoryGrid(), cfg, tmp_path / "run")  # type: ignore[arg-type]


def test_error_refuses_before_the_run_folder_and_ledger_exist(tmp_path: Path) -> None:
    with pytest.raises(PreflightRefused, match="cannot learn") as info:
        federation(tmp_path, preflight="error")
    assert "23.0x the largest possible signal" in str(info.value)
    assert "no privacy budget was spent" in str(info.value)
    assert not (tmp_path / "run" / "ledger.jsonl").exists()
    assert not (tmp_path / "run" / "config.toml").exists()


def test_warn_logs_the_numbers_and_off_is_silent(tmp_path: Path) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    try:
        fed = federation(tmp_path / "warn")
        assert fed.preflight is not None and fed.preflight.cannot_learn
        warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert any("CANNOT-LEARN" in w and "would help" in w for w in warnings), warnings
        assert fed.summary()["preflight"]["verdict"] == "cannot-learn"
        assert (tmp_path / "warn" / "run" / "ledger.jsonl").exists()  # warn: the run starts
        records.clear()
        off = federation(tmp_path / "off", preflight="off")
        assert off.preflight is None and off.summary()["preflight"] is None
        assert not [r for r in records if "pre-flight" in r.getMessage()]
    finally:
        flwr_logger.removeHandler(handler)


def test_cli_error_mode_exits_2_with_a_plain_message(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "refused"
    args = ["simulate", "--out", str(out), "--set", "preflight=error"]
    for key, value in HOPELESS.items():
        args += ["--set", f"{key}={str(value).lower()}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("confide: error: this configuration cannot learn")
    assert "client-dp [cannot-learn]" in err and "would help: more partners" in err
    assert "Traceback" not in err
    assert not out.exists()  # nothing started, nothing spent


def test_off_skips_the_check() -> None:
    assert preflight(build_config({**HOPELESS, "preflight": "off"}), [40, 40]) is None
    good = preflight(RunConfig(model="tiny", clients=2, noise_multiplier=1.0), [400, 400])
    assert good is not None and not good.needs_attention


def test_simulate_warns_in_the_console_summary_and_report(tmp_path: Path) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200)
    out, summary = simulate(build_config({**HOPELESS, "out": str(tmp_path / "run")}),
                            console=console)
    text = buffer.getvalue()
    head = text.index("pre-flight: CANNOT-LEARN")
    assert head < text.index("Confide run")  # shown before the rounds' table
    assert "would help: more partners per round" in text
    assert summary["rounds_completed"] == 1  # 'warn' never stops or changes the run
    pre = json.loads((out / "summary.json").read_text())["preflight"]
    assert pre["verdict"] == "cannot-learn" and pre["mode"] == "warn"
    (cdp,) = [m for m in pre["mechanisms"] if m["mechanism"] == "client-dp"]
    assert cdp["ratio"] == pytest.approx(2114 ** 0.5 / 2, rel=0.05) and cdp["ratio"] > 10
    assert "Pre-flight check: cannot-learn" in (out / "report.html").read_text()
