"""The models the benchmarks measure: the built-in one, and random Qwen2s of the built-in tokenizer's vocabulary."""

from __future__ import annotations

import torch

MODELS = {
    "3m": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ),
    "30m": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4
    ),
    "120m": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4
    ),
}
NAMES = ["builtin", *MODELS]


def build(name: str, **overrides):
    """The built-in model (fp32), or random Qwen2 `name` (seed 0) with config `overrides`."""
    from unison.models import load_model, random_model, resolve_model_dir

    if name == "builtin":
        return load_model(resolve_model_dir("builtin"), device="cpu", dtype=torch.float32)
    return random_model(seed=0, **{**MODELS[name], **overrides})
