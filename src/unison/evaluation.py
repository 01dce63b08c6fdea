"""Scoring sampled responses, and accuracy on a prompt set (avg@k, pass@k)."""

from __future__ import annotations

import math

import torch

from unison import threads
from unison.errors import UserError
from unison.rollout.base import Rollouts, SamplingParams
from unison.tasks.base import Example
from unison.tasks.templates import encode_prompt


def encode_all(tokenizer, examples: list[Example], template: str = "auto", system_prompt: str = "") -> list[list[int]]:
    """Token ids of each example's templated prompt (after `system_prompt`, where given); an empty one is a user
    error (`Setup.encode` checks them against the model's context)."""

    out = []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex, template, system_prompt or None)
        if not ids:
            raise UserError(
                f"prompt {ex.id or ex.prompt[:40]!r} is empty after templating; remove it from the prompt file"
            )
        out.append(ids)
    return out


FP32_MAX = float(torch.finfo(torch.float32).max)


def reward_of(task, text: str, example: Example, finished: bool) -> float:
    """The task's reward of one response, checked: a reward function that raises, or returns something other than a
    finite number fp32 holds, is a UserError naming the function and the prompt."""

    name = str(getattr(task, "reward_spec", None) or getattr(task, "name", type(task).__name__))
    where = f"on prompt {example.id or example.prompt[:40]!r}"
    try:
        value = task.reward(text, example, finished)
    except UserError as exc:
        raise UserError(f"{exc} ({where})") from None
    except Exception as exc:  # noqa: BLE001 - the user's reward function may raise anything
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(
            f"reward function {name!r} raised {type(exc).__name__}{': ' + first if first else ''} {where}; "
            "fix it so that it returns a float for every response"
        ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= FP32_MAX:
        raise UserError(
            f"reward function {name!r} returned {value!r} {where}; make it return a finite float within "
            f"fp32's range (|r| <= {FP32_MAX:.3g})"
        )
    return float(value)


def score(task, tokenizer, rollouts: Rollouts, examples: list[Example]) -> tuple[torch.Tensor, list[str]]:
    """Rewards [B] (fp32) and decoded responses for rollouts sampled from `examples` (one example per row)."""
    texts = tokenizer.batch_decode(rollouts.responses(), skip_special_tokens=True)
    finished = rollouts.finished.tolist()
    rewards = [reward_of(task, text, ex, done) for text, ex, done in zip(texts, examples, finished)]
    return torch.tensor(rewards, dtype=torch.float32), texts


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"): 1 - C(n - c, k) / C(n, k), as a product so that no binomial overflows."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, not {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


SOLVED = 0.5  # a response counts as solved where its reward is above this


def evaluate(
    engine,
    task,
    tokenizer,
    examples: list[Example],
    prompts: list[list[int]],
    params: SamplingParams,
    n: int = 1,
    ks: list[int] | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """avg@n (the mean reward over n samples per prompt) and the unbiased pass@k for each k of `ks` (default: n),
    with each prompt's result; `prompts` are the examples' encoded prompts (`Setup.encode`)."""

    if not examples:
        raise UserError("there are no prompts to evaluate; give a prompt set with at least one prompt")
    ks = sorted(set(ks or [n]))
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    rewards = torch.zeros(len(rows))
    lengths = torch.zeros(len(rows))
    for start in range(0, len(rows), batch_size):
        threads.adapt()
        part = rows[start : start + batch_size]
        ro = engine.generate([p for _, p in part], params, progress=progress)
        r, _ = score(task, tokenizer, ro, [examples[i] for i, _ in part])
        rewards[start : start + len(part)] = r
        lengths[start : start + len(part)] = ro.lengths.float()
    per_prompt = rewards.view(len(examples), n)  # [prompts, n]
    solved = (per_prompt > SOLVED).sum(1).tolist()
    out = {f"avg@{n}": per_prompt.mean().item()}
    out.update({f"pass@{k}": sum(pass_at_k(n, c, k) for c in solved) / len(solved) for k in ks})
    out.update(
        {
            "num_prompts": len(examples),
            "samples_per_prompt": n,
            "response_length_mean": lengths.mean().item(),
            "per_prompt": [
                {"id": ex.id, "solved": c, "n": n, "mean_reward": float(m)}
                for ex, c, m in zip(examples, solved, per_prompt.mean(1).tolist())
            ],
        }
    )
    return out
