"""Tiny random-initialised checkpoints of each causal-LM architecture family, built locally for tests and benchmarks.

Each entry of `ARCHS` builds a small Hugging Face config (2 or 3 layers, hidden size 64, the built-in tokenizer's
272-token vocabulary) that keeps what its family does differently: biases, q/k norms, tied or untied embeddings,
scaled or partial RoPE, sliding windows, logit soft-capping and scaling, mixtures of experts, default dropout.
The weights are drawn wider than the usual init so that next-token distributions are well away from uniform and a
missed logit transform or window shows in the log-probs. `save_tiny` writes one, with the built-in tokenizer, as a
checkpoint directory that every loader reads like a downloaded model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config

from unison.errors import choose
from unison.models import VOCAB_SIZE, build_tokenizer, save_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig

WINDOW = 8  # sliding window, in tokens: sequences longer than this see it
TOKENS = dict(vocab_size=VOCAB_SIZE, pad_token_id=0, eos_token_id=1, bos_token_id=None)
SIZE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=256,
    # mean max next-token probability about 0.04 (10x uniform), entropy about 5.1 (uniform: 5.6): sharper weights
    # raise fp32's own rounding of the log-probs (measured against fp64) towards the 1e-6 the conformance test allows
    initializer_range=0.125,
)
GQA = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[])
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


def _family(class_name: str, **fields) -> Callable[..., PretrainedConfig]:
    """A builder of `transformers.<class_name>`: the shared vocabulary and size, then `fields`, then overrides."""

    def build(**overrides) -> PretrainedConfig:

        return getattr(transformers, class_name)(**{**TOKENS, **SIZE, **fields, **overrides})

    build.__name__ = build.__qualname__ = class_name
    return build


def _gpt2(**overrides) -> PretrainedConfig:
    """GPT-2, whose config names its sizes differently; its default dropout (0.1) is kept."""

    fields = dict(TOKENS, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=256, initializer_range=0.125)
    return GPT2Config(**{**fields, **overrides})


ARCHS: dict[str, Callable[..., PretrainedConfig]] = {
    "qwen2": _family("Qwen2Config", **GQA, tie_word_embeddings=True),
    # layers from `max_window_layers` on use the window
    "qwen2-window": _family(
        "Qwen2Config",
        **GQA,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
    ),
    "qwen3": _family("Qwen3Config", **GQA, tie_word_embeddings=True),
    "llama": _family("LlamaConfig", **GQA, tie_word_embeddings=True),
    "llama-untied": _family("LlamaConfig", **GQA, tie_word_embeddings=False),
    "llama3-rope": _family("LlamaConfig", **GQA, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "mistral-window": _family("MistralConfig", **GQA, sliding_window=WINDOW),
    # sliding, full, sliding; attention soft-capping at its default (50), the final one low enough to bend these logits
    "gemma2": _family(
        "Gemma2Config",
        **GQA,
        num_hidden_layers=3,
        sliding_window=WINDOW,
        query_pre_attn_scalar=16,
        final_logit_softcapping=3.0,
        initializer_range=0.085,
    ),
    "gemma3": _family(
        "Gemma3TextConfig",
        **GQA,
        num_hidden_layers=3,
        sliding_window=WINDOW,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=2.0,
        initializer_range=0.1,
    ),
    "phi3": _family("Phi3Config", **GQA, original_max_position_embeddings=256),
    "olmo2": _family("Olmo2Config", **GQA),
    "gpt-neox": _family(
        "GPTNeoXConfig",
        num_attention_heads=4,
        use_parallel_residual=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
    ),
    "gpt2": _gpt2,
    "cohere": _family("CohereConfig", **GQA, logit_scale=0.5, initializer_range=0.25),
    "granite": _family(
        "GraniteConfig",
        **GQA,
        logits_scaling=2.0,
        embedding_multiplier=4.0,
        residual_multiplier=0.5,
        attention_multiplier=1 / 16,
        initializer_range=0.25,
    ),
    "qwen2-moe": _family("Qwen2MoeConfig", **GQA, **MOE, shared_expert_intermediate_size=128),
    "qwen3-moe": _family("Qwen3MoeConfig", **GQA, **MOE),
    "mixtral": _family("MixtralConfig", **GQA, num_local_experts=4, num_experts_per_tok=2),
}


def tiny_config(name: str, **overrides) -> PretrainedConfig:
    """The tiny config of architecture `name` (a key of `ARCHS`), with `overrides` replacing its fields."""
    return choose("architecture", ARCHS, name)(**overrides)


def tiny_model(name: str, seed: int = 0, **overrides):
    """A random-initialised fp32 causal LM of architecture `name`, seeded by `seed`, in eval mode."""

    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_tiny(name: str, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Save `tiny_model(name, seed, **overrides)` and the built-in tokenizer as a checkpoint directory."""
    return save_model(tiny_model(name, seed, **overrides), build_tokenizer(), out_dir)
