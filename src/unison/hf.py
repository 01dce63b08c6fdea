"""What unison asks of a Hugging Face causal LM, in one place, across the transformers versions it runs with.

    logits_at       the model's own logits (its LM head and every transform it applies after it: Gemma's final
                    softcap, Cohere's logit scale, Granite's logit divisor, ...) at chosen positions of each row
    cache_kwarg     the name under which the model's forward takes a key/value cache (`cache` from transformers
                    5.2x, `past_key_values` before)
    output_cache    the cache a forward returned, under either name

The learner computes every log-prob through `logits_at`, so that whatever the model does to its logits, the learner
does too; the native engine's fallback decodes with the model's own forward for the same reason.
"""

from __future__ import annotations

import inspect

import torch


def _forward_params(model) -> set[str]:
    return set(inspect.signature(type(model).forward).parameters)


def takes_logits_to_keep(model) -> bool:
    """Whether the model's forward can compute logits at some positions only (`logits_to_keep`)."""
    return "logits_to_keep" in _forward_params(model)


def cache_kwarg(model) -> str:
    """`cache` where the model's forward names its key/value cache so, else `past_key_values`."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def output_cache(out):
    """The key/value cache a forward returned (`cache` or `past_key_values`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class LogitsAt:
    """The model's own logits at given positions of each row: `model(..., logits_to_keep=...)`, so the LM head and
    the model's logit transforms run on those positions only.

    Recent transformers take one row of positions per batch row ([B, T] integers); older ones, and models whose
    forward slices with one position list for the whole batch, take a 1-D list: there the span from the first to the
    last position wanted is kept and each row's positions are gathered from it. A model without `logits_to_keep`
    computes every position's logits. Which of the three applies is found once, with a forward of two short rows.
    """

    def __init__(self, model):
        self.model = model
        self.mode = self._probe(model) if takes_logits_to_keep(model) else "all"

    @staticmethod
    @torch.no_grad()
    def _probe(model) -> str:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            ids = torch.zeros((2, 3), dtype=torch.long, device=device)
            keep = torch.tensor([[0], [2]], device=device)
            out = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        except (IndexError, RuntimeError, TypeError, ValueError):
            return "span"
        finally:
            model.train(was_training)
        return "rows" if out.dim() == 3 and out.shape[:2] == (2, 1) else "span"

    def __call__(self, positions: torch.Tensor, **inputs) -> torch.Tensor:
        """Logits [B, T, V] at positions [B, T] (long) of each row; `inputs` go to the model's forward."""
        if self.mode == "rows":
            return self.model(**inputs, use_cache=False, logits_to_keep=positions).logits
        if self.mode == "all":
            logits = self.model(**inputs, use_cache=False).logits
            lo = 0
        else:
            lo, hi = int(positions.min()), int(positions.max()) + 1
            span = torch.arange(lo, hi, device=positions.device)
            logits = self.model(**inputs, use_cache=False, logits_to_keep=span).logits  # [B, hi - lo, V]
        return TakePositions.apply(logits, (positions - lo)[..., None])


class TakePositions(torch.autograd.Function):
    """`logits.gather(1, index.expand(..., V))` whose backward pass keeps the index [B, T, 1] and the shape, not the
    logits [B, S, V] it took from: the gradient is scattered into zeros there, as autograd's own gather backward
    does (the same sums), so a forward keeps one [B, T, V] tensor.

    logits [B, S, V], index [B, T, 1] (long) -> [B, T, V]"""

    @staticmethod
    def forward(ctx, logits, index):
        ctx.save_for_backward(index)
        ctx.shape = logits.shape
        return logits.gather(1, index.expand(-1, -1, logits.shape[-1]))

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).scatter_add_(1, index.expand(-1, -1, grad.shape[-1]), grad), None
