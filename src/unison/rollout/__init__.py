"""Rollout engines: the sampler side of RL fine-tuning. Token ids in, token ids out."""

from unison.rollout.base import RolloutEngine, Rollouts, SamplingParams

__all__ = ["ENGINES", "RolloutEngine", "Rollouts", "SamplingParams", "make_engine"]


def _native(model_dir, **kwargs):
    from unison.rollout.native import NativeEngine

    return NativeEngine.from_pretrained(model_dir, **kwargs)


def _vllm(model_dir, **kwargs):
    from unison.rollout.vllm import VLLMEngine

    return VLLMEngine.from_pretrained(model_dir, **kwargs)


# the rollout engines by name: `native` (ours, on the Hugging Face weights) and `vllm`
ENGINES = {"native": _native, "vllm": _vllm}


def make_engine(name: str, model_dir, *, dtype, device, seed: int = 0, **kwargs) -> RolloutEngine:
    """Build a rollout engine by name (`ENGINES`)."""
    from unison.errors import choose

    return choose("rollout engine", ENGINES, name)(model_dir, dtype=dtype, device=device, seed=seed, **kwargs)
