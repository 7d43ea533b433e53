"""What Confide's processes print: known, run-independent notices filtered (exactly those;
`--verbose` shows them), and each log line once.

Used by `confide simulate`, the deployed ServerApp and the partner's ClientApp.
"""

from __future__ import annotations

import logging
import os
import warnings

# Set (to any non-empty value) by `confide deploy superlink/supernode --verbose`; inherited
# by the ServerApp/ClientApp processes Flower starts.
VERBOSE_ENV = "CONFIDE_VERBOSE"

# Messages every run would print that say nothing about this run: run_simulation is
# Flower's deprecated entry point that `confide simulate` still drives; evaluation is
# central, so Flower's "fraction_evaluate is 0" notice is by design.
KNOWN_FLWR_NOISE = ("DEPRECATED FEATURE: The `run_simulation` function",
                    "fraction_evaluate is set to 0.0",
                    # each simulated partner's worker, as the engine ends it after the run
                    "Manually terminating ClientAppActor")
# Ray's tip concerns GPU visibility for actors without GPUs, which Confide does not rely on.
KNOWN_RAY_WARNING = r"Tip: In future versions of Ray, Ray will no longer override"
# UserWarnings of every DP training step that are expected: torch's note on full backward
# hooks (Opacus hooks modules whose inputs, token ids, need no gradient) and Opacus'
# secure-RNG notice (noise comes from torch's generator, as the node's docs state).
KNOWN_USER_WARNINGS = (r"Full backward hook is firing when gradients are computed with "
                       r"respect to module outputs since no inputs require gradients",
                       r"Secure RNG turned off")


class DropKnown(logging.Filter):
    """Drops exactly the records whose message contains one of KNOWN_FLWR_NOISE, and
    blank ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.strip():  # Flower's blank separator lines ("INFO :" and nothing)
            return False
        return not any(known in message for known in KNOWN_FLWR_NOISE)


def verbose_from_env() -> bool:
    return bool(os.environ.get(VERBOSE_ENV))


def one_line_per_record() -> None:
    """Flower's logger has its own console handler; Opacus calls logging.basicConfig at
    import, which gives the root logger a second one, so every Flower record was printed
    twice (once in Flower's format, once as `date:LEVEL:message`). Flower's records stop at
    Flower's handler."""
    logging.getLogger("flwr").propagate = False


def quiet_known_messages(*, keep_info: bool = False) -> None:
    """Filter exactly the known, run-independent notices of Flower, Ray, torch and Opacus.
    `keep_info`: leave Flower's level alone (a deployed run streams its per-round INFO
    lines); simulation shows its own progress and raises the level to WARNING."""
    flwr_log = logging.getLogger("flwr")
    if not keep_info:
        flwr_log.setLevel(logging.WARNING)
    if not any(isinstance(f, DropKnown) for f in flwr_log.filters):
        flwr_log.addFilter(DropKnown())
    warnings.filterwarnings("ignore", message=KNOWN_RAY_WARNING, category=FutureWarning)
    for message in KNOWN_USER_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def plain_unless_terminal() -> None:
    """Flower colours its console lines always; redirected to a log file the colour codes
    are noise: they stay only on a terminal."""
    import sys

    from flwr.supercore.logger import update_console_handler

    try:
        terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
        terminal = False
    update_console_handler(colored=terminal)


def deployed_process_logging() -> None:
    """In a deployed ServerApp or ClientApp process: each line once, colour only on a
    terminal, and the known notices filtered unless the launcher was started with
    --verbose."""
    one_line_per_record()
    plain_unless_terminal()
    if not verbose_from_env():
        quiet_known_messages(keep_info=True)


def plural(count: int, noun: str) -> str:
    """'1 round', '3 rounds' (nouns that take an s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
