"""Rollout engines: the sampler side of RL fine-tuning. Token ids in, token ids out.

`ENGINES` is the table of engines by name, each with what it can do beyond sampling (`CAPABILITIES`); a setting
that needs one of those asks `check_capability` (one line naming the setting, the capability and the engines that
have it), so no code elsewhere tests an engine by its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unison.errors import UserError, choose
from unison.rollout.base import RolloutEngine, Rollouts, SamplingParams
from unison.rollout.native import NativeEngine
from unison.rollout.vllm import VLLMEngine

__all__ = [
    "CAPABILITIES",
    "ENGINES",
    "RolloutEngine",
    "Rollouts",
    "SamplingParams",
    "capable",
    "check_capability",
    "make_engine",
]

# what an engine may be able to do beyond sampling, as a setting that needs it says it
CAPABILITIES = {
    "distributions": "keeps the whole distribution it sampled from at each position",
    "routing": "records the experts it routes each token to",
    "fp32_lm_head": "computes the LM head in fp32",
    "attribution": "computes chosen components of the model in fp32",
    "ranks": "runs as one engine per rank under --nproc",
    "tensor_parallel": "spreads one model over several GPUs",
    "activation_checks": "checks its fp16 activations for overflow as it decodes",
    "bitwise": "computes with the learner's kernels, so that their log-probs can agree to the bit",
    "ahead": "samples in a thread of its own while the learner updates (rollout.max_staleness > 0)",
}


@dataclass(frozen=True)
class EngineKind:
    """An engine by name: how to build it (model folder, keywords -> engine) and what it can do."""

    build: Callable
    can: frozenset[str]


def _native(model_dir, **kwargs):

    return NativeEngine.from_pretrained(model_dir, **kwargs)


def _vllm(model_dir, **kwargs):

    return VLLMEngine.from_pretrained(model_dir, **kwargs)


ENGINES = {
    "native": EngineKind(_native, frozenset(CAPABILITIES) - {"tensor_parallel"}),
    "vllm": EngineKind(_vllm, frozenset({"tensor_parallel"})),
}


def capable(name: str, capability: str) -> bool:
    """Whether the engine called `name` can do `capability` (a key of CAPABILITIES)."""
    return capability in choose("rollout engine", ENGINES, name).can


def check_capability(name: str, capability: str, setting: str) -> None:
    """Refuse (UserError) `setting`, which needs `capability`, with the engine called `name` where it lacks it."""
    if capable(name, capability):
        return
    able = [n for n, kind in ENGINES.items() if capability in kind.can]
    raise UserError(
        f"{setting} needs a rollout engine that {CAPABILITIES[capability]}; rollout.engine={name} does "
        f"not (use rollout.engine={' or '.join(able)})"
    )


def make_engine(name: str, model_dir, *, dtype, device, seed: int = 0, **kwargs) -> RolloutEngine:
    """Build a rollout engine by name (`ENGINES`)."""
    return choose("rollout engine", ENGINES, name).build(model_dir, dtype=dtype, device=device, seed=seed, **kwargs)
