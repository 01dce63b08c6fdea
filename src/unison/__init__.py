"""unison: RL fine-tuning of LLMs in which the sampler and the learner agree."""

__version__ = "0.1.0"
