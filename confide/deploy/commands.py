"""`confide deploy ...`: key material, allow-list, signed app, and launchers that start
Flower's `flower-superlink` / `flower-supernode` with TLS and node authentication on.

The launchers assemble Flower's own command lines (printed with `--dry-run`). The SuperNode
launcher then replaces itself with that process (logs and exit codes are Flower's); its
environment keeps Flower's files under the node's state folder (FLWR_HOME) and sets its
threads. The SuperLink launcher stays as the SuperLink's parent so that SIGTERM/SIGINT stop
it within seconds, with the ServerApp processes it started (Flower's own shutdown waits for
open log streams and node connections). `confide deploy run` is `flwr run --stream` with
the run's log filtered and an exit status that says whether the run succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TextIO

import tomli_w

from confide.clients.identity import enrol
from confide.clients.policy import PartnerPolicy, PolicyError
from confide.deploy import app_signing, pki
from confide.deploy.flower_process import launch_argv
from confide.deploy.verified_clientapp import (
    TRUSTED_PUBLISHERS_KEY,
    UNSIGNED_ENV,
    install_wrapper,
    wrapped_path,
)
from confide.privacy.secagg.identity import parse_roster
from confide.run_layout import SUMMARY_FILE

INSECURE_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! INSECURE MODE: no TLS{auth}. Model updates, node identities and app bundles travel
!! in the clear and anyone who can reach the port can impersonate a partner or the server.
!! Use this only on a machine you fully control, for debugging, never with real data.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


class DeployError(ValueError):
    """A deployment command cannot proceed; the message says what to fix."""


DEPLOY_DESCRIPTION = """\
Who runs which sub-command:
  the operator   init-ca, server-cert, publisher-key, stage-app (or sign-app), connection,
                 register, superlink, run (docs/OPERATORS.md)
  each partner   node-key, partner-identity, trust-publisher, supernode (docs/PARTNERS.md)"""


def add_parser(sub: Any) -> None:
    """`confide deploy` and its sub-commands, in the order a federation is set up: keys and
    certificates, the signed app, the SuperLink's allow-list and connection, the launchers,
    then a run."""
    p = sub.add_parser("deploy", help="keys, allow-list, signed app, SuperLink/SuperNode",
                       description=DEPLOY_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_subparsers(dest="deploy_command", required=True)
    _add_identity_parsers(d)
    _add_app_parsers(d)
    _add_superlink_access_parsers(d)
    _add_superlink_parser(d)
    _add_supernode_parser(d)
    _add_run_parser(d)


def _add_identity_parsers(d: Any) -> None:
    """The federation's CA, the SuperLink's certificate, and a partner's identities: for
    secure aggregation and for node authentication."""
    c = d.add_parser("init-ca", help="create the federation's CA (ca.crt, ca.key)")
    c.add_argument("dir", type=Path)
    c.add_argument("--name", default="Confide federation CA")

    s = d.add_parser("server-cert", help="SuperLink TLS certificate signed by the CA")
    s.add_argument("dir", type=Path, help="where server.crt/server.key go (and the CA lies)")
    s.add_argument("--name", action="append", default=[], metavar="HOST_OR_IP",
                   help="DNS name or IP partners use to reach the SuperLink (repeatable); "
                        "localhost and 127.0.0.1 are always included")
    s.add_argument("--ca", type=Path, help="CA folder if not DIR")

    pi = d.add_parser("partner-identity", help="a partner's identity for secure aggregation "
                      "(its node key, kept in --state-dir): prints the roster line to send "
                      "to the operator")
    pi.add_argument("--state-dir", type=Path, required=True,
                    help="the node's state folder (the same as `supernode --state-dir`)")
    pi.add_argument("--delta", type=float, default=1e-5,
                    help="the delta this partner's accountant is pinned to (default 1e-5)")

    n = d.add_parser("node-key", help="a partner node's authentication key pair")
    n.add_argument("dir", type=Path)
    n.add_argument("name", help="file name of the private key; the public key is NAME.pub")


def _add_app_parsers(d: Any) -> None:
    """The publisher's signing key, the partners' trust in it, and the signed app."""
    k = d.add_parser("publisher-key", help="the app publisher's Ed25519 signing key")
    k.add_argument("dir", type=Path)

    t = d.add_parser("trust-publisher", help="add a publisher key to a trusted-publishers file")
    t.add_argument("file", type=Path, help="trusted-publishers YAML (created if absent)")
    t.add_argument("public_key", type=Path, help="the publisher's publisher.pub")

    a = d.add_parser("stage-app", help="copy the app into a folder ready for `flwr run` "
                     "(all config keys overridable) and sign it")
    a.add_argument("out", type=Path)
    a.add_argument("--key", type=Path, required=True, help="publisher.key")
    a.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2],
                   help="project folder with pyproject.toml and confide/ (default: this one)")

    g = d.add_parser("sign-app", help="(re-)sign an app folder in place")
    g.add_argument("app", type=Path)
    g.add_argument("--key", type=Path, required=True)


def _add_superlink_access_parsers(d: Any) -> None:
    """The SuperLink's allow-list of partner keys and the `flwr` connection to it."""
    r = d.add_parser("register", help="add partner public keys to the SuperLink allow-list "
                     "(`flwr supernode register`)")
    r.add_argument("public_keys", type=Path, nargs="+")
    r.add_argument("--superlink", help="connection name in FLWR_HOME/config.toml")
    r.add_argument("--dry-run", action="store_true", help="print the commands only")

    f = d.add_parser("connection", help="write the `flwr` connection to a SuperLink")
    f.add_argument("--flwr-home", type=Path, default=None,
                   help="Flower's config folder (default $FLWR_HOME or ~/.flwr)")
    f.add_argument("--name", default="confide")
    f.add_argument("--address", required=True, help="HOST:PORT of the SuperLink")
    f.add_argument("--ca", type=Path, required=True, help="the federation's ca.crt")


