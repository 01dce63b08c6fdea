"""What unison needs to know about a model's architecture, read from its transformers config or its modules, in one
place for the engines, the learner and the set-up.

    rope_types         the rotary variants (whose angles may change with the sequence length)
    layer_windows      each decoder layer's attention window
    fast_path_blocker  why the native engine's fast path would not compute what the model computes ('' where it does)
    shares_prompts     whether the learner can run a prompt once for the responses sampled from it
    decoder_parts      the decoder layers and final norm of a Llama-family model (where activations are checked)
"""

from __future__ import annotations

import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

# families the native engine's fast path decodes (Llama-family attention and gated MLP, and their MoE variants)
FAST_PATH_TYPES = {"qwen2", "qwen3", "llama", "mistral", "qwen2_moe", "qwen3_moe", "mixtral"}
# rotary variants whose angles depend on the position alone (a table built once is exact); `dynamic` and `longrope`
# change every angle with the length of the sequence
FAST_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}
LENGTH_DEPENDENT_ROPE_TYPES = {"dynamic", "longrope"}
# config fields of a transform the model applies to its logits or attention scores, which the fast path does not
LOGIT_TRANSFORMS = ("final_logit_softcapping", "attn_logit_softcapping", "logit_scale", "logits_scaling")
# families whose prompts the learner can run once per micro-batch (`unison.batching.SharedPrompts`): full causal
# attention over a DynamicCache that transformers can extend
SHARED_PROMPT_TYPES = {"qwen2", "qwen3", "llama"}


def rope_types(config) -> set[str]:
    """The model's rotary variants (`default` where the config names none): one, or one per layer type where the
    config keys its rotary settings by layer type (Gemma3's sliding and full layers)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return {"default"}
    nested = [v for v in params.values() if isinstance(v, dict)]
    return {str(p.get("rope_type") or p.get("type") or "default") for p in (nested or [params])}


def layer_windows(config) -> list[int | None]:
    """Each decoder layer's attention window in tokens (None: the whole sequence): from `layer_types` where the
    config lists them (Qwen2/Qwen3 derive them from `use_sliding_window` and `max_window_layers`), else every layer's
    `sliding_window` (Mistral)."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or None
    types = getattr(config, "layer_types", None)
    if window is None:
        return [None] * n
    if types is not None:
        return [int(window) if t == "sliding_attention" else None for t in types]
    if config.model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
        return [None] * n
    return [int(window)] * n


def fast_path_blocker(config) -> str:
    """Why the fast path would not compute exactly what the model computes, or '' where it does."""
    kind = config.model_type
    if kind not in FAST_PATH_TYPES:
        return f"{kind} is not a fast-path family (Qwen2, Qwen3, Llama, Mistral, Qwen2-MoE, Qwen3-MoE, Mixtral)"
    other = sorted(rope_types(config) - FAST_ROPE_TYPES)
    if other:
        return f"rotary type {other[0]!r}, whose angles change with the sequence length"
    for key in LOGIT_TRANSFORMS:
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"{key} {getattr(config, key)}"
    return ""


def shares_prompts(config) -> bool:
    """Whether the learner's forward can run each distinct prompt once and the responses on its keys and values:
    plain causal attention (no sliding window) in a family whose cache transformers extends."""
    return config is not None and config.model_type in SHARED_PROMPT_TYPES and not any(layer_windows(config))


def decoder_parts(model) -> tuple[torch.nn.Module, list, torch.nn.Module] | None:
    """(inner model, decoder layers, final norm) of a Llama-family causal LM, or None for other architectures."""
    inner = getattr(model, "model", None) or getattr(model, "base_model", None)
    layers = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    if layers is None or norm is None or not len(layers):
        return None
    need = ("input_layernorm", "post_attention_layernorm", "mlp")
    if not all(hasattr(layer, n) for layer in layers for n in need):
        return None
    return inner, list(layers), norm


def causal_lm_class(config):
    """The transformers class that `AutoModelForCausalLM` builds for `config` (None where it has none)."""
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
