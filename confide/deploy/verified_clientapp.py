"""`flwr-clientapp` that first checks the app bundle against the node's trusted publishers.

Flower's SuperNode starts each ClientApp as a `flwr-clientapp` process found on PATH (via
`flower-superexec`). `confide deploy supernode` puts this wrapper first on PATH, so the
check runs in the partner's own installed code before any of the bundle's code is imported
(a check inside the bundle could be removed by whoever altered it). A refused bundle makes
the ClientApp fail before it sees data; the SuperNode reports an error reply for the round.
The wrapper also ends the ClientApp when its SuperNode is gone (`confide.deploy.lifeline`)
and stops Flower's heartbeat before the task's final report.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

TRUSTED_PUBLISHERS_KEY = "trusted-publishers"  # node config: path to the YAML file
# Set by `confide deploy supernode --allow-unsigned-apps`: the wrapper still keeps the
# ClientApp's lifeline (confide.deploy.lifeline), it checks no signature.
UNSIGNED_ENV = "CONFIDE_ALLOW_UNSIGNED_APPS"
HEARTBEAT_STOP_S = 5.0


# A refusal found while pulling the task, raised once the message is known: run_clientapp
# only sends an error reply (so the server is not left waiting) for exceptions raised after
# the pull returned.
_REFUSAL: list[Exception] = []


def _refusing(install: Any) -> Any:
    def install_from_fab(*args: Any, **kwargs: Any) -> Any:
        if _REFUSAL:
            raise _REFUSAL[0]
        return install(*args, **kwargs)

    return install_from_fab


def _verifying(pull: Any) -> Any:
    def pull_task_input(client: Any) -> Any:
        from flwr.common.logger import log

        from confide.deploy.app_signing import (
            AppVerificationError,
            load_trusted_publishers,
            verify_fab,
        )

        message, context, run, fab = pull(client)
        path = context.node_config.get(TRUSTED_PUBLISHERS_KEY)
        try:
            if not path:  # fail closed: no list means nothing is trusted
                raise AppVerificationError(f"node config has no {TRUSTED_PUBLISHERS_KEY}")
            publisher = verify_fab(fab.content, load_trusted_publishers(Path(str(path))))
        except AppVerificationError as exc:
            log(ERROR, "confide: refusing app bundle %s: %s", fab.hash_str[:12], exc)
            _REFUSAL.append(exc)  # raised by install_from_fab, before any bundle code
            return message, context, run, fab
        log(INFO, "confide: app bundle %s signed by trusted publisher %s",
            fab.hash_str[:12], publisher)
        # The bundle's own `confide` must be what runs, not this installed copy: forget the
        # modules imported for the check so the bundle's folder (first on sys.path) wins.
        for name in [m for m in sys.modules if m == "confide" or m.startswith("confide.")]:
            del sys.modules[name]
        return message, context, run, fab

    return pull_task_input


def _heartbeats_first(heartbeat_sender: Any, push_task_output: Any) -> tuple[Any, Any]:
    """Flower's exit handler reports the task finished (which revokes the task's Runtime
    token) before it stops the heartbeat thread: a heartbeat sent in between was refused
    ("[ApiError:1008] Runtime task-token authentication failed", "401 Unauthorized" in the
    node log) and made the process signal itself. The heartbeat now stops first."""
    senders: list[Any] = []

    class Recorded(heartbeat_sender):  # Flower's class, typed Any here
        def start(self) -> None:
            senders.append(self)
            super().start()

    def push(*args: Any, **kwargs: Any) -> Any:
        for sender in senders:
            if sender.is_running:  # stop() joins its thread: bounded, as Flower's exit is
                stopping = threading.Thread(target=sender.stop, daemon=True)
                stopping.start()
                stopping.join(HEARTBEAT_STOP_S)
        return push_task_output(*args, **kwargs)

    return Recorded, push


def main() -> None:
    import importlib

    from flwr.supernode.cli import flwr_clientapp

    from confide.deploy.flower_process import colour_only_on_a_terminal
    from confide.deploy.lifeline import parent_pid_arg, start_lifeline

    colour_only_on_a_terminal()
    start_lifeline(parent_pid_arg(sys.argv[1:]))  # never outlive the SuperNode
    # Patch the module's globals: run_clientapp() looks these names up at call time.
    module = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    # a ModuleType declares no attributes to assign to; the names exist at run time
    if not os.environ.get(UNSIGNED_ENV):
        module.pull_task_input = _verifying(module.pull_task_input)  # type: ignore[attr-defined]  # above
        module.install_from_fab = _refusing(module.install_from_fab)  # type: ignore[attr-defined]  # above
    module.HeartbeatSender, module.push_task_output = _heartbeats_first(  # type: ignore[attr-defined]  # above
        module.HeartbeatSender, module.push_task_output)
    flwr_clientapp()


def install_wrapper(bin_dir: Path) -> Path:
    """Write `bin_dir/flwr-clientapp` running `main` with this interpreter."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flwr-clientapp"
    path.write_text(f"#!{sys.executable}\n"
                    "from confide.deploy.verified_clientapp import main\n"
                    "main()\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def wrapped_path(bin_dir: Path) -> str:
    """PATH with the wrapper first and this interpreter's scripts (flower-superexec) next."""
    return os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                            os.environ.get("PATH", "")])