def _add_superlink_parser(d: Any) -> None:
    sl = d.add_parser("superlink", help="start flower-superlink with TLS + node auth")
    sl.add_argument("--certs", type=Path, help="folder with ca.crt, server.crt, server.key")
    sl.add_argument("--state", type=Path, required=True,
                    help="folder for the SuperLink database (the allow-list lives there)")
    sl.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for all)")
    sl.add_argument("--port", type=int, default=9092)
    sl.add_argument("--log-file", type=Path)
    sl.add_argument("--verbose", action="store_true",
                    help="ServerApp logs keep Flower's, torch's and Opacus' known notices")
    _insecure_flags(sl)


def _add_supernode_parser(d: Any) -> None:
    sn = d.add_parser("supernode", help="start flower-supernode with TLS, node key and "
                      "the partner's node config")
    sn.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    sn.add_argument("--ca", type=Path, help="the federation's ca.crt")
    sn.add_argument("--key", type=Path, help="this node's private key (node-key)")
    sn.add_argument("--data-path", type=Path, required=True, help="the partner's data file "
                    "(never leaves the node): text,label rows for classification, "
                    "prompt,completion rows for causal-lm (the run names the columns)")
    sn.add_argument("--max-epsilon", type=float, required=True,
                    help="the partner's hard example-level budget, over all runs")
    sn.add_argument("--state-dir", type=Path, required=True,
                    help="where the node keeps its accountant and pseudonym key")
    sn.add_argument("--roster", type=Path,
                    help="the federation's roster (one partner identity a line, from the "
                         "operator; check it lists the partners you expect): secure "
                         "aggregation runs only between the partners on it")
    sn.add_argument("--min-partners", type=int,
                    help="the fewest verified partners this node aggregates with (default 2)")
    sn.add_argument("--max-delta", type=float,
                    help="the largest delta this partner accepts (default 1/(10 x its rows))")
    sn.add_argument("--max-run-epsilon", type=float,
                    help="the largest epsilon one run may spend of this partner's budget")
    sn.add_argument("--dp-colluders", type=int,
                    help="partners this partner assumes collude with the server (shared "
                         "noise: more noise per partner; default 0)")
    sn.add_argument("--min-noise-multiplier", type=float,
                    help="the smallest noise multiplier this partner applies")
    sn.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    sn.add_argument("--trusted-publishers", type=Path,
                    help="YAML of publisher keys whose signed apps this node runs")
    sn.add_argument("--allow-unsigned-apps", action="store_true",
                    help="run any app bundle the SuperLink sends (not recommended)")
    sn.add_argument("--runtime-port", type=int, default=9094,
                    help="local port of the node's Runtime API (loopback only)")
    sn.add_argument("--max-wait-time", type=float,
                    help="give up connecting to the SuperLink after this many seconds")
    sn.add_argument("--threads", type=int, default=0,
                    help="CPU threads for training (default 0: this machine's cores divided "
                         "by the SuperNodes running on it when a round starts)")
    sn.add_argument("--verbose", action="store_true",
                    help="ClientApp logs keep torch's and Opacus' known warnings")
    _insecure_flags(sn)


