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


def score(task, tokenizer, rollouts: Rollouts, examples: list[Example]) -> tuple[torch.Tensor, list[str]]:
    """Rewards [B] (fp32) and decoded responses for rollouts sampled from `examples` (one example per row)."""
    texts = tokenizer.batch_decode(rollouts.responses(), skip_special_tokens=True)
    finished = rollouts.finished.tolist()
    rewards = [task.reward(text, ex, done) for text, ex, done in zip(texts, examples, finished)]
    return torch.tensor(rewards, dtype=torch.float32), texts


def evaluate(engine, task, tokenizer, examples: list[Example], prompts: list[list[int]], params: SamplingParams,
             k: int = 1, batch_size: int = 256, progress: bool = False) -> dict:
    """avg@k (mean reward over k samples per prompt) and pass@k (share of prompts solved at least once); `prompts`
    are the examples' encoded prompts (`Setup.encode`)."""
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(k)]
    rewards = torch.zeros(len(rows))
    lengths = torch.zeros(len(rows))
    for start in range(0, len(rows), batch_size):
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
