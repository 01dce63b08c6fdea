"""The RL step the real-model benchmarks share: short chat questions with a one-word answer, a reward that varies
with the response (so that every group has an advantage), the model's chat template.

    write_task(folder)       the prompt file (JSONL) and the reward file written into `folder`
    train_settings(...)      the `unison train` settings of that step, as dotted overrides
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

QUESTIONS = [
    ("What is the capital of France?", "paris"),
    ("Name a primary color.", "red"),
    ("What gas do plants absorb from the air?", "carbon"),
    ("How many legs does a spider have?", "eight"),
    ("What is the largest planet in our solar system?", "jupiter"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("What language is mostly spoken in Brazil?", "portuguese"),
    ("What is the chemical symbol for gold?", "au"),
    ("How many days are in a leap year?", "366"),
    ("What is the tallest animal?", "giraffe"),
    ("Which ocean is the largest?", "pacific"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("Which planet is known as the red planet?", "mars"),
    ("What is the opposite of hot?", "cold"),
]


def keyword(response: str, answer: str) -> float:
    """1 when the answer word is in the response, plus a small term that grows with its length."""
    return float(answer.lower() in response.lower()) + 0.001 * min(len(response), 500) / 500


def write_task(folder: str | Path) -> tuple[Path, str]:
    """-> (the prompt file, the `data.reward` spec of the reward function)"""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "questions.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    (folder / "keyword_reward.py").write_text(inspect.getsource(keyword))
    return prompts, f"{folder / 'keyword_reward.py'}:keyword"


def train_settings(
    model: str, folder: str | Path, prompts: int, group: int, new_tokens: int, precision: str, threads: int = 1
) -> list[str]:
    """One RL step's settings: `prompts` questions x `group` samples of at most `new_tokens` tokens, one update over
    the whole batch, `precision` for rollout and training, no self-test, checkpoint or evaluation."""
    data, reward = write_task(folder)
    rows = prompts * group
    return [
        f"model.path={model}",
        f"data.source={data}",
        f"data.reward={reward}",
        "data.template=chat",
        f"rollout.prompts_per_step={prompts}",
        f"rollout.group_size={group}",
        f"rollout.max_new_tokens={new_tokens}",
        f"optim.train_batch_size={rows}",
        f"optim.micro_batch_size={rows}",
        f"precision.rollout={precision}",
        f"precision.train={precision}",
        f"run.threads={threads}",
        "run.progress=false",
        "run.self_test=false",
    ]
