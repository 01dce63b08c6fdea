"""Scoring sampled responses, and accuracy on a prompt set (avg@k, pass@k)."""

from __future__ import annotations

import torch

from unison.rollout.base import Rollouts, SamplingParams
from unison.tasks.base import Example
from unison.tasks.templates import encode_prompt


def encode_all(tokenizer, examples: list[Example], template: str = "auto") -> list[list[int]]:
    """Token ids of each example's templated prompt; an empty one is a user error (`Setup.encode` checks them
    against the model's context)."""
    from unison.errors import UserError

    out = []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex, template)
        if not ids:
            raise UserError(f"prompt {ex.id or ex.prompt[:40]!r} is empty after templating; remove it from the prompt file")
        out.append(ids)
    return out


FP32_MAX = float(torch.finfo(torch.float32).max)


def reward_of(task, text: str, example: Example, finished: bool) -> float:
    """The task's reward of one response, checked: a reward function that raises, or returns something other than a
    finite number fp32 holds, is a UserError naming the function and the prompt."""
    from unison.errors import UserError

    name = str(getattr(task, "reward_spec", None) or getattr(task, "name", type(task).__name__))
    where = f"on prompt {example.id or example.prompt[:40]!r}"
    try:
        value = task.reward(text, example, finished)
    except UserError as exc:
        raise UserError(f"{exc} ({where})") from None
    except Exception as exc:  # noqa: BLE001 - the user's reward function may raise anything
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"reward function {name!r} raised {type(exc).__name__}{': ' + first if first else ''} {where}; "
                        "fix it so that it returns a float for every response") from None  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= FP32_MAX:
        raise UserError(f"reward function {name!r} returned {value!r} {where}; make it return a finite float within "
                        f"fp32's range (|r| <= {FP32_MAX:.3g})")  # fmt: skip
    return float(value)


def score(task, tokenizer, rollouts: Rollouts, examples: list[Example]) -> tuple[torch.Tensor, list[str]]:
    """Rewards [B] (fp32) and decoded responses for rollouts sampled from `examples` (one example per row)."""
    texts = tokenizer.batch_decode(rollouts.responses(), skip_special_tokens=True)
    finished = rollouts.finished.tolist()
    rewards = [reward_of(task, text, ex, done) for text, ex, done in zip(texts, examples, finished)]
    return torch.tensor(rewards, dtype=torch.float32), texts


def evaluate(engine, task, tokenizer, examples: list[Example], prompts: list[list[int]], params: SamplingParams,
             k: int = 1, batch_size: int = 256, progress: bool = False) -> dict:
    """avg@k (mean reward over k samples per prompt) and pass@k (share of prompts solved at least once); `prompts`
    are the examples' encoded prompts (`Setup.encode`)."""
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(k)]
    rewards = torch.zeros(len(rows))
    lengths = torch.zeros(len(rows))
    from unison import threads

    for start in range(0, len(rows), batch_size):
        threads.adapt()
        part = rows[start: start + batch_size]
        ro = engine.generate([p for _, p in part], params, progress=progress)
        r, _ = score(task, tokenizer, ro, [examples[i] for i, _ in part])
        rewards[start: start + len(part)] = r
        lengths[start: start + len(part)] = ro.lengths.float()
    per_prompt = rewards.view(len(examples), k)
    return {
        f"avg@{k}": per_prompt.mean().item(),
        f"pass@{k}": (per_prompt > 0).any(dim=1).float().mean().item(),
        "num_prompts": len(examples),
        "response_length_mean": lengths.mean().item(),
        "per_prompt": per_prompt.mean(dim=1).tolist(),
    }
