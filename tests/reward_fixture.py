"""A reward for tests: varies with the response, so that advantages are non-zero even for a random model."""


def even_length(response: str, answer: str) -> float:
    return float(len(response) % 2 == 0)


def raises(response: str, answer: str) -> float:
    raise ZeroDivisionError("division by zero")


def huge(response: str, answer: str) -> float:
    return 1e300  # finite in Python, inf in fp32


def not_a_number(response: str, answer: str):
    return "yes"


def slow(response: str, answer: str) -> float:
    """Says that it was called (a file named by UNISON_TEST_MARK), then takes a minute: a reward a SIGTERM lands in."""
    import os
    import pathlib
    import time

    pathlib.Path(os.environ["UNISON_TEST_MARK"]).touch()
    time.sleep(60)
    return 0.0


def rank1_raises(response: str, answer: str) -> float:
    """Raises on rank 1 only (of a run on several ranks)."""
    import os

    if os.environ.get("RANK") == "1":
        raise ValueError("bad answer format")
    return float(len(response) % 2 == 0)


def odd_char_sum(response: str, answer: str) -> float:
    """1 where the response's character codes add up to an odd number: any token of it can flip it."""
    return float(sum(map(ord, response)) % 2 == 1)
