"""Exact mode (`precision.exact`): the rollout engine and the learner compute every sampled token's log-prob with
the same bits.

An engine's decode and a learner's full-sequence forward differ in shape, not in arithmetic: the decode multiplies
a few rows at a time against a growing cache of keys, the learner whole rows of every length at once, and a
kernel's reduction order (and so its rounding) can change with the number of rows, the number of keys or the
threads that split them. Exact mode removes every such dependence from the model's forward, in both engines:

    products        each runs on blocks of exactly ROWS rows (the last padded with zeros): every row is multiplied
                    by the same kernel with the same split, whatever the batch (`blocked_linear`, which
                    `torch.nn.functional.linear` becomes inside an exact model's forward, so the linear layers, MoE
                    experts and routers all take it)
    attention       scores as an elementwise product summed over the head dimension, the softmax's sum and the
                    weighted sum of values over the keys in chunks of KEYS keys added one after the other, the
                    keys of a row at their positions (a row padded on the left is moved to start at index 0 first,
                    `left_padding`): a query sees the same chunks in a decode step as in the full forward,
                    whatever the number of keys behind it or the rows beside it (`exact_attention`, registered
                    with transformers' attention interface as "unison_exact")
    log-softmax     over the vocabulary with the sum taken in chunks of VOCAB_CHUNK (`log_softmax`), in the
                    sampler's distribution and the learner's log-probs alike

Everything else in a transformers forward is elementwise or reduces within a row (norms, rotary, activations).
The rollout engine decodes with the model's own forward and a cache (its fallback path), every row of the batch
at once, each prompt padded on the left to the longest and realigned inside the attention; the learner runs its
rows unshared (no prompt run once for several rows). What this costs is in docs/exact.md.
"""

from __future__ import annotations

import functools
import threading
import types

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from unison.hf import cache_kwarg, output_cache
from unison.matmul import backward_input, backward_weight, gemm_kernel, onednn_linear

ROWS = 32  # rows of every matrix product
KEYS = 64  # keys per chunk of the attention's sums
VOCAB_CHUNK = 4096  # vocabulary entries per chunk of the log-softmax's sum
ATTENTION = "unison_exact"


def chunked_sum(x: torch.Tensor, dim: int, chunk: int) -> torch.Tensor:
    """The sum over `dim` taken in chunks of `chunk` entries (the last padded with zeros), added left to right: the
    same bits for a prefix of `dim` followed by zeros whatever their number."""
    n = x.shape[dim]
    total = None
    for start in range(0, n, chunk):
        part = x.narrow(dim, start, min(chunk, n - start))
        if part.shape[dim] < chunk:
            shape = list(part.shape)
            shape[dim] = chunk - part.shape[dim]
            part = torch.cat((part, part.new_zeros(shape)), dim)
        s = part.sum(dim)
        total = s if total is None else total + s
    return total


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dimension in fp32, its sum taken in chunks (`chunked_sum`). [..., V] -> [..., V]"""
    x = logits.float()
    top = x.amax(-1, keepdim=True)
    shifted = x - top
    return shifted - torch.log(chunked_sum(torch.exp(shifted), -1, VOCAB_CHUNK))[..., None]


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension in fp32, from `log_softmax`."""
    return log_softmax(logits).exp()


_linear = F.linear  # PyTorch's own, which the blocked one calls
_active = threading.local()  # whether the current thread is inside an exact model's forward


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + b on blocks of exactly ROWS rows (the last padded with zeros); with gradient, the backward pass
    is PyTorch's linear backward over all the rows at once (`_BlockedLinear`). [..., in] -> [..., out]"""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _BlockedLinear.apply(x, weight, bias)
    return _blocked(x, weight, bias)


class _BlockedLinear(torch.autograd.Function):
    """`_blocked` forward; the backward of an ordinary linear layer (grad @ W, grad.T @ x and the sum of grad, each
    one product over every row): only the forward's bits must not depend on the rows beside a row, so the gradient
    needs no blocks."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias = bias is not None
        return _blocked(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gemm = _gemm(g)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = backward_input(g, weight, gemm).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            gw = backward_weight(g, x.reshape(-1, x.shape[-1]), gemm, weight.dtype)
        if ctx.bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def _gemm(t: torch.Tensor) -> str:
    """The products' kernel for `t`'s dtype and device: oneDNN for fp32 on a CPU where it is the faster
    (`unison.matmul.gemm_kernel`), PyTorch's otherwise; the same in both engines."""
    fp32_cpu = t.dtype == torch.float32 and t.device.type == "cpu"
    return "onednn" if fp32_cpu and _cpu_gemm() == "onednn" else "torch"


@functools.cache
def _cpu_gemm() -> str:
    """`model.gemm=auto` on this machine's CPU, resolved once (every product of an exact forward asks)."""
    return gemm_kernel("auto", "cpu")