def _add_run_parser(d: Any) -> None:
    ru = d.add_parser("run", help="start a run of a staged app (`flwr run --stream`): its "
                      "log with one line per round, and exit status 1 if the run fails")
    ru.add_argument("app", type=Path, help="the staged, signed app folder")
    ru.add_argument("connection", nargs="?", default=None,
                    help="connection name in FLWR_HOME/config.toml (default: the default)")
    ru.add_argument("--run-config", required=True,
                    help="the run's configuration, e.g. \"out='runs/study-1' rounds=10\"")
    ru.add_argument("--verbose", action="store_true",
                    help="show the streamed log unfiltered (tracebacks included)")


def _insecure_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true", help="no TLS (and no node auth)")
    p.add_argument("--i-understand-insecure", action="store_true",
                   help="required together with --insecure")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not start")


FinishedRun = Callable[[Path, dict[str, Any]], None]  # shows a finished run's final table


def run(args: argparse.Namespace, show_finished: FinishedRun | None = None) -> int:
    """`show_finished(run_folder, summary)`: how `confide deploy run` shows a completed run
    (the CLI passes the same final table `confide simulate` prints)."""
    try:
        return _dispatch(args, show_finished)
    except (DeployError, pki.PkiError, app_signing.AppVerificationError) as exc:
        print(f"confide deploy: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, show_finished: FinishedRun | None = None) -> int:
    cmd = args.deploy_command
    if cmd == "init-ca":
        cert, key = pki.init_ca(args.dir, args.name)
        print(f"CA certificate: {cert} (give to every partner)\nCA key: {key} (keep offline)")
    elif cmd == "server-cert":
        cert, key = pki.server_cert(args.dir, args.name, ca_dir=args.ca)
        print(f"server certificate: {cert}\nserver key: {key}")
    elif cmd == "partner-identity":
        if not 0 < args.delta < 1:
            raise DeployError(f"--delta {args.delta}: allowed 0 < delta < 1")
        line = enrol(args.state_dir.expanduser().resolve(), delta=args.delta,
                     max_epsilon=math.inf)
        print(line)
        print(f"# send the line above to the operator for the federation roster; the key "
              f"stays in {args.state_dir}", file=sys.stderr)
    elif cmd == "node-key":
        key, pub = pki.node_key(args.dir, args.name)
        fp = pki.check_node_public_key(pub).fingerprint
        print(f"private key: {key} (stays on the node)\npublic key: {pub} ({fp}); send it "
              "to the operator over a channel where they can confirm the fingerprint")
    elif cmd == "publisher-key":
        key, pub = pki.publisher_key(args.dir)
        print(f"signing key: {key}\npublic key: {pub} (partners add it with "
              "`confide deploy trust-publisher`)")
    elif cmd == "trust-publisher":
        key_id = app_signing.add_trusted_publisher(args.file, args.public_key)
        print(f"trusted publisher {key_id} added to {args.file}")
    elif cmd == "stage-app":
        out = stage_app(args.source, args.out, args.key)
        print(f"signed app in {out}; run it with `confide deploy run {out} [CONNECTION] "
              "--run-config '...'` (its exit status says whether the run succeeded)")
    elif cmd == "sign-app":
        print(f"signature written: {app_signing.sign_app(args.app, args.key)}")
    elif cmd == "register":
        return register(args.public_keys, args.superlink, dry_run=args.dry_run)
    elif cmd == "connection":
        path = write_connection(args.flwr_home, args.name, args.address, args.ca)
        print(f"connection '{args.name}' -> {args.address} written to {path}")
    elif cmd == "run":
        return run_app(args.app, args.connection, args.run_config, verbose=args.verbose,
                       show_finished=show_finished)
    elif cmd in ("superlink", "supernode"):
        argv = superlink_command(args) if cmd == "superlink" else supernode_command(args)
        env = launch_env(args, os.environ)
        print(" ".join(_quote(a) for a in argv), flush=True)
        if args.dry_run:
            return 0
        # run under flower_process: Flower's log in colour only on a terminal
        launch = launch_argv(argv)
        if cmd == "superlink":
            return supervise(launch, env)
        os.execvpe(launch[0], launch, env)  # Flower's process from here on
    return 0


def launch_env(args: argparse.Namespace, base: dict[str, str] | os._Environ[str]
               ) -> dict[str, str]:
    """The environment of the SuperLink/SuperNode and every process they start."""
    env = dict(base)
    if args.verbose:
        env[VERBOSE_ENV] = "1"
    else:
        env.pop(VERBOSE_ENV, None)
    if args.deploy_command != "supernode":
        return env
    state_dir = args.state_dir.expanduser().resolve()
    # Flower keeps app bundles (and its config) in FLWR_HOME, ~/.flwr by default: the
    # node's files stay under its own state folder instead.
    env["FLWR_HOME"] = str(state_dir / "flwr")
    # Confide's flwr-clientapp first on PATH: it checks the bundle's signature (unless
    # --allow-unsigned-apps) and ends the ClientApp when its SuperNode is gone
    env["PATH"] = wrapped_path(install_wrapper(state_dir / "bin").parent)
    if args.allow_unsigned_apps:
        env[UNSIGNED_ENV] = "1"
    else:
        env.pop(UNSIGNED_ENV, None)
    if args.threads > 0:  # else the ClientApp divides the cores when a round starts
        for name in THREAD_ENV:
            env[name] = str(args.threads)
    return env


VERBOSE_ENV = "CONFIDE_VERBOSE"  # confide.logs reads it in the ServerApp/ClientApp processes
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
STOP_GRACE_S = 5.0  # after SIGTERM, a second SIGTERM (uvicorn's "force quit"), then SIGKILL


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc; elsewhere none are found)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def supervise(argv: list[str], env: dict[str, str], grace: float = STOP_GRACE_S) -> int:
    """Run the SuperLink as a child. On SIGTERM/SIGINT: SIGTERM to it and to the process
    groups of the processes it started (flower-superexec runs each ServerApp in a session
    of its own, which a signal to the SuperLink's group does not reach), a second SIGTERM
    after `grace` seconds, SIGKILL after twice that. A run in flight stops like a crashed
    ServerApp: resumable from its last checkpoint (`resume=true`)."""
    proc = subprocess.Popen(argv, env=env)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set())
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while proc.poll() is None and not stop.is_set():
            stop.wait(0.5)
        if proc.poll() is not None:
            return proc.returncode
        groups = {g for g in map(_pgid, _children(proc.pid)) if g not in (None, os.getpgrp())}
        for step, signum in enumerate((signal.SIGTERM, signal.SIGTERM, signal.SIGKILL)):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
            for pgid in groups:
                _signal_group(pgid, signal.SIGKILL if step else signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
                break
        proc.wait()
        for pgid in groups:  # the SuperLink is gone: nothing left can report to it
            _signal_group(pgid, signal.SIGKILL)
        print("confide deploy superlink: stopped on request", file=sys.stderr, flush=True)
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_=./:,@" for c in arg) else repr(arg)


def _check_insecure(args: argparse.Namespace, what: str) -> bool:
    if not args.insecure:
        return False
    if not args.i_understand_insecure:
        raise DeployError(f"--insecure turns off TLS{what}; add --i-understand-insecure if "
                          "you really mean it (never with real data)")
    print(INSECURE_WARNING.format(auth=what), file=sys.stderr, flush=True)
    return True


def _need(path: Path | None, flag: str) -> Path:
    if path is None:
        raise DeployError(f"{flag} is required (TLS and node authentication are on by default)")
    if not path.is_file():
        raise DeployError(f"{flag} {path}: no such file")
    return path.resolve()


def superlink_command(args: argparse.Namespace) -> list[str]:
    args.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = ["flower-superlink", "--host", args.host, "--port", str(args.port),
            "--database", str((args.state / "superlink.db").resolve()),
            # Partners' nodes and the ServerApp must not `uv sync` packages from an index
            # at run time: the environment is installed, reviewed and pinned beforehand.
            "--disable-runtime-dependency-installation"]
    if args.log_file:
        argv += ["--log-file", str(args.log_file)]
    if _check_insecure(args, " and no node authentication"):
        return [*argv, "--insecure"]
    if args.certs is None:
        raise DeployError("--certs is required (TLS and node authentication are on by "
                          "default)")
    return [*argv,
            "--ssl-ca-certfile", str(_need(args.certs / pki.CA_CERT, "--certs")),
            "--ssl-certfile", str(_need(args.certs / pki.SERVER_CERT, "--certs")),
            "--ssl-keyfile", str(_need(args.certs / pki.SERVER_KEY, "--certs")),
            "--enable-supernode-auth"]


def node_config_string(values: dict[str, Any]) -> str:
    """Flower's `--node-config` syntax; strings as TOML literal strings."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            if "'" in value:
                raise DeployError(f"node config {key} = {value!r}: a ' is not allowed")
            parts.append(f"{key}='{value}'")
        else:
            parts.append(f"{key}={value!r}")
    return " ".join(parts)


def supernode_command(args: argparse.Namespace) -> list[str]:
    data = args.data_path.expanduser().resolve()
    if not data.is_file():
        raise DeployError(f"--data-path {data}: no such file")
    if not args.max_epsilon > 0:
        raise DeployError(f"--max-epsilon {args.max_epsilon} must be > 0")
    if not (args.device in ("auto", "cpu") or args.device.startswith("cuda")):
        raise DeployError(f"--device {args.device!r}: use 'auto', 'cpu' or 'cuda[:N]'")
    state_dir = args.state_dir.expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if args.threads < 0:
        raise DeployError(f"--threads {args.threads} must be >= 1 (or 0: automatic)")
    node_config: dict[str, Any] = {"data-path": str(data),
                                   "max-epsilon": float(args.max_epsilon),
                                   "state-dir": str(state_dir), "device": args.device,
                                   "threads": int(args.threads)}
    if args.roster is not None:
        roster = args.roster.expanduser().resolve()
        if not roster.is_file():
            raise DeployError(f"--roster {roster}: no such file")
        try:
            parse_roster(roster.read_text(), str(roster))
        except ValueError as exc:
            raise DeployError(f"--roster: {exc}") from None
        node_config["federation-roster"] = str(roster)
    policy = {key: getattr(args, key.replace("-", "_")) for key in
              ("min-partners", "max-delta", "max-run-epsilon", "dp-colluders",
               "min-noise-multiplier")}
    node_config.update({k: v for k, v in policy.items() if v is not None})
    try:
        PartnerPolicy.from_node_config(node_config)  # fail now, not at the first round
    except PolicyError as exc:
        raise DeployError(str(exc).replace("node config ", "--")) from None
    if not args.allow_unsigned_apps:
        trusted = _need(args.trusted_publishers, "--trusted-publishers")
        app_signing.load_trusted_publishers(trusted)  # fail now, not at the first round
        node_config[TRUSTED_PUBLISHERS_KEY] = str(trusted)
    argv = ["flower-supernode", "--superlink", args.superlink,
            # The Runtime API only talks to this node's own ClientApp processes.
            "--host", "127.0.0.1", "--port", str(args.runtime_port),
            "--node-config", node_config_string(node_config)]
    if args.max_wait_time is not None:
        argv += ["--max-wait-time", str(args.max_wait_time)]
    if _check_insecure(args, " and no node authentication"):
        return [*argv, "--insecure"]
    return [*argv, "--root-certificates", str(_need(args.ca, "--ca")),
            "--auth-supernode-private-key", str(_need(args.key, "--key"))]


def register(public_keys: list[Path], superlink: str | None, *, dry_run: bool) -> int:
    """Register each key with Flower's CLI; the allow-list is the SuperLink's database."""
    status = 0
    for pub in public_keys:
        info = pki.check_node_public_key(pub)
        name = pub.name.removesuffix(".pub")
        argv = ["flwr", "supernode", "register", str(pub), *([superlink] if superlink else []),
                "--name", name]
        print(f"{name}: {info.fingerprint}\n  {' '.join(_quote(a) for a in argv)}", flush=True)
        if not dry_run:
            status = subprocess.run(argv, check=False).returncode or status
    return status


def write_connection(flwr_home: Path | None, name: str, address: str, ca: Path) -> Path:
    """Add (or replace) `[superlink.NAME]` in Flower's config.toml and make it the default."""
    import tomllib

    home = flwr_home or Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    config: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    links = config.setdefault("superlink", {})
    links[name] = {"address": address, "root-certificates": str(_need(ca, "--ca"))}
    links["default"] = name
    path.write_text(tomli_w.dumps(config))
    return path


def stage_app(source: Path, out: Path, key: Path) -> Path:
    """A clean app folder: the `confide` package and a pyproject.toml whose
    `[tool.flwr.app.config]` lists every configuration key, because `flwr run --run-config`
    can only override keys the app declares. Signed with the publisher key."""
    import tomllib

    from confide.config import declared_defaults

    source = source.resolve()
    pyproject = tomllib.loads((source / "pyproject.toml").read_text())
    if out.exists() and any(out.iterdir()):
        raise DeployError(f"{out} is not empty")
    shutil.copytree(source / "confide", out / "confide",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    defaults = declared_defaults()  # as pyproject_table() writes them
    app = pyproject["tool"]["flwr"]["app"]
    app["config"] = {**defaults, **app.get("config", {})}
    pyproject["tool"] = {"flwr": pyproject["tool"]["flwr"]}  # drop ruff/pytest settings
    (out / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    app_signing.sign_app(out, key)
    return out


# -- `confide deploy run` ---------------------------------------------------------------
FAILURE_PREFIX = "Confide: error: "  # confide.server.server_app.FAILURE_PREFIX
KNOWN_NOTICES = ("fraction_evaluate is set to 0.0",)  # confide.logs.KNOWN_FLWR_NOISE
_STARTED = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RunLogFilter:
    """What `confide deploy run` shows of a run's streamed log: a known failure as its one
    message (the ServerApp's `Confide: error: ...` line; Flower's traceback of it and its
    generic exit-code text are left out), Flower's known notices left out. Every other line
    passes unchanged, so a bug's traceback stays visible."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.run_id: int | None = None
        self.failure: str | None = None
        self._skip = ""  # "traceback" or "exit-code" while inside such a block

    def feed(self, line: str) -> Iterator[str]:
        plain = _ANSI.sub("", line)
        if (m := _STARTED.search(plain)) and self.run_id is None:
            self.run_id = int(m.group(1))
        if FAILURE_PREFIX in plain and self.failure is None:
            self.failure = plain.split(FAILURE_PREFIX, 1)[1].strip()
            if not self.verbose:
                return
        if self.verbose:
            yield line
            return
        if self._skip == "traceback":
            if plain.startswith(("Traceback", " ", "\t")) or not plain.strip():
                return
            self._skip = ""
            return  # the exception line closing the traceback
        if self._skip == "exit-code":
            if "For more information, visit" in plain:
                self._skip = ""
            return
        if self.failure is not None and "ServerApp raised an exception" in plain:
            self._skip = "traceback"
            return
        if self.failure is not None and "Exit Code: 201" in plain:
            self._skip = "exit-code"
            return
        if any(n in plain for n in KNOWN_NOTICES):
            return
        yield line


def run_status(run_id: int, connection: str | None, timeout: float = 60.0
               ) -> tuple[str, str]:
    """(status, details) of a run from `flwr ls --run-id`, once it has finished."""
    deadline = time.monotonic() + timeout
    status, details = "unknown", ""
    while True:
        res = subprocess.run(["flwr", "ls", *([connection] if connection else []),
                              "--run-id", str(run_id), "--format", "json"],
                             capture_output=True, text=True, check=False)
        try:
            run = json.loads(res.stdout)["runs"][0]
            status, details = str(run["status"]), str(run.get("status-details", ""))
        except (ValueError, KeyError, IndexError, TypeError):
            # e.g. the SuperLink is gone: say so in words, do not wait for it
            return "unknown", "the SuperLink did not say how it ended (" + \
                flwr_error(res.stdout, res.stderr) + ")"
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(1.0)


def flwr_error(stdout: str, stderr: str) -> str:
    """What a failed `flwr` command said, in one line: the `error-message` of its JSON
    answer, else its last line of text (never the raw JSON)."""
    for text in (stdout, stderr):
        with contextlib.suppress(ValueError, AttributeError):
            answer = json.loads(text)
            message = answer.get("error-message") or answer.get("error")
            if message:
                return " ".join(str(message).split())[:300]
    lines = [_ANSI.sub("", line).strip() for line in (stderr + "\n" + stdout).splitlines()]
    lines = [line for line in lines if line and not line.startswith(("{", "}", '"'))]
    return lines[-1][:300] if lines else "no answer"


def _interrupted(run_id: int | None, connection: str | None) -> int:
    conn = f" {connection}" if connection else ""
    if run_id is None:
        print("confide deploy run: interrupted before the SuperLink started a run",
              file=sys.stderr, flush=True)
    else:
        print(f"confide deploy run: interrupted; run {run_id} goes on on the SuperLink. "
              f"Follow it: flwr log {run_id}{conn} --stream; stop it: flwr stop {run_id}"
              f"{conn} (resumable with resume=true)", file=sys.stderr, flush=True)
    return 130


def run_app(app: Path, connection: str | None, run_config: str, *, verbose: bool = False,
            out: TextIO | None = None, show_finished: FinishedRun | None = None) -> int:
    """`flwr run APP [CONNECTION] --stream --run-config ...` with the log filtered
    (RunLogFilter); exit 0 only when Flower reports the run `finished:completed`, else 1
    with one message (Flower's own `flwr run` exits 0 whatever the ServerApp did); 130
    when interrupted (the run goes on: how to follow or stop it is printed). Colour codes
    only on a terminal."""
    out = out or sys.stdout
    plain = not _isatty(out)
    if not (app / "pyproject.toml").is_file():
        raise DeployError(f"{app}: not an app folder (no pyproject.toml); stage one with "
                          "`confide deploy stage-app`")
    argv = ["flwr", "run", str(app), *([connection] if connection else []), "--stream",
            "--run-config", run_config]
    started = time.time()
    filt = RunLogFilter(verbose)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1) as proc:
        assert proc.stdout is not None
        try:
            for line in _lines(proc.stdout):
                for kept in filt.feed(line):
                    out.write(_ANSI.sub("", kept) if plain else kept)
                    out.flush()
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()  # only the log stream: the run itself is the SuperLink's
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            proc.kill()
            return _interrupted(filt.run_id, connection)
    if filt.run_id is None:
        print(f"confide deploy run: error: `flwr run` did not start a run (exit {code}); "
              "see its message above", file=sys.stderr, flush=True)
        return code or 1
    try:
        status, details = run_status(filt.run_id, connection)
    except KeyboardInterrupt:
        return _interrupted(filt.run_id, connection)
    if status == "finished:completed" and filt.failure is None:
        return write_deployed_report(run_config, started, show_finished=show_finished,
                                     run_id=filt.run_id)
    reason = filt.failure or details or status
    print(f"confide deploy run: error: run {filt.run_id} {status.replace(':', ' ')}: "
          f"{reason}", file=sys.stderr, flush=True)
    return 1


def finished_run_folder(run_config: str, since: float) -> Path | None:
    """The run folder (`out` of --run-config) when this machine sees the run that just
    finished in it: its summary.json written after `since`. None when `out` is not set
    (the ServerApp then names a folder of its own) or lies on the SuperLink's machine."""
    from flwr.common.config import parse_config_args

    try:
        out = parse_config_args([run_config]).get("out")
    except (ValueError, OSError):
        return None
    if not isinstance(out, str) or not out:
        return None
    folder = Path(out).expanduser()
    try:  # an older run folder of the same name elsewhere is not this run's
        written = (folder / SUMMARY_FILE).stat().st_mtime
    except OSError:
        return None
    return folder if written >= since - 1.0 else None  # 1 s: file-system time granularity


def write_deployed_report(run_config: str, since: float, err: TextIO | None = None, *,
                          show_finished: FinishedRun | None = None,
                          run_id: int | None = None, out: TextIO | None = None) -> int:
    """After a completed deployed run: its final table, run folder and report.html /
    report.md, written here when this machine has the run folder (else a note saying how
    to write it there). Exit status 1 only when the report cannot be written for lack of
    space or permissions."""
    from confide.audit.report import ReportWriteError, write_report_after_run

    err, out = err or sys.stderr, out or sys.stdout
    folder = finished_run_folder(run_config, since)
    if folder is None:
        run = f"run {run_id}" if run_id is not None else "the run"
        print(f"confide deploy run: {run} completed; its run folder is not on this machine: "
              "write its report where it is with confide audit report RUN_DIR", file=err,
              flush=True)
        return 0
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text())
        rounds = int(summary["rounds_completed"])
    except (OSError, ValueError, KeyError, TypeError):
        summary, rounds = None, 0  # the report says what the ledger holds

    def warn(text: str) -> None:
        print(f"confide deploy run: warning: {text}", file=err, flush=True)

    if show_finished is not None and isinstance(summary, dict):
        try:
            show_finished(folder, summary)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # the run stands
            warn(f"the final table could not be shown: {exc}")
    print(f"run folder: {folder.resolve()}", file=out, flush=True)
    try:
        written = write_report_after_run(folder, int(rounds), warn)
    except ReportWriteError as exc:
        print(f"confide deploy run: error: {exc}", file=err, flush=True)
        return 1
    if written is not None:
        print(f"report: {written[0].resolve()}", file=out, flush=True)
    return 0


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _lines(stream: IO[str]) -> Iterable[str]:
    yield from iter(stream.readline, "")
