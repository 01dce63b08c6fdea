"""Reward functions by name: the built-in ones, or a user function given by its import path.

    reward: math                          last \\boxed{} answer against the reference (math-verify)
    reward: exact                         the response, stripped, equals the answer, stripped
    reward: countdown                     the number after the last '#' equals the answer (the built-in task)
    reward: last-number                   the response's last number equals the answer (the word problems)
    reward: my_pkg.rewards:score          a user function score(response: str, answer: str) -> float
    reward: my_pkg.rewards.score          the same
    reward: ./rewards.py:score            a function in a Python file

A user function may take a third keyword argument `example` (the whole `Example`, with the file's other columns in
`example.meta["fields"]`). Every reward loaded here is called the same way: `fn(response, answer, example=None)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from unison.errors import UserError
from unison.tasks.base import Example
from unison.tasks.countdown import final_answer
from unison.tasks.math import math_reward

RewardFn = Callable[..., float]  # fn(response: str, answer: str, example: Example | None = None) -> float


def _math_reward(response: str, answer: str, example: Example | None = None) -> float:
    return math_reward(response, answer)


def exact_reward(response: str, answer: str, example: Example | None = None) -> float:
    """1.0 when the response equals the answer after stripping surrounding whitespace."""
    return float(response.strip() == str(answer).strip())


def countdown_reward(response: str, answer: str, example: Example | None = None) -> float:
    """1.0 when the number after the last '#' equals the answer (the built-in countdown format)."""
    return float(final_answer(response) == str(answer).strip())


# a number: an optional sign (a hyphen right after a word or a bracket is a minus, not a sign), digits with or
# without thousands commas (not right after a point or a digit: ".5" is no number), an optional decimal part and an
# optional fraction bar: "-3", "1,200", "8.0", "16/2"
NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?(?<![.\d])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?")


def final_number(text: str) -> Fraction | None:
    """The exact value of the last number in `text` (NUMBER_RE), or None (no number, or a fraction over 0)."""
    found = NUMBER_RE.findall(text or "")
    try:
        return Fraction(found[-1].replace(",", "")) if found else None
    except ZeroDivisionError:  # "3/0"
        return None


def last_number_reward(response: str, answer: str, example: Example | None = None) -> float:
    """1.0 when the last number of the response equals the answer exactly ("8.0" and "16/2" are 8; "8.5" is not),
    0.0 otherwise, also for an answer that is no number."""
    value = final_number(response)
    try:
        return float(value is not None and value == Fraction(str(answer).strip().replace(",", "")))
    except (ValueError, ZeroDivisionError):
        return 0.0


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math": _math_reward,
    "exact": exact_reward,
    "countdown": countdown_reward,
    "last-number": last_number_reward,
}


def _accepts_example(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(p.name == "example" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _as_float(value, spec: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise UserError(
            f"reward function {spec!r} returned {value!r} ({type(value).__name__}); make it return a float"
        ) from None
    if not math.isfinite(out):
        raise UserError(f"reward function {spec!r} returned {out}; make it return a finite float")
    return out


def wrap_reward(fn, spec: str) -> RewardFn:
    """A user function as `fn(response, answer, example=None) -> float`, its result checked to be a finite float."""
    if _accepts_example(fn):

        def reward(response: str, answer: str, example: Example | None = None) -> float:
            return _as_float(fn(response, answer, example=example), spec)

    else:

        def reward(response: str, answer: str, example: Example | None = None) -> float:
            return _as_float(fn(response, answer), spec)

    reward.__name__ = getattr(fn, "__name__", "reward")
    return reward


def _split_path(spec: str) -> tuple[str, str]:
    if ":" in spec:
        module, _, attr = spec.rpartition(":")
    else:
        module, _, attr = spec.rpartition(".")
    if not module or not attr:
        raise UserError(
            f"reward {spec!r} is neither a built-in reward ({', '.join(sorted(BUILTIN_REWARDS))}) nor an import path; "
            "give one of those or 'package.module:function'"
        )
    return module, attr


def _import(module: str, spec: str):
    try:
        if module.endswith(".py"):
            path = Path(module).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"no file {str(path)!r}")
            mod_spec = importlib.util.spec_from_file_location(f"unison_user_reward_{path.stem}", path)
            mod = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(mod)
            return mod
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - anything the user's module raises on import
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"cannot import {module!r} for reward {spec!r} ({type(exc).__name__}: {first}); "
            "make it importable (install it or add its folder to PYTHONPATH) or use a built-in reward: "
            f"{', '.join(sorted(BUILTIN_REWARDS))}"
        ) from None


def load_reward(spec: str | RewardFn = "math") -> RewardFn:
    """A reward function from a built-in name or a `package.module:function` path (or a callable, wrapped).

    The result is called as `fn(response, answer, example=None)` and returns a float.
    """
    if callable(spec):
        return wrap_reward(spec, getattr(spec, "__name__", repr(spec)))
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(
            f"reward {spec!r} is not a name; give one of {', '.join(sorted(BUILTIN_REWARDS))} "
            "or 'package.module:function'"
        )
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if "." not in spec and ":" not in spec:
        raise UserError(
            f"unknown reward {spec!r}; choose one of: {', '.join(sorted(BUILTIN_REWARDS))}, "
            "or give a function's import path like 'my_pkg.rewards:score'"
        )
    module, attr = _split_path(spec)
    mod = _import(module, spec)
    fn = getattr(mod, attr, None)
    if fn is None:
        raise UserError(f"module {module!r} has no attribute {attr!r} (reward {spec!r}); check the function's name")
    if not callable(fn):
        raise UserError(
            f"reward {spec!r} is a {type(fn).__name__}, not a function; "
            "point it at a function (response, answer) -> float"
        )
    return wrap_reward(fn, spec)
