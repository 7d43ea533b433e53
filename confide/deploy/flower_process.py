"""Flower's own processes as `confide deploy` starts them (flower-superlink,
flower-supernode, and the ClientApps a node starts through its verifying wrapper), with
colour codes only on a terminal.

Flower's console handler writes ANSI colour codes whatever its stream is, so a SuperLink
or SuperNode log sent to a file or a service manager's journal carries them. Started as
`python -m confide.deploy.flower_process flower-superlink ...`, the process runs Flower's
own entry point unchanged, in the same process (signals reach Flower as before), with
colour kept for a handler whose stream is a terminal.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from typing import IO, Any


def _isatty(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def colour_only_on_a_terminal() -> None:
    """Make every Flower console handler colour its lines only when its stream is a
    terminal. A property on the class wins over the handler's own `self.colored = ...`
    and over Flower's later `update_console_handler(colored=True)`."""
    from flwr.supercore.logger import ConsoleHandler

    def colored(handler: Any) -> bool:
        return _isatty(getattr(handler, "stream", None))

    ConsoleHandler.colored = property(colored, lambda handler, value: None)  # type: ignore[assignment]  # a read-only rule in place of its flag


def launch_argv(argv: list[str]) -> list[str]:
    """The command line that runs Flower's `argv` (its script name first) under this
    module, with this interpreter."""
    return [sys.executable, "-m", __name__, *argv]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(f"usage: python -m {__name__} FLOWER-SCRIPT [ARGS...]")
    name, *rest = sys.argv[1:]
    scripts = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
    if not scripts:
        sys.exit(f"{name}: not a Flower command installed in this environment")
    colour_only_on_a_terminal()
    sys.argv = [name, *rest]
    sys.exit(scripts[0].load()())


if __name__ == "__main__":
    main()
