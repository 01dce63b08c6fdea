"""Errors meant for people: one line saying what is wrong and how to fix it.

Every bad input a user can give (a path, a name, a setting, a data file) raises `UserError`; the CLI prints its
message on one line and exits with code 2, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The message says what is wrong and how to fix it, in one line."""

    exit_code = 2


def choose(family: str, table: dict, name: str):
    """Look `name` up in one of the literal selection dicts; an unknown name lists the valid ones."""
    try:
        return table[name]
    except KeyError:
        valid = ", ".join(sorted(table))
        raise UserError(f"unknown {family} {name!r}; choose one of: {valid}") from None