def _blocked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    if m % ROWS:
        rows = torch.cat((rows, rows.new_zeros(ROWS - m % ROWS, rows.shape[1])))
    product = _linear
    if _gemm(rows) == "onednn":
        product, weight = onednn_linear, weight.contiguous()
    out = torch.cat([product(block, weight, bias) for block in rows.split(ROWS)])[:m]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _dispatch_linear(x, weight, bias=None):
    """`torch.nn.functional.linear` once an exact model exists (`make_exact`): blocked inside an exact model's
    forward (every linear layer, and the products MoE experts and routers compute with the function itself),
    PyTorch's own elsewhere."""
    if getattr(_active, "depth", 0):
        return blocked_linear(x, weight, bias)
    return _linear(x, weight, bias)


ELEMENTS = 256  # an elementwise function's input is padded to a multiple of this many entries (`padded_elementwise`)
_sigmoid = F.sigmoid


def padded_elementwise(function, x: torch.Tensor) -> torch.Tensor:
    """`function` (elementwise) of x, its input padded to a multiple of ELEMENTS entries: PyTorch's CPU kernels
    compute the bulk of a tensor with vector instructions and its last entries with others, which may round
    otherwise (sigmoid, exp); padded, every entry takes the vector path, whatever the tensor's size."""
    flat = x.reshape(-1)
    n = flat.numel()
    if n % ELEMENTS:
        flat = torch.cat((flat, flat.new_zeros(ELEMENTS - n % ELEMENTS)))
    return function(flat)[:n].reshape(x.shape)


def _dispatch_sigmoid(x):
    """`torch.nn.functional.sigmoid`: padded (`padded_elementwise`) inside an exact model's forward (the gate of
    Qwen2-MoE's shared expert has one entry per token), PyTorch's own elsewhere."""
    return padded_elementwise(_sigmoid, x) if getattr(_active, "depth", 0) else _sigmoid(x)


def _route_functions() -> None:
    """`torch.nn.functional.linear` and `sigmoid` through the dispatchers above, from the first exact model on (a
    process without one calls PyTorch's own directly)."""
    F.linear, F.sigmoid = _dispatch_linear, _dispatch_sigmoid


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D (W held as [in, out]) as a blocked product."""
    return blocked_linear(x, self.weight.t(), self.bias)


_LEFT = threading.local()  # the left padding of each row of the forward running in this thread (`left_padding`)


class left_padding:
    """`with left_padding(pad):` the exact forwards run inside see row b's keys from index pad[b] on: the attention
    moves each row's keys, values and mask left by its padding (the padding to the end, masked), so that the key of
    position j sits at index j as in an unpadded forward. The engine's batched decode of prompts of several
    lengths runs so; the learner's rows, never padded on the left, run without it. pad [B] long."""

    def __init__(self, pad: torch.Tensor):
        self.pad = pad if bool(pad.any()) else None

    def __enter__(self):
        self.before, _LEFT.pad = getattr(_LEFT, "pad", None), self.pad

    def __exit__(self, *exc) -> None:
        _LEFT.pad = self.before


