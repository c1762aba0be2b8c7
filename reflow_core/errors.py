"""Errors a user can cause and fix, and how the command line prints them.

Every such error derives from :class:`UserError`.  The command line prints its message on one line,
``reflow_core: error: <message>``, and exits 2 (argparse's own code for a bad command line);
:func:`reflow_core.launch.launch` looks for :data:`ERROR_PREFIX` in a training child's output to put the child's own
explanation at the top of its error.  Anything that is not a
``UserError`` is a bug and keeps its traceback.

This module imports nothing from the package, so every layer can raise these.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from typing import Callable

ERROR_PREFIX = "reflow_core: error: "
INTERRUPTED_PREFIX = "reflow_core: interrupted"
USER_ERROR_EXIT = 2  # argparse's code for a bad command line: the user has something to change
BUG_EXIT = 1
INTERRUPTED_EXIT = 128 + signal.SIGINT  # what a shell reports for a command stopped by Ctrl-C


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A configuration field is unknown or has a bad value; the message names the field."""


class InvalidArgumentError(UserError, ValueError):
    """A function or command-line argument has a value that cannot work; the message names the argument."""


def report_error(error: BaseException, *, with_traceback: bool = False) -> None:
    """``reflow_core: error: <Type>: <message>`` on stderr (one marked line per line of the message)."""
    if with_traceback:
        traceback.print_exc()
    for line in f"{type(error).__name__}: {error}".splitlines() or [type(error).__name__]:
        print(ERROR_PREFIX + line, file=sys.stderr, flush=True)


def run_command(func: Callable[[], object]) -> int:
    """Run a command-line entry point and turn its outcome into an exit code, printing what the user must know.

    UserError: its message, no traceback, exit 2.  Ctrl-C: one line (the interrupt's own message when it carries
    one, e.g. which chapter stopped), exit 130.  Anything else is a bug: traceback plus a marked line, exit 1.
    A command that returns an int exits with it; any other result means success.
    """
    if threading.current_thread() is threading.main_thread():
        # a command started in the background of a non-interactive shell (or by a program that ignores SIGINT)
        # inherits SIGINT as ignored, and Python then raises no KeyboardInterrupt: a SIGINT sent to stop it would
        # be lost and the run would go on. Every command stops on SIGINT, however it was started.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = func()
    except UserError as e:
        report_error(e)
        return USER_ERROR_EXIT
    except KeyboardInterrupt as e:  # one line instead of a traceback from whatever loop was running
        print(f"{INTERRUPTED_PREFIX}: {e}" if str(e) else INTERRUPTED_PREFIX, file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    except Exception as e:  # noqa: BLE001 - a bug: keep the traceback, but also the marked line launch() looks for
        report_error(e, with_traceback=True)
        return BUG_EXIT
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
