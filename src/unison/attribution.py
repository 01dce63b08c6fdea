"""Which part of the model makes the mismatch: one component at a time computed in fp32 in both engines.

`unison probe --attribute` repeats the probe of each fp16/bf16 setting with the Hugging Face modules of one
component run in fp32 in the rollout engine and in the learner alike (`upcast`), then with all of them:

    lm_head    the output projection (`precision.upcast_lm_head`: fp32 weights, fp32 logits)
    attention  each layer's attention block (its projections, its q/k norms, the attention itself)
    mlp        each layer's MLP
    norms      the RMS/layer norms around the blocks and the final norm
    residual   the residual stream: the embeddings' output and every block's output added in fp32

A component "in fp32" takes its inputs upcast, computes with its weights upcast (the rollout dtype's values, so both
engines still hold the same weights) and hands its output on: to the residual stream's dtype for blocks, to the next
block's dtype for norms. Both engines run the model's own modules, so the engine decodes on its fallback path
(the model's forward with a cache) in every run of the attribution, the baseline included. The share a component
removes is 1 - (mismatch with it in fp32) / (baseline mismatch); each run samples its own responses, so shares
carry the sampling noise of the probe's batch.
"""

from __future__ import annotations

import torch

from unison.errors import UserError
from unison.precision import cast_module, upcast_lm_head

COMPONENTS = ("lm_head", "attention", "mlp", "norms", "residual")


def _cast(x, dtype: torch.dtype):
    """Floating tensors in x (a tensor, or tuples, lists and dicts of them) cast to dtype; anything else as it is."""
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
        return type(x)(*(_cast(v, dtype) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    return x


def run_in(module: torch.nn.Module, compute: torch.dtype, out: torch.dtype | None = None) -> None:
    """Run `module` in `compute`: its parameters cast (rotary frequencies stay fp32), its floating inputs cast on
    the way in, and its floating outputs cast to `out` on the way out (None: left as computed)."""

    cast_module(module, compute)
    module.register_forward_pre_hook(
        lambda m, args, kwargs: (_cast(args, compute), _cast(kwargs, compute)), with_kwargs=True
    )
    if out is not None:
        module.register_forward_hook(lambda m, args, output: _cast(output, out))


def _norms(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The norms of a decoder layer outside its attention and MLP blocks."""
    inner = {id(m) for block in (layer.self_attn, layer.mlp) for m in block.modules()}
    return [
        m
        for m in layer.modules()
        if id(m) not in inner and m is not layer and type(m).__name__.endswith(("RMSNorm", "LayerNorm"))
    ]


def check_supported(model) -> None:
    """Refuse (UserError) a model whose components `upcast` cannot find."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(la, "self_attn") and hasattr(la, "mlp") for la in layers):
        raise UserError(
            f"--attribute needs decoder layers with self_attn and mlp blocks; {type(model).__name__} has none"
        )
    if getattr(inner, "norm", None) is None or getattr(inner, "embed_tokens", None) is None:
        raise UserError(f"--attribute needs the model's embed_tokens and final norm; {type(model).__name__} lacks one")


def upcast(model: torch.nn.Module, dtype: torch.dtype, components) -> None:
    """Compute `components` (of `COMPONENTS`) of a model held in `dtype` in fp32, in place (see the module
    docstring). With none, nothing changes."""
    components = set(components)
    unknown = components - set(COMPONENTS)
    if unknown:
        raise UserError(f"unknown component {sorted(unknown)[0]!r}; choose from {', '.join(COMPONENTS)}")
    if not components:
        return
    check_supported(model)
    fp32 = torch.float32
    residual = fp32 if "residual" in components else dtype
    inner = model.model
    if "lm_head" in components:
        upcast_lm_head(model, dtype)
    else:
        run_in(model.get_output_embeddings(), dtype)  # its input in the model's dtype, whatever the final norm gave
    inner.embed_tokens.register_forward_hook(lambda m, args, output: output.to(residual))
    for layer in inner.layers:
        run_in(layer.self_attn, fp32 if "attention" in components else dtype, residual)
        run_in(layer.mlp, fp32 if "mlp" in components else dtype, residual)
        for norm in _norms(layer):
            run_in(norm, fp32 if "norms" in components else dtype)
    run_in(inner.norm, fp32 if "norms" in components else dtype)
