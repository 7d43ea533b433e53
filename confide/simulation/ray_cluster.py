"""Where `confide simulate` runs: a Ray instance of its own, or an existing Ray cluster.

An existing cluster (`--ray-address`, or Ray's `RAY_ADDRESS` variable) is joined here,
before Flower's simulation engine starts: Flower calls `ray.init` only when Ray is not
initialised yet, and `ray.init` refuses resource arguments (num_cpus, num_gpus) when it
joins a cluster. The cluster's own resources then decide how many partners train at once;
each virtual partner reserves `client-cpus` CPUs and `client-gpus` of a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from typing import Any

from confide.config import RunConfig
from confide.errors import ConfideError

PROBE_SECONDS = 5.0  # a Ray head that does not accept a TCP connection in this time is down
ENGINE_FAILURE = "An error was encountered. Ending simulation."  # flwr 1.41 _main_loop


class RayClusterError(ConfideError, ValueError):
    """The Ray cluster named by --ray-address / RAY_ADDRESS cannot be used; says why."""


class SimulationEngineError(ConfideError, RuntimeError):
    """Flower's simulation engine (or Ray under it) failed; the message carries its error."""

    exit_status = 1


def resolve_address(flag: str | None) -> str | None:
    """--ray-address wins over RAY_ADDRESS; empty means a Ray instance of this process."""
    for value in (flag, os.environ.get("RAY_ADDRESS")):
        if value is not None and value.strip():
            return value.strip()
    return None


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of 'host:port' or 'ray://host:port'; None for 'auto' / 'local'."""
    text = address.removeprefix("ray://")
    if text in ("auto", "local"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayClusterError(f"Ray address {address!r} is not host:port (e.g. "
                              "127.0.0.1:6379, ray://head:10001 or auto)")
    return host.strip("[]"), int(port)


def probe(address: str, timeout: float = PROBE_SECONDS) -> None:
    """Fail fast with a message when nothing listens at the address (ray.init itself
    retries for minutes against an address where no Ray head runs)."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        raise RayClusterError(
            f"cannot reach a Ray cluster at {address}: {exc.strerror or exc}. Start one with "
            f"`ray start --head --port {target[1]}` on {target[0]}, or check --ray-address / "
            "RAY_ADDRESS") from None


def connect(address: str, *, verbose: bool = False) -> dict[str, float]:
    """Join the cluster at `address` (without resource arguments); returns its resources."""
    import ray

    if ray.is_initialized():  # an earlier local run in this process: leave it first
        ray.shutdown()
    probe(address)
    # Ray's workers inherit this driver's import path (as Flower's own ray.init does): the
    # cluster's nodes must have confide installed in the same environment.
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    try:
        ray.init(address=address, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayClusterError(f"cannot join the Ray cluster at {address}: {exc}") from None
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def disconnect() -> None:
    """Leave the cluster (the cluster keeps running: it is not this process's)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def start_local(init_args: dict[str, Any]) -> None:
    """This process's own Ray instance, started as Flower's RayBackend would (Flower then
    uses it and skips its own `ray.init`): here, so that the driver can set its SIGTERM
    handler again afterwards (`ray.init` replaces it with one that raises SystemExit in
    whatever the main thread is doing)."""
    import ray

    if ray.is_initialized():  # an earlier run in this process
        ray.shutdown()
    # Ray's workers inherit this driver's import path (what Flower's init_ray does)
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
             **{"include_dashboard": False, **init_args})


# Ray's per-node agents: daemons, not partners' workers (killing them first would make the
# raylet fail, and with it this driver)
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def descendants() -> list[Any]:
    """Every live process this one started, directly or not (psutil.Process objects:
    they compare start times, so a reused pid is never mistaken for one of them)."""
    import psutil

    try:
        return list(psutil.Process().children(recursive=True))
    except psutil.Error:
        return []


def _title(proc: Any) -> str:
    import psutil

    try:
        cmdline = proc.cmdline()
        return str(cmdline[0]) if cmdline else str(proc.name())
    except psutil.Error:
        return ""


def kill_workers(procs: list[Any]) -> int:
    """SIGKILL the Ray worker processes among `procs` (the partners' training in flight,
    idle workers); returns how many. Flower's engine waits for each task it handed to a
    worker: killed, the task fails at once."""
    import psutil
    import ray

    # the driver would print "(raylet) A worker died or was killed ..." for each: the
    # stop's own doing. The switch Ray's debugger uses to keep worker output off the
    # console (a no-op where a Ray version lacks it).
    ray._private.worker._worker_logs_enabled = False
    killed = 0
    for proc in procs:
        title = _title(proc)
        if title.startswith("ray::") and not title.startswith(RAY_AGENTS):
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed += 1
    return killed


def end_processes(procs: list[Any], timeout: float = 3.0) -> None:
    """SIGTERM the live ones among `procs`, wait up to `timeout` s, then SIGKILL those left
    (timeout 0: SIGKILL at once)."""
    import psutil

    alive = [p for p in {p.pid: p for p in procs}.values() if p.is_running()]
    if timeout > 0:
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(alive, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=1.0)


def backend_config(cfg: RunConfig, *, cluster: dict[str, float] | None = None
                   ) -> dict[str, Any]:
    """Flower's backend configuration: `client-cpus` CPUs per virtual partner and, where Ray
    sees a GPU and device is not 'cpu', `client-gpus` of one. On a cluster of its own Ray
    gets this machine's CPUs; on an existing cluster no init arguments (Ray refuses them)."""
    if cluster is not None:
        has_gpu = cluster.get("GPU", 0.0) > 0
    else:
        import torch

        has_gpu = torch.cuda.is_available()
    gpus = cfg.client_gpus if cfg.device != "cpu" and has_gpu else 0.0
    resources = {"num_cpus": cfg.client_cpus, "num_gpus": gpus}
    if cluster is not None:
        return {"client_resources": resources, "init_args": {}}
    return {"client_resources": resources,
            "init_args": {"num_cpus": os.cpu_count() or 1, "log_to_driver": False,
                          "include_dashboard": False}}


def engine_error(exc: BaseException, cfg: RunConfig, cluster: dict[str, float] | None = None
                 ) -> SimulationEngineError | None:
    """Flower's 'Ending simulation' error, with the error that caused it named; None for
    an exception of the ServerApp itself (raised as it is)."""
    if str(exc) != ENGINE_FAILURE:
        return None
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    message = f"the simulation engine failed: {type(root).__name__}: {root}"
    if "ActorPool is empty" in str(root):  # Flower's words for 'resources do not fit'
        message += (f" (each partner asks for client-cpus = {cfg.client_cpus:g} and "
                    f"client-gpus = {cfg.client_gpus:g}, used only where Ray sees a GPU; no "
                    f"Ray node has that much: {_resources(cluster)}; lower client-cpus or "
                    "client-gpus)")
    return SimulationEngineError(message)


def _resources(cluster: dict[str, float] | None) -> str:
    import ray

    if ray.is_initialized():
        nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
        if nodes:
            return ", ".join(f"node {i + 1}: {r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} "
                             "GPUs" for i, r in enumerate(nodes))
    if cluster is not None:
        return f"the cluster has {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs"
    return f"this machine's Ray has {os.cpu_count() or 1} CPUs"


class EngineCrashLog(logging.Filter):
    """Flower's own ERROR records of an engine crash (its tracebacks, from the simulation
    runtime and run_simulation): `confide simulate` re-raises the error as one line, so
    without --verbose they are left out."""

    SOURCES = ("vce_api.py", "run_simulation.py")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR
                    and record.pathname.endswith(self.SOURCES))
