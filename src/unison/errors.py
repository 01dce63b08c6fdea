"""Errors meant for people: one line saying what is wrong and how to fix it.

Every bad input a user can give (a path, a name, a setting, a data file) raises `UserError`; the CLI prints its
message on one line and exits with code 2, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and how to fix it, in one line."""

    exit_code = 2


class RunFault(Exception):
    """A run stopped by its machine or a signal, not by its inputs: the message says what happened, which checkpoint
    is the newest complete one and the command that resumes. `exit_code` is fixed per fault (`EXIT_CODES`)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# the exit codes of `unison`, by what ended it (README: "Exit codes")
EXIT_CODES = {
    "done": 0,
    "training stopped (loss-scale floor, weight-sync mismatch, fp16 activation overflow, engine self-test)": 1,
    "bad input": 2,
    "a write failed (disk full, read-only or unwritable folder)": 3,
    "interrupted (SIGINT, Ctrl-C)": 130,
    "terminated (SIGTERM)": 143,
}
WRITE_FAILED, SIGINT_CODE, SIGTERM_CODE = 3, 130, 143


def choose(family: str, table: dict, name: str):
    """Look `name` up in one of the literal selection dicts; an unknown name lists the valid ones."""
    try:
        return table[name]
    except KeyError:
        valid = ", ".join(sorted(table))
        raise UserError(f"unknown {family} {name!r}; choose one of: {valid}") from None
