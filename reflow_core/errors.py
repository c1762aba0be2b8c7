"""Errors a user can cause and fix, and how the command line prints them.

Every such error derives from :class:`UserError`.  The command line prints its message on one line,
``reflow_core: error: <message>``, and exits 2; :func:`reflow_core.launch.launch` looks for :data:`ERROR_PREFIX` in a
training child's output to put the child's own explanation at the top of its error.  Anything that is not a
``UserError`` is a bug and keeps its traceback.

This module imports nothing from the package, so every layer can raise these.
"""

from __future__ import annotations

ERROR_PREFIX = "reflow_core: error: "


class UserError(Exception):
    """Something the user asked for cannot be done as asked; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A configuration field is unknown or has a bad value; the message names the field."""
