"""Flower's processes as `confide deploy` starts them log in colour only on a terminal."""

from __future__ import annotations

import subprocess
import sys

from confide.deploy.flower_process import launch_argv

ESC = "\x1b["
LOG_A_LINE = ("from logging import WARNING; from flwr.common.logger import log, "
              "update_console_handler; update_console_handler(colored=True); "
              "log(WARNING, 'a line of the log')")


def _stderr(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True).stderr


def test_a_redirected_flower_log_has_no_colour_codes() -> None:
    # the condition it fixes: Flower alone colours a log that goes to a pipe or a file
    assert ESC in _stderr(LOG_A_LINE)
    plain = _stderr("from confide.deploy.flower_process import colour_only_on_a_terminal; "
                    "colour_only_on_a_terminal(); " + LOG_A_LINE)
    assert "a line of the log" in plain and ESC not in plain


def test_flowers_script_runs_under_it_unchanged() -> None:
    argv = ["flower-superlink", "--help"]
    launched = launch_argv(argv)
    assert launched[:3] == [sys.executable, "-m", "confide.deploy.flower_process"]
    assert launched[3:] == argv
    out = subprocess.run(launched, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: flower-superlink" in out.stdout
    unknown = subprocess.run(launch_argv(["flower-nothing"]), capture_output=True,
                             text=True, timeout=120)
    assert unknown.returncode != 0 and "flower-nothing: not a Flower command" in unknown.stderr
