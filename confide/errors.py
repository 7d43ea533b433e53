"""The one base of every error a user can act on.

A `ConfideError` says what is wrong and how to go on in its message, and carries the exit
status the `confide` command ends with; the command catches this class alone (an error of
any other class is a bug and keeps its traceback). The concrete errors keep their
built-in bases too (ValueError for bad input, RuntimeError for a run that cannot go on), so
code that catches those still does.
"""

from __future__ import annotations


class ConfideError(Exception):
    exit_status: int = 2  # bad input: configuration, data, model, run folder
    label: str = "error: "  # how the command introduces the message

