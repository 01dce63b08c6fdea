"""Prompt sets and verifiable rewards: the built-in countdown task, the shipped word problems and prompt files
(JSONL/Parquet)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from unison.errors import UserError
from unison.tasks.base import Example, Task
from unison.tasks.countdown import LONG, CountdownTask
from unison.tasks.files import FileTask

__all__ = ["Example", "Task", "load_task", "BUILTIN_TASKS"]

BUILTIN_TASKS = ("builtin", "countdown", "countdown-long", "word-problems")


def load_task(
    source: str | Path = "builtin",
    *,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    reward: str | Callable | None = None,
    test_path: str | Path | None = None,
    require_answer: bool = True,
) -> Task:
    """The built-in countdown task (`builtin` or `countdown`; `countdown-long`: its long-response variant), the
    shipped word problems (`word-problems`, a `FileTask` over their two splits) or a `FileTask` over a JSONL/Parquet
    prompt file.

    `reward` (default `math` for files, `last-number` for the word problems) picks a file task's reward; the built-in
    task has its own. `test_path` replaces the word problems' shipped test split.
    """
    if str(source) == "word-problems":
        from unison.tasks.wordproblems import load

        return load(reward=reward, test_path=test_path)
    if str(source) in BUILTIN_TASKS or source in (None, ""):
        if test_path is not None:
            raise UserError(
                f"data.test_source={str(test_path)!r} names held-out prompts for a prompt file, and the built-in "
                "countdown task has its own test split; drop data.test_source, or train on a prompt file "
                "(data.source=FILE.jsonl)"
            )
        if reward not in (None, "countdown"):
            raise UserError(
                f"the built-in countdown task has its own reward, so reward={reward!r} cannot be used with it; "
                "drop the reward setting or give a prompt file (.jsonl or .parquet)"
            )

        return CountdownTask(**LONG) if str(source) == "countdown-long" else CountdownTask()

    return FileTask(
        source,
        prompt_key=prompt_key,
        answer_key=answer_key,
        reward="math" if reward is None else reward,
        test_path=test_path,
        require_answer=require_answer,
    )