def _aligned(pad: torch.Tensor, key, value, mask):
    """key, value [B, Hkv, Lk, D] and the additive mask [B, 1, Lq, Lk] with each row rolled left by pad[b] along
    the keys."""
    Lk = key.shape[2]
    index = (torch.arange(Lk, device=key.device)[None, :] + pad.to(key.device)[:, None]) % Lk  # [B, Lk]
    kv_index = index[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
    key, value = key.gather(2, kv_index), value.gather(2, kv_index)
    if mask is not None:
        mask = mask[..., :Lk].expand(key.shape[0], -1, -1, -1)
        mask = mask.gather(3, index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
    return key, value, mask


def padded_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """x [N, M, K] with zero rows added to make M a multiple of `multiple`."""
    pad = -x.shape[1] % multiple
    return torch.cat((x, x.new_zeros(x.shape[0], pad, x.shape[2])), 1) if pad else x


def exact_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Attention with one fixed reduction layout. query [B, H, Lq, D], key and value [B, Hkv, Lk, D] (the keys of
    each row at index = position), attention_mask additive [B, 1, Lq, Lk] (causal, windows) or None. Scores and
    the weighted values are batched products over chunks of KEYS keys (the query rows padded to a multiple of
    ROWS), the chunks' products added one after the other; in fp32, rounded to the query's dtype.
    -> ([B, Lq, H, D], None)"""
    pad = getattr(_LEFT, "pad", None)
    if pad is not None:
        key, value, attention_mask = _aligned(pad, key, value, attention_mask)
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    rows = H // Hkv * Lq  # the query rows of the heads that share a key/value head
    q = padded_rows(query.float().reshape(B * Hkv, rows, D), ROWS)
    keys = padded_rows(key.float().reshape(B * Hkv, Lk, D), KEYS)
    values = padded_rows(value.float().reshape(B * Hkv, Lk, D), KEYS)
    scores = torch.cat([torch.bmm(q, part.transpose(1, 2)) for part in keys.split(KEYS, 1)], 2)[:, :rows]
    scores = scores * (D**-0.5 if scaling is None else scaling)  # [B * Hkv, rows, Lk padded]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + _additive(attention_mask, B, Hkv, H // Hkv, Lq, Lk, scores.shape[2])
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - top.masked_fill(top == float("-inf"), 0.0))  # a query seeing no key: weights 0
    total = chunked_sum(weights, -1, KEYS)[..., None]
    weights = padded_rows(weights / total.masked_fill(total == 0, 1.0), ROWS)  # (and output 0, not NaN)
    out = None
    for w, v in zip(weights.split(KEYS, 2), values.split(KEYS, 1)):
        part = torch.bmm(w, v)
        out = part if out is None else out + part
    out = out[:, :rows].reshape(B, H, Lq, D)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _additive(mask, B: int, Hkv: int, groups: int, Lq: int, Lk: int, width: int) -> torch.Tensor:
    """The attention mask as fp32 additions [B * Hkv, groups * Lq, width]: 0 where a query sees a key, -inf where
    not, and -inf on the padded keys beyond Lk."""
    out = torch.zeros(B, 1, Lq, width, device=mask.device if mask is not None else None)
    out[..., Lk:] = float("-inf")
    if mask is not None:
        m = mask[:, :, :, :Lk]
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))
        out[..., :Lk] = m.float()
    return out.expand(B, Hkv, Lq, width).repeat_interleave(groups, 1).reshape(B * Hkv, groups * Lq, width)


AttentionInterface.register(ATTENTION, exact_attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)


def make_exact(model: torch.nn.Module) -> torch.nn.Module:
    """Compute `model` in exact mode: every product of its forward as `blocked_linear` (its linear layers keep
    their own dtype handling: fp32-accumulate, an fp32 LM head), its attention as `exact_attention`."""
    if getattr(model, "_unison_exact", False):
        return model
    _route_functions()
    for module in model.modules():
        if type(module).__name__ == "Conv1D":
            module.forward = types.MethodType(_conv1d_forward, module)
    for config in {id(c): c for c in _configs(model)}.values():
        config._attn_implementation = ATTENTION
        if getattr(config, "_experts_implementation", None) is not None:
            config._experts_implementation = "eager"  # a loop over the experts, each product a linear layer's
    model.register_forward_pre_hook(_enter)
    model.register_forward_hook(_leave, always_call=True)
    model._unison_exact = True
    return model


def _enter(module, args):
    _active.depth = getattr(_active, "depth", 0) + 1


def _leave(module, args, output):
    _active.depth -= 1


def _configs(model: torch.nn.Module):
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            yield config


class BitwiseMismatchError(RuntimeError):
    """precision.bitwise: a sampled token's log-prob differs between the rollout engine and the learner."""


def first_divergence(engine_model, learner_model, prompt: list[int], response: list[int], position: int) -> str:
    """The first module (in the model's order) whose output at response token `position` differs between the
    engine's way (the prompt, then one token at a time with a cache) and the learner's (one full forward), each on
    this row alone; '' where none does (then the batch around the row made the difference)."""
    seen = {}
    for name, model in (("engine", engine_model), ("learner", learner_model)):
        with _recording(model) as outputs:
            with torch.no_grad():
                if name == "engine":
                    _decode_to(model, prompt, response, position)
                else:
                    model(input_ids=torch.tensor([prompt + response[:position]], device=_device(model)))
        seen[name] = outputs
    for module, out in seen["learner"].items():
        other = seen["engine"].get(module)
        if other is not None and other.shape == out.shape and not torch.equal(other, out):
            return module
    return ""


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _decode_to(model, prompt: list[int], response: list[int], position: int) -> None:
    """The prompt, then response tokens 0..position-1 one at a time, with a cache of every key."""
    device, kw = _device(model), cache_kwarg(model)
    cache = output_cache(model(input_ids=torch.tensor([prompt], device=device), use_cache=True, **{kw: DynamicCache()}))
    for t in range(position):
        ids = torch.tensor([[response[t]]], device=device)
        pos = torch.tensor([[len(prompt) + t]], device=device)
        cache = output_cache(model(input_ids=ids, use_cache=True, position_ids=pos, **{kw: cache}))


class _recording:
    """Within: every module's output at the last position of each forward, by name (the last forward's)."""

    def __init__(self, model):
        self.model, self.outputs, self.handles = model, {}, []

    def __enter__(self) -> dict:
        for name, module in self.model.named_modules():
            if name:
                self.handles.append(module.register_forward_hook(self._hook(name)))
        return self.outputs

    def _hook(self, name: str):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(out) and out.dim() == 3 and out.is_floating_point():
                self.outputs[name] = out[:, -1].detach().clone()

        return hook

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
