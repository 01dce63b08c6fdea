"""Math answers: take the last `\\boxed{...}` of a response and check it against the reference with math-verify.

    response:  "... so the area is \\boxed{\\dfrac{1}{2}\\,\\text{cm}^2}."
    answer:    "0.5"
    reward:    1.0

math-verify (Hugging Face) parses both sides to SymPy and compares them: fractions against decimals, `\\dfrac`
against `\\frac`, percent, units in `\\text{}` (`\\text{ cm}`, `\\text{ dollars}`), sets and intervals, equations
like `x=3` against `3`, tuples `(1, 2)` and `\\left(1, 2\\right)`, and vectors and matrices (`pmatrix`, `bmatrix`,
`matrix`, `array`; rows split by `\\\\`, columns by `&`) entry by entry, shape included. Before parsing we:

- drop LaTeX spacing (`\\,`, `\\!`, `\\;`, `\\ `, `\\quad`), which it would otherwise read as multiplication, but
  keep the `\\\\` row break whole (reading its second backslash as the control space `\\ ` used to glue rows
  together, so a vector was graded on its first entry);
- drop the dollar unit `\\$` (and `\\textdollar`), before stripping `$` delimiters (stripping first used to leave
  `10\\` from `10\\$`);
- spell `Bmatrix` as `pmatrix` and `smallmatrix` as `matrix`: math-verify does not know those and reads one as its
  last entry. `vmatrix` (a determinant) is left to math-verify.

Timeouts: math-verify bounds each parse and comparison with `signal.alarm`, which only works in the main thread.
Off the main thread we pass `None` (no timeout) so the call works anywhere; since SymPy can then run for ever on
inputs such as `9^{9^{9^{9}}}`, a response whose boxed answer looks like that (a huge or nested exponent, a chain
of factorials, more than `MAX_ANSWER_CHARS` characters) is only compared as a string, never handed to SymPy.
"""

from __future__ import annotations

import logging
import re
import threading

TIMEOUT_S = 3  # seconds per parse and per comparison, where signal-based timeouts work (the main thread)
MAX_ANSWER_CHARS = 300

# math-verify warns once that timeouts are off, and on every timeout; neither is for the person running training.
logging.getLogger("math_verify").setLevel(logging.ERROR)

BOX_COMMANDS = ("\\boxed", "\\fbox")
# a `\\` row break (vectors, matrices) is matched first and kept, so `1 \\ 2` never loses `\ ` as a control space
SPACING_RE = re.compile(r"(\\\\)|\\(?:[,!;:> ]|quad\b|qquad\b)")
DOLLAR_RE = re.compile(r"\\\$|\\textdollar(?![A-Za-z])")
FRAC_RE = re.compile(r"\\[dt]frac\b")
# matrix environments math-verify does not know (it reads one as its last entry) -> the same matrix in one it knows
MATRIX_RENAMES = {"Bmatrix": "pmatrix", "smallmatrix": "matrix"}
MATRIX_ENV_RE = re.compile(r"\\(begin|end)\{(Bmatrix|smallmatrix)\}")
# exponents SymPy may take for ever to evaluate: ^{...^...}, ^{1234...}, ^1234; and chained factorials
DANGEROUS_RE = re.compile(r"\^\s*\{[^{}]*(?:\^|\d{4})|\^\s*\d{4}|!\s*!")


def _closing_brace(text: str, open_at: int) -> int | None:
    """Index of the brace that closes the one at `open_at` (escaped braces `\\{`, `\\}` do not count), or None."""
    depth = 0
    i = open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) in `text`; None if there is none
    or the last one is never closed (a response cut off inside its answer)."""
    if not isinstance(text, str):
        return None
    start = max(text.rfind(cmd) for cmd in BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in BOX_COMMANDS if text.startswith(c, start))
    i = start + len(cmd)
    rest = text[i:]
    if rest[:1] == " " and rest.strip()[:1] not in ("{", ""):  # "\boxed 5": the answer is the next word
        word = re.match(r"\s+([^\s$]+)", rest)
        return word.group(1).rstrip(".,;:") or None if word else None
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    end = _closing_brace(text, i)
    return None if end is None else text[i + 1 : end].strip()


def _drop_spacing(latex: str) -> str:
    """Drop `\\,`, `\\!`, `\\ `, `\\quad`...; keep `\\\\` row breaks whole."""
    return SPACING_RE.sub(lambda m: m.group(1) or "", latex)


def _known_matrices(latex: str) -> str:
    """Spell `Bmatrix` as `pmatrix` and `smallmatrix` as `matrix`, environments math-verify reads entry by entry."""
    return MATRIX_ENV_RE.sub(lambda m: f"\\{m.group(1)}{{{MATRIX_RENAMES[m.group(2)]}}}", latex)


def normalize(latex: str) -> str:
    """Drop LaTeX spacing, the dollar unit (`\\$`, `\\textdollar`) and `$` delimiters, spell `\\dfrac`/`\\tfrac`
    as `\\frac`, and rename matrix environments math-verify does not know."""
    latex = _drop_spacing(latex)
    latex = _known_matrices(latex)
    latex = DOLLAR_RE.sub("", latex)
    latex = FRAC_RE.sub(r"\\frac", latex)
    return latex.strip().strip("$").strip()


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _gold_text(answer: str) -> str:
    boxed = extract_boxed(answer)
    return normalize(boxed if boxed is not None else answer)


def math_reward(response: str, answer: str) -> float:
    """1.0 when the last boxed answer of `response` equals the reference `answer` mathematically, else 0.0.

    Never raises: a response without a boxed answer, or anything math-verify cannot read, scores 0.0.
    """
    try:
        pred = extract_boxed(response)
        if pred is None:
            return 0.0
        pred = normalize(pred)
        gold = _gold_text(str(answer))
        if not pred or not gold:
            return 0.0
        if len(pred) > MAX_ANSWER_CHARS or DANGEROUS_RE.search(pred):
            return float(pred.replace(" ", "") == gold.replace(" ", ""))
        from math_verify import parse, verify

        timeout = _timeout()
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return 0.0
        return float(bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout)))
    except Exception:  # noqa: BLE001 - a reward must never stop training; garbage scores 0
        return 0.0
