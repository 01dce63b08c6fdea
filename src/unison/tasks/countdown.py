"""The built-in task: count down from a number in fixed steps, one number at a time, and give what is left.

    prompt:    "47-9:"                     start 47, step 9
    response:  "47,38,29,20,11,2\n#2"       the whole chain, then "#" and the final answer, then EOS
    answer:    47 mod 9 = 2

The chain is 4 to 40 numbers long, so responses run from about 15 to about 170 tokens with the built-in byte-level
tokenizer (the train-inference mismatch grows with length). The long variant (`countdown-long`, `LONG`) counts down
in steps of 2 or 3 through 90 to 333 numbers of at most three digits: responses of about 300 to 1,300 tokens. The
reward is 1 when the number after the last "#" equals the answer and the response ended with EOS, else 0. Prompts
are drawn by a seeded generator; a fixed hash of (start, step) puts one prompt in five into the `test` split, so
held-out prompts never appear in training.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

from unison.tasks.base import Example

ANSWER_RE = re.compile(r"#\s*(-?\d+)\s*$")


def chain(start: int, step: int) -> list[int]:
    """The numbers of the countdown: start, start - step, ... down to the last one that is not negative."""
    return list(range(start, -1, -step))


def solution(start: int, step: int) -> str:
    """The reference response (without EOS)."""
    numbers = chain(start, step)
    return ",".join(map(str, numbers)) + f"\n#{numbers[-1]}"


def parse_prompt(prompt: str) -> tuple[int, int]:
    start, step = prompt.rstrip(":").split("-")
    return int(start), int(step)


def final_answer(response: str) -> str | None:
    """The number after the last '#', or None."""
    match = ANSWER_RE.search(response.strip())
    return match.group(1) if match else None


@dataclass
class CountdownTask:
    """Countdown prompts with steps in [min_step, max_step] and chains of [min_len, max_len] numbers."""

    min_step: int = 3
    max_step: int = 9
    min_len: int = 4
    max_len: int = 40
    name: str = "countdown"

    def _split_of(self, start: int, step: int) -> str:
        return "test" if zlib.crc32(f"{start}-{step}".encode()) % 5 == 0 else "train"

    def all_examples(self, split: str = "train") -> list[Example]:
        """Every prompt of a split, in a fixed order."""
        out = []
        for step in range(self.min_step, self.max_step + 1):
            for start in range(step * (self.min_len - 1), step * self.max_len):
                if self._split_of(start, step) == split:
                    out.append(self.example(start, step))
        return out

    def example(self, start: int, step: int) -> Example:
        numbers = chain(start, step)
        return Example(prompt=f"{start}-{step}:", answer=str(numbers[-1]), id=f"{start}-{step}")

    def examples(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Example]:
        pool = self.all_examples(split)
        rng = random.Random(seed)
        rng.shuffle(pool)
        return pool if n is None else pool[:n]

    def reward(self, response: str, example: Example, finished: bool) -> float:
        if not finished:
            return 0.0
        return float(final_answer(response) == example.answer)

    def reference(self, example: Example) -> str:
        """The correct response for a prompt (used by the supervised warm start)."""
        return solution(*parse_prompt(example.prompt))


# the long-response variant: the same arithmetic (numbers of at most three digits), chains of 90 to 333 numbers
LONG = dict(min_step=2, max_step=3, min_len=90, max_len=333, name="countdown-long")
