"""Errors meant for people: one line saying what is wrong and how to fix it.

Every bad input a user can give (a path, a name, a setting, a data file) raises `UserError`; the CLI prints its
message on one line and exits with code 2, without a traceback.
"""

from __future__ import annotations

import errno
import re


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
    "its output's reader went away (a closed pipe, e.g. `| head`): nothing more is printed": 141,
    "terminated (SIGTERM)": 143,
}
WRITE_FAILED, SIGINT_CODE, SIGPIPE_CODE, SIGTERM_CODE = 3, 130, 141, 143

# the errors of a write that the machine refused: no room, a read-only or unwritable place, a failing device
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}


def write_error(exc: BaseException) -> OSError | None:
    """The failed write behind `exc`, however the library that wrote wrapped it, or None where `exc` is no failed
    write. Every write unison makes (checkpoints, adapters, exports, metrics, samples, tracker logs) ends here, so
    that each failure reaches the user the same way: one line, exit code 3.

        OSError of WRITE_ERRNOS      itself
        safetensors' SafetensorError "I/O error: No space left on device (os error 28)": that OSError
        TrackerError                 a tracker that could not log (its own exception types, its own words)
        an error raised while handling one of these (torch's zip writer, closing after a failed write into a
        Python file, says "unexpected pos"): the one it handled
    """
    for _ in range(8):  # the exception, then the one it was raised while handling
        if isinstance(exc, (UserError, RunFault)):  # said in its own words
            return None
        if isinstance(exc, OSError):
            return exc if exc.errno in WRITE_ERRNOS else None
        if type(exc).__name__ == "SafetensorError":  # safetensors keeps the OSError it met as text
            found = re.search(r"I/O error: (.*) \(os error (\d+)\)", str(exc))
            if found and int(found.group(2)) in WRITE_ERRNOS:
                return OSError(int(found.group(2)), found.group(1))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if exc is None:
            return None
    return None


def describe_write(exc: OSError, where: str = "") -> str:
    """'cannot write <what> (<why>)' for a failed write: its file where the error names one, else `where`."""
    what = exc.filename or where
    return f"cannot write{' ' + str(what) if what else ''} ({exc.strerror or exc})"


class TrackerError(OSError):
    """A tracker (MLflow, W&B, TensorBoard) that failed to log: a write that failed, in the tracker's words."""

    def __init__(self, tracker: str, exc: BaseException):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        super().__init__(errno.EIO, f"{type(exc).__name__}: {first}", f"to the {tracker} tracker")


def choose(family: str, table: dict, name: str):
    """Look `name` up in one of the literal selection dicts; an unknown name lists the valid ones."""
    try:
        return table[name]
    except KeyError:
        valid = ", ".join(sorted(table))
        raise UserError(f"unknown {family} {name!r}; choose one of: {valid}") from None
