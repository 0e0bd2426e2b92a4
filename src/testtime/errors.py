"""The package's errors: what a user can act on, kept apart from bugs.

Every error a user can fix or must know about derives from `TesttimeError`; the
command line prints its message as one line and exits with its `exit_code`
(2 for input, 3 for infrastructure). Anything else (a `KeyError` or
`ValueError` from inside the code) is a bug and keeps its traceback: the CLI
never catches those wholesale.

The classes also derive from the built-in they refine (`ValueError`,
`KeyError`, `RuntimeError`), so `except ValueError` around a parameter check
keeps working.
"""

from __future__ import annotations


class TesttimeError(Exception):
    """Something the user can act on; the message says what and where."""

    exit_code = 2


class InputError(TesttimeError, ValueError):
    """Bad input: a parameter, a file, a dataset row, a policy file. The message names it."""


class NotFoundError(TesttimeError, KeyError):
    """A named thing that does not exist: a run, a registered name."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message is prose
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(TesttimeError, ImportError):
    """An optional package this path needs is not installed; the message says which."""


class InfrastructureError(TesttimeError, RuntimeError):
    """The machinery failed, not the input or the model's answer: a server that cannot be
    reached, a sandbox that cannot isolate, every worker dead. Exit code 3."""

    exit_code = 3
