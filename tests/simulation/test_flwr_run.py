"""`flwr run .` as README shows it: offline, in the installed environment (no per-run
`uv sync`, no runtime environment, nothing fetched: every proxy points at a closed port, so
any download would fail the run), quiet (each partner line once, no warning to ignore, no
bare "INFO :" at the end) and ending like `confide simulate`: the run folder and the final
table. Flower's local SuperLink runs under a HOME of the test's own and is stopped after."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from confide.audit.verify import verify_run

ROOT = Path(__file__).resolve().parents[2]
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, every fetch fails
# README's offline settings for `flwr run .`
OFFLINE = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_local_superlink(home: Path) -> None:
    """The SuperLink `flwr run` started (and left running) for this HOME, and its children."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(home) in part for part in proc.info["cmdline"] or []):
                procs += [proc, *proc.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def test_flwr_run_is_offline_quiet_and_ends_with_the_run_folder_and_table(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "FLWR_"))}
    env.update(OFFLINE, HOME=str(home), FLWR_HOME=str(home / ".flwr"),
               XDG_CACHE_HOME=str(home / ".cache"),
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               **{k: CLOSED for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                                      "https_proxy", "all_proxy")})
    flwr = str(Path(sys.executable).parent / "flwr")
    try:
        run = subprocess.run(
            [flwr, "run", str(ROOT), "--run-config",
             "rounds=2 model='tiny' max-length=16 local-epochs=0.1 preflight='off'",
             "--federation-config", "num-supernodes=3", "--stream"],
            cwd=home, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_local_superlink(home)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-4000:]
    # in this environment: no runtime environment built, nothing downloaded or cached
    assert not (home / ".flwr" / "runtime-envs").exists(), text[-4000:]
    assert not (home / ".cache" / "uv").exists()
    assert "uv sync" not in text and "Installing application dependencies" not in text

    named = re.search(r"Confide: run folder (\S+)", text)
    assert named, text[-4000:]
    out = Path(named.group(1))
    assert out.parent == (home / "runs").resolve()
    result = verify_run(out)
    assert result.ok and result.finished, [str(p) for p in result.problems]
    # the same final table as `confide simulate`, then where the report comes from
    assert "Example-level epsilon per partner" in text and "eps min-max" in text
    assert f"Run folder {out}; its report: confide audit report {out}" in text

    for noise in ("Full backward hook", "UserWarning", "Manually terminating", "Traceback"):
        assert noise not in text, noise
    partner_lines = re.findall(r"partner (p-[0-9a-f]+) round (\d+):", text)
    assert len(partner_lines) == 3 * 2 and len(set(partner_lines)) == 6, partner_lines
    last = [line for line in run.stdout.splitlines() if line.strip()][-1]  # no bare INFO
    assert "its report: confide audit report" in last, last
