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

# Published models' shapes, random, for the memory benchmarks (not in NAMES: too large for the timing loops)
SHAPES = {
    "qwen2-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151_936,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
    ),
    "qwen2-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151_936,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
    ),
}


def build(name: str, **overrides):
    """The built-in model (fp32), or random Qwen2 `name` (seed 0) with config `overrides`."""
    from unison.models import load_model, random_model, resolve_model_dir

    if name == "builtin":
        return load_model(resolve_model_dir("builtin"), device="cpu", dtype=torch.float32)
    return random_model(seed=0, **{**MODELS[name], **overrides})


def save_shape(name: str, out: str, tokenizer: str = "smollm2-135m-instruct") -> None:
    """Random Qwen2 of shape `name` (SHAPES, seed 0) saved as a checkpoint folder with `tokenizer`'s tokenizer (a
    fetched model's name or a folder; its ids lie within the shape's vocabulary)."""
    from transformers import AutoTokenizer

    from unison.models import random_model, resolve_model_dir, save_model

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(tokenizer))
    if len(tok) > SHAPES[name]["vocab_size"]:
        raise SystemExit(f"the tokenizer has {len(tok)} tokens, more than {name}'s vocabulary")
    model = random_model(seed=0, **SHAPES[name])
    for c in (model.config, model.generation_config):
        c.eos_token_id, c.pad_token_id = tok.eos_token_id, tok.pad_token_id or tok.eos_token_id
    save_model(model, tok, out)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {out}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Save a random checkpoint of a published model's shape.")
    ap.add_argument("name", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct")
    a = ap.parse_args()
    save_shape(a.name, a.out, a.tokenizer)
