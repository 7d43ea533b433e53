"""The deployment launchers without a federation: their environment (state folder,
threads, verbosity), the SuperLink supervisor's stop, the run-log filter and the
deployed processes' logging. The same behaviour with Flower's real processes is checked in
test_deployment_e2e.py."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from confide.clients.threads import ThreadsError, node_threads, supernodes_running
from confide.deploy import commands
from confide.deploy.commands import RunLogFilter, launch_env, supernode_command, supervise

ROOT = Path(__file__).resolve().parents[2]


def _supernode_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    data = tmp_path / "train.csv"
    data.write_text("text,label\ngood,1\nbad,0\n")
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args([
        "deploy", "supernode", "--superlink", "127.0.0.1:9092", "--data-path", str(data),
        "--max-epsilon", "8", "--state-dir", str(tmp_path / "state"),
        "--allow-unsigned-apps", "--insecure", "--i-understand-insecure", *extra])


def test_node_keeps_flower_files_under_its_state_folder(tmp_path: Path) -> None:
    # Flower's home (app bundles) was ~/.flwr; now STATE_DIR/flwr, whatever the
    # partner's environment says
    args = _supernode_args(tmp_path)
    supernode_command(args)
    env = launch_env(args, {"FLWR_HOME": str(Path.home() / ".flwr"), "PATH": "/usr/bin"})
    assert env["FLWR_HOME"] == str((tmp_path / "state" / "flwr").resolve())


def test_threads_setting_and_its_automatic_default(tmp_path: Path) -> None:
    # two nodes on a 2-core machine used 2 threads each (80-127 s per round)
    assert node_threads(0, cores=2, nodes=2) == 1
    assert node_threads(None, cores=16, nodes=3) == 5
    assert node_threads("auto", cores=4, nodes=8) == 1
    assert node_threads(3, cores=2, nodes=2) == 3
    for bad in (-1, "many"):
        with pytest.raises(ThreadsError, match="node config threads"):
            node_threads(bad)
    args = _supernode_args(tmp_path, "--threads", "3")
    argv = supernode_command(args)
    assert "threads=3" in argv[argv.index("--node-config") + 1]
    env = launch_env(args, {"PATH": "/usr/bin"})
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    auto = launch_env(_supernode_args(tmp_path), {"PATH": "/usr/bin", "OMP_NUM_THREADS": "9"})
    assert auto["OMP_NUM_THREADS"] == "9"  # automatic: the ClientApp divides the cores
    with pytest.raises(commands.DeployError, match="--threads -2"):
        supernode_command(_supernode_args(tmp_path, "--threads", "-2"))


def test_supernodes_on_this_machine_are_counted(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, argv in ((10, [sys.executable, "/venv/bin/flower-supernode", "--x"]),
                      (11, ["/venv/bin/flower-supernode"]), (12, ["flower-superlink"]),
                      (13, ["python", "flower-supernode-notes.txt"])):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv))
    assert supernodes_running(proc) == 2
    assert supernodes_running(tmp_path / "none") == 1


def test_verbose_flag_reaches_the_processes(tmp_path: Path) -> None:
    quiet = launch_env(_supernode_args(tmp_path), {"CONFIDE_VERBOSE": "1"})
    assert "CONFIDE_VERBOSE" not in quiet
    assert launch_env(_supernode_args(tmp_path, "--verbose"), {})["CONFIDE_VERBOSE"] == "1"


# A SuperLink that does what Flower's does on SIGTERM during a live run (uvicorn waits for
# the open log stream and node connections): it does not exit. Like Flower's, it starts a
# flower-superexec in a session of its own, which a signal to the SuperLink's group misses.
STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, lambda *_: print("waiting for connections", flush=True))
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                     start_new_session=True)
    print("ready", flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_superlink_supervisor_stops_it_and_its_serverapp_sessions(tmp_path: Path) -> None:
    # the SuperLink did not stop within 15 s of SIGTERM during a live run
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    launcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from confide.deploy.commands import supervise; "
         f"sys.exit(supervise([sys.executable, {str(script)!r}], dict(__import__('os')"
         ".environ), grace=1.0))"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=ROOT, start_new_session=True)
    assert launcher.stdout is not None
    assert launcher.stdout.readline().strip() == "ready"
    children = commands._children(launcher.pid)
    grandchildren = [g for c in children for g in commands._children(c)]
    assert len(children) == 1 and len(grandchildren) == 1
    start = time.monotonic()
    os.killpg(launcher.pid, signal.SIGTERM)  # what a service manager or Ctrl-C does
    assert launcher.wait(10) == 0
    assert time.monotonic() - start < 5  # grace 1 s: SIGTERM, SIGTERM again, SIGKILL
    assert "stopped on request" in launcher.stderr.read()  # type: ignore[union-attr]
    time.sleep(0.2)
    assert not any(_alive(p) for p in children + grandchildren)
    assert supervise([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ)) == 3


# What `flwr run --stream` printed when the ServerApp refused an existing `out`:
# Flower 1.41, before the fix, shortened. Every line twice, the message inside a
# traceback, Flower's generic exit-code text, and `flwr run` exited 0.
ORIGINAL_STREAM = """\
Using SuperLink: confide (127.0.0.1:41209)
Successfully started run 5641042066732135744
\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `5641042066732135744`
\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process
\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0. Federated evaluation will be skipped.
\x1b[91mERROR \x1b[0m:     Confide: error: /srv/runs/study-1 already holds a run; use resume = \
true to continue it or choose another out folder
\x1b[91mERROR \x1b[0m:     ServerApp raised an exception
Traceback (most recent call last):
  File "/venv/flwr/superlink/runtime/run_serverapp.py", line 221, in run_serverapp
    context = run_(
              ^^^^^
  File "/apps/confide/server/server_app.py", line 68, in main
    raise RunFailed(str(exc)) from None
confide.server.server_app.RunFailed: /srv/runs/study-1 already holds a run; use resume = true \
to continue it or choose another out folder
\x1b[91mERROR \x1b[0m:     Exit Code: 201

An unhandled exception occurred in the ServerApp.

For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/201.html>
\x1b[92mINFO \x1b[0m:      Confide round 1/2: accuracy 0.5, loss 0.7, aggregated 2/2
"""


def test_run_log_filter_shows_a_known_failure_once_without_traceback() -> None:
    filt = RunLogFilter()
    shown = "".join(k for line in ORIGINAL_STREAM.splitlines(keepends=True)
                    for k in filt.feed(line))
    assert filt.run_id == 5641042066732135744
    assert filt.failure == ("/srv/runs/study-1 already holds a run; use resume = true to "
                            "continue it or choose another out folder")
    for gone in ("Traceback", "File ", "RunFailed", "already holds", "Exit Code",
                 "For more information", "fraction_evaluate"):
        assert gone not in shown, gone
    assert "Start `flwr-serverapp` process" in shown and "Confide round 1/2" in shown
    verbose = RunLogFilter(verbose=True)
    everything = "".join(k for line in ORIGINAL_STREAM.splitlines(keepends=True)
                         for k in verbose.feed(line))
    assert everything == ORIGINAL_STREAM and verbose.failure == filt.failure
    # a bug (no Confide message before it) keeps its traceback
    bug = RunLogFilter()
    kept = [k for line in ("ERROR : ServerApp raised an exception\n", "Traceback (most "
            "recent call last):\n", "  File 'x.py'\n", "KeyError: 'x'\n") for k in bug.feed(line)]
    assert len(kept) == 4 and bug.failure is None


def test_deployed_process_prints_each_line_once_without_known_notices() -> None:
    # Opacus' logging.basicConfig doubled every Flower line; its and torch's
    # UserWarnings and Flower's fraction_evaluate notice came with every run
    code = textwrap.dedent("""
        import warnings
        import opacus.utils.module_utils  # calls logging.basicConfig (root handler)
        from flwr.common.logger import log
        from logging import INFO, WARNING
        from confide.logs import deployed_process_logging
        deployed_process_logging()
        log(INFO, "Confide round 1/1: accuracy 0.5")
        log(WARNING, "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
        warnings.warn("Full backward hook is firing when gradients are computed with "
                      "respect to module outputs since no inputs require gradients.")
        warnings.warn("Secure RNG turned off. This is perfectly fine for experimentation")
        warnings.warn("something else")
    """)

    def output(**env: str) -> str:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, **env}, timeout=300, check=True)
        # redirected (not a terminal): no colour codes in the node's or server's log file
        assert "\x1b[" not in res.stdout + res.stderr
        return res.stdout + res.stderr

    quiet = output(CONFIDE_VERBOSE="")
    assert quiet.count("Confide round 1/1: accuracy 0.5") == 1
    assert "fraction_evaluate" not in quiet and "Full backward hook" not in quiet
    assert "Secure RNG" not in quiet and "something else" in quiet
    verbose = output(CONFIDE_VERBOSE="1")
    assert verbose.count("Confide round 1/1") == 1  # once, also with --verbose
    assert "fraction_evaluate" in verbose and "Full backward hook" in verbose


def test_deploy_run_writes_the_report_of_a_finished_run_it_can_see(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`confide deploy run` writes report.html after a completed run when the run folder
    (`out`) is on this machine and was written by this run; otherwise it says how to."""
    import io

    import confide.audit.report as report
    from confide.run_layout import REPORT_HTML_FILE
    from tests.audit.conftest import build_run

    started = time.time()
    out = build_run(tmp_path / "run").dir
    config = f"out='{out}' rounds=3"
    assert commands.finished_run_folder(config, started) == out
    assert commands.finished_run_folder(config, time.time() + 60) is None  # an older run's
    assert commands.finished_run_folder("rounds=3", started) is None  # the ServerApp's name
    err = io.StringIO()
    assert commands.write_deployed_report("rounds=3", started, err) == 0
    assert "confide audit report RUN_DIR" in err.getvalue()

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(report, "atomic_write_bytes", full)
        err = io.StringIO()
        assert commands.write_deployed_report(config, started, err) == 1
    assert f"confide audit report {out}" in err.getvalue()
    assert commands.write_deployed_report(config, started, io.StringIO()) == 0
    assert (out / REPORT_HTML_FILE).is_file()


def test_roster_and_policy_reach_the_node_config(tmp_path: Path, capsys) -> None:
    assert commands.run(_parsed(["deploy", "partner-identity", "--state-dir",
                                 str(tmp_path / "state")])) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"[0-9a-f]{64} p-[0-9a-f]{12}", line)
    (tmp_path / "roster.txt").write_text(line + "\n")
    argv = supernode_command(_supernode_args(
        tmp_path, "--roster", str(tmp_path / "roster.txt"), "--min-partners", "3",
        "--max-delta", "1e-6", "--dp-colluders", "1"))
    node_config = argv[argv.index("--node-config") + 1]
    for part in (f"federation-roster='{(tmp_path / 'roster.txt').resolve()}'",
                 "min-partners=3", "max-delta=1e-06", "dp-colluders=1"):
        assert part in node_config
    with pytest.raises(commands.DeployError, match="--min-partners = 1: allowed"):
        supernode_command(_supernode_args(tmp_path, "--min-partners", "1"))
    with pytest.raises(commands.DeployError, match="no such file"):
        supernode_command(_supernode_args(tmp_path, "--roster", str(tmp_path / "none")))
    (tmp_path / "bad.txt").write_text("not-a-key\n")
    with pytest.raises(commands.DeployError, match="line 1: 'not-a-key' is not a 32-byte"):
        supernode_command(_supernode_args(tmp_path, "--roster", str(tmp_path / "bad.txt")))


def _parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_deploy_run_ends_with_the_final_table_run_folder_and_report_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the operator console ended on the run's last log line: no table, folder or report
    from confide.cli import _final_table
    from tests.audit.conftest import build_run


    started = time.time()
    out = build_run(tmp_path / "run").dir
    assert commands.write_deployed_report(f"out='{out}' rounds=3", started,
                                          show_finished=_final_table, run_id=7) == 0
    shown = capsys.readouterr().out
    assert "Confide run" in shown and "eps min-max" in shown  # simulate's table
    assert "Example-level epsilon per partner" in shown
    assert f"run folder: {out.resolve()}" in shown
    assert f"report: {(out / 'report.html').resolve()}" in shown
    assert "\x1b[" not in shown  # not a terminal: no colour codes


def _fake_flwr(tmp_path: Path, run_script: str, ls_script: str) -> dict[str, str]:
    """A `flwr` on PATH that streams `run_script`'s output for `flwr run` and answers
    `flwr ls` with `ls_script`'s."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    flwr = bin_dir / "flwr"
    flwr.write_text(f"#!/bin/sh\nif [ \"$1\" = run ]; then\n{run_script}\nelse\n"
                    f"{ls_script}\nfi\n")
    flwr.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_deploy_run_says_every_failure_in_words_without_colour_codes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text("")
    env = _fake_flwr(
        tmp_path,
        "printf '\\033[92mINFO \\033[0m:  Successfully started run 5\\n'\n"
        "printf '\\033[92mINFO \\033[0m:  Confide round 1/1: accuracy 0.5\\n'",
        # the SuperLink went away: `flwr ls` answers with its JSON error
        "echo '{\"success\": false, \"error-message\": \"Connection to the SuperLink "
        "failed.\"}'; exit 1")
    monkeypatch.setenv("PATH", env["PATH"])
    out = io.StringIO()
    assert commands.run_app(app, "confide", "rounds=1", out=out) == 1
    assert "\x1b[" not in out.getvalue()  # redirected: colour codes stripped
    assert "Confide round 1/1: accuracy 0.5" in out.getvalue()
    err = capsys.readouterr().err
    assert "run 5" in err and "Connection to the SuperLink failed." in err
    assert "{" not in err and "success" not in err  # no raw JSON dump
    assert commands.flwr_error("", "Traceback ...\nValueError: no connection 'x'\n") == \
        "ValueError: no connection 'x'"
    assert commands.flwr_error("", "") == "no answer"

    # interrupted (Ctrl-C) while streaming: the run goes on; how to follow or stop it
    class Interrupting(io.StringIO):
        def write(self, text: str) -> int:
            if "Confide round" in text:
                raise KeyboardInterrupt
            return super().write(text)

    assert commands.run_app(app, "confide", "rounds=1", out=Interrupting()) == 130
    err = capsys.readouterr().err
    assert "interrupted; run 5 goes on" in err
    assert "flwr log 5 confide --stream" in err and "flwr stop 5 confide" in err
    assert "{" not in err


def test_deploy_help_says_who_runs_every_sub_command_once(capsys) -> None:
    parser = argparse.ArgumentParser(prog="confide")
    commands.add_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["deploy", "--help"])
    help_text = capsys.readouterr().out
    names = ["init-ca", "server-cert", "partner-identity", "node-key", "publisher-key",
             "trust-publisher", "stage-app", "sign-app", "register", "connection",
             "superlink", "supernode", "run"]
    assert "{" + ",".join(names) + "}" in help_text  # every sub-command, in setup order
    who = help_text.split("Who runs which sub-command:", 1)[1].split("positional", 1)[0]
    for name in names:
        assert len(re.findall(rf"(?<![\w-]){name}(?![\w-])", who)) == 1, name
