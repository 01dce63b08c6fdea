"""Rollout engines: the sampler side of RL fine-tuning. Token ids in, token ids out."""

from unison.rollout.base import RolloutEngine, Rollouts, SamplingParams

__all__ = ["RolloutEngine", "Rollouts", "SamplingParams", "make_engine"]


def make_engine(name: str, model_dir, *, dtype, device, seed: int = 0, **kwargs) -> RolloutEngine:
    """Build a rollout engine by name: `native` (ours, on the Hugging Face weights) or `vllm`."""
    from unison.errors import choose

    def _native():
        from unison.rollout.native import NativeEngine

        return NativeEngine.from_pretrained(model_dir, dtype=dtype, device=device, seed=seed, **kwargs)

    def _vllm():
        from unison.rollout.vllm import VLLMEngine

        return VLLMEngine.from_pretrained(model_dir, dtype=dtype, device=device, seed=seed, **kwargs)

    return choose("rollout engine", {"native": _native, "vllm": _vllm}, name)()
