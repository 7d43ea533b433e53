"""`confide simulate --ray-address` / RAY_ADDRESS on an existing Ray cluster.

The module starts its own Ray head (`ray start --head --block`) on loopback, with its own
temp dir and free ports, in a session of its own; teardown ends that session only (never
`ray stop`, which would stop every Ray process of the user, other runs' included).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from confide.audit.verify import verify_run
from confide.data import synthetic_sentiment
from confide.simulation import ray_cluster

RAY = Path(sys.executable).with_name("ray")
TINY = ["--model", "tiny", "--rounds", "1", "--clients", "2", "--set", "max-length=16",
        "--set", "batch-size=8", "--set", "physical-batch-size=8", "--set", "preflight=off"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    if not RAY.exists():
        pytest.skip(f"{RAY} (Ray's command line) is absent")
    temp = Path(tempfile.mkdtemp(prefix="crh", dir="/tmp"))  # short: Ray's socket paths
    port, client, agent, dash, metrics = free_ports(5)
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--metrics-export-port={metrics}", "--disable-usage-stats"],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        lines = []
        assert head.stdout is not None
        while time.monotonic() < deadline:
            line = head.stdout.readline()
            lines.append(line)
            if "Ray runtime started" in line or head.poll() is not None:
                break
        if head.poll() is not None:
            pytest.fail("ray start --head failed:\n" + "".join(lines))
        yield f"127.0.0.1:{port}"
    finally:
        # the head's session only: gcs, raylet, its workers and agents
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """150 rows: 30 held out for evaluation, 60 per partner (a few DP steps each)."""
    data = synthetic_sentiment(150, seed=4)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(data.texts, (int(y) for y in data.labels), strict=True))
    return path


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 600
            ) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "confide.cli", "simulate", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    return proc, time.monotonic() - t0


def test_simulation_on_an_existing_cluster_keeps_the_output_contract(
        ray_head: str, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, _ = run_cli([*TINY, "--data", str(data_file), "--out", str(out), "--ray-address",
                       ray_head],
                      env={"RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Ray cluster {ray_head}: 2 CPUs" in proc.stdout
    for name in ("config.toml", "metrics.jsonl", "summary.json", "ledger.jsonl",
                 "report.html", "model/weights.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    assert len(summary["privacy"]["example_level"]) == 2
    assert verify_run(out).ok
    # the cluster is still up for others: the run only disconnected from it
    with socket.create_connection(("127.0.0.1", int(ray_head.rsplit(":", 1)[1])), timeout=5):
        pass


def test_engine_error_on_the_cluster_ends_the_command_with_that_error(
        ray_head: str, data_file: Path, tmp_path: Path) -> None:
    """Partners asking for more CPUs than any node has: Flower's engine fails inside its
    own thread; the command must end with that error and exit 1, not wait for replies."""
    proc, seconds = run_cli([*TINY, "--data", str(data_file), "--out", str(tmp_path / "run"),
                             "--set", "client-cpus=4"], env={"RAY_ADDRESS": ray_head},
                            timeout=400)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the simulation engine failed: ValueError: ActorPool is empty" in proc.stderr
    assert "client-cpus = 4" in proc.stderr and "has 2 CPUs" in proc.stderr
    assert "Traceback" not in proc.stderr  # one line, not Flower's tracebacks
    # a hang waits out the ServerApp's reply timeout (an hour); this took ~17 s idle and
    # 60 s on 2 cores under a load of 20
    assert seconds < 300


def test_unreachable_address_is_a_message_not_a_hang(tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    proc, seconds = run_cli([*TINY, "--out", str(tmp_path / "run"), "--ray-address",
                             f"127.0.0.1:{port}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(rf"cannot reach a Ray cluster at 127\.0\.0\.1:{port}", proc.stderr)
    assert "Traceback" not in proc.stderr
    assert seconds < 90


def test_address_resolution_and_backend_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from confide.config import build_config

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_cluster.resolve_address(None) == "10.0.0.1:6379"
    assert ray_cluster.resolve_address("127.0.0.1:1234") == "127.0.0.1:1234"
    monkeypatch.setenv("RAY_ADDRESS", " ")
    assert ray_cluster.resolve_address(None) is None
    with pytest.raises(ray_cluster.RayClusterError, match="is not host:port"):
        ray_cluster.probe("no-port-here")
    cfg = build_config({"client-cpus": 0.5, "client-gpus": 0.2, "device": "auto"})
    on_cluster = ray_cluster.backend_config(cfg, cluster={"CPU": 8.0, "GPU": 2.0})
    # joining a cluster: no init arguments (Ray refuses num_cpus / num_gpus then)
    assert on_cluster == {"client_resources": {"num_cpus": 0.5, "num_gpus": 0.2},
                          "init_args": {}}
    no_gpu = ray_cluster.backend_config(cfg, cluster={"CPU": 8.0})
    assert no_gpu["client_resources"]["num_gpus"] == 0.0
    cpu_only = ray_cluster.backend_config(cfg.replace(device="cpu"), cluster={"GPU": 1.0})
    assert cpu_only["client_resources"]["num_gpus"] == 0.0
