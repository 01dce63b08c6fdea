"""What a task is: prompts with reference answers, and a reward that checks a response against the answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Example:
    """One prompt and its reference answer. `prompt` is the text before templating."""

    prompt: str
    answer: str
    id: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task(Protocol):
    """A prompt set with a verifiable reward."""

    name: str

    def examples(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Example]:
        """`n` examples of `split` (`train` or `test`), the same for the same seed."""
        ...

    def reward(self, response: str, example: Example, finished: bool) -> float:
        """1.0 for a correct final answer, 0.0 otherwise (0.0 for a response cut off before its end)."""
        ...
