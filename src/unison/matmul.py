"""fp16/bf16 matrix products on machines without fast units for them: how a model's linear layers and attention
multiply (`model.matmul`).

    native            PyTorch's own fp16/bf16 kernels (GPUs; CPUs with the instructions for that dtype)
    fp32-accumulate   the fp16/bf16 operands multiplied in fp32 and the product rounded back, as a GPU tensor core
                      does: the default where PyTorch would emulate the dtype's products element by element, 10 to
                      50 times slower than fp32 (CPUs with AVX2 only; fp16 on CPUs with AVX-512 BF16 but no FP16)
    auto              native where it is fast for the dtype, else fp32-accumulate

Weights and activations stay in the chosen dtype either way; only where the products accumulate changes.

Which library multiplies the fp32 products on a CPU (`model.gemm`), those of fp32 models and of fp32-accumulate:

    torch             PyTorch's own (its BLAS, MKL)
    onednn            oneDNN (`torch.ops.mkldnn._linear_pointwise`): the default on CPUs with AVX-512 not made by
                      Intel (AMD Zen 4 and 5), where MKL runs its AVX2 kernels and oneDNN its AVX-512 ones, about
                      twice as fast. Linear layers only; attention keeps PyTorch's kernels.
    auto              onednn where it is the faster, else torch

Both are deterministic and give the same bits for any thread count; they round differently from each other (the
order of the sums differs), as two engines' kernels do.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from unison.errors import UserError

# the CPU flags under which PyTorch multiplies each 16-bit dtype with its own instructions
FAST_CPU_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


@functools.cache
def native_low_precision_matmul(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the device multiplies `dtype` (fp16 or bf16) matrices in hardware at least as fast as fp32.

    GPUs do. A CPU does where it has the instructions for that dtype (`FAST_CPU_FLAGS`): AMX or AVX-512 BF16 for
    bf16, AMX-FP16 or AVX-512 FP16 for fp16. Elsewhere PyTorch emulates the products element by element, 10 to 50
    times slower than fp32: on an AVX2-only CPU for both, and on one with AVX-512 BF16 but no FP16 instructions (AMD
    Zen 4 and 5) for fp16.
    """
    return device_type != "cpu" or cpu_has_instructions_for(dtype, cpu_flags())


def cpu_has_instructions_for(dtype: torch.dtype, flags: set[str]) -> bool:
    """Whether a CPU with these /proc/cpuinfo `flags` multiplies `dtype` with its own instructions."""
    return any(f in flags for f in FAST_CPU_FLAGS.get(dtype, ()))


@functools.cache
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


GEMMS = ("auto", "torch", "onednn")


@functools.cache
def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def onednn_is_faster(vendor: str, flags: set[str]) -> bool:
    """Whether oneDNN multiplies fp32 matrices faster than MKL on a CPU of this vendor and these flags: one with
    AVX-512 that MKL does not give its AVX-512 kernels (a CPU not made by Intel)."""
    return "avx512f" in flags and vendor != "GenuineIntel"


def gemm_kernel(requested: str, device: torch.device | str) -> str:
    """Resolve `model.gemm`: `auto` to `onednn` on a CPU where oneDNN is the faster (`onednn_is_faster`), else
    `torch`; anything but a CPU multiplies with PyTorch's kernels."""
    if requested not in GEMMS:
        raise UserError(f"unknown gemm kernel {requested!r}; choose one of: {', '.join(GEMMS)}")
    cpu = torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
    if requested == "onednn" and not cpu:
        raise UserError("model.gemm=onednn needs a CPU with PyTorch's oneDNN (mkldnn); use model.gemm=auto")
    if requested != "auto":
        return requested
    return "onednn" if cpu and onednn_is_faster(cpu_vendor(), cpu_flags()) else "torch"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN, fp32 (no autograd). x [..., in], weight [out, in] (or oneDNN's packed form,
    `pack_weight`) -> [..., out]"""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


def onednn_linear_add(x: torch.Tensor, weight: torch.Tensor, bias, other: torch.Tensor) -> torch.Tensor:
    """`onednn_linear(x, weight, bias) + other`, the sum made in the product's fp32 accumulator."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, "add")


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """An fp32 weight [out, in] in oneDNN's own layout for products of about `rows` rows (`onednn_linear`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _product(x: torch.Tensor, weight: torch.Tensor, bias, gemm: str) -> torch.Tensor:
    if gemm == "onednn":  # oneDNN reads a strided operand (a slice of a batch) far slower than a contiguous copy
        return onednn_linear(x.contiguous(), weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


class Fp32Linear(torch.autograd.Function):
    """x @ W.T + b with the product computed in fp32 by `gemm` (torch or onednn) and rounded to x's dtype: an fp32
    linear layer, or a fp16/bf16 one in fp32-accumulate mode. The operands are kept for the backward pass in their
    own dtype (a 16-bit weight is not kept as an fp32 copy) and upcast there again; the gradients are computed in
    fp32 and rounded to each operand's dtype, as autograd does through the upcasts.

    x [..., in], weight [out, in], bias [out] or None -> [..., out]"""

    @staticmethod
    def forward(ctx, x, weight, bias, gemm: str):
        ctx.save_for_backward(x, weight)
        ctx.gemm, ctx.bias_dtype = gemm, None if bias is None else bias.dtype
        b = None if bias is None else bias.float()
        return _product(x.float(), weight.float(), b, gemm).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if ctx.gemm == "onednn" and weight.dtype != torch.float32:
            return _backward_by_rows(ctx, grad, x, weight) + (None,)
        g = grad.float().reshape(-1, grad.shape[-1])  # [N, out]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = backward_input(g, weight.float(), ctx.gemm).view(*grad.shape[:-1], -1).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = backward_weight(g, x.float().reshape(-1, x.shape[-1]), ctx.gemm, weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = g.sum(0).to(ctx.bias_dtype)
        return gx, gw, gb, None


def _backward_by_rows(ctx, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple:
    """`Fp32Linear.backward` with oneDNN for a 16-bit weight, a chunk of the weight's output rows at a time (about
    GRAD_CHUNK_VALUES of the weight each, whatever the number of rows N: one chunk for most layers, several for an
    LM head over a 50-150K vocabulary): the fp32 upcasts of the incoming gradient [N, out] and of the weight exist
    for one chunk only. The input's gradient sums the chunks' products in fp32 (the products' own fp32
    accumulators, in chunk order); each weight row's gradient is one chunk's product, as unchunked.
    -> (gx, gw, gb) in the operands' dtypes (None where no gradient is asked)"""
    g16, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # [N, out], [N, in]
    want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    want_b = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    xf = x2.float().contiguous() if want_w else None
    gx = None
    gw = torch.empty_like(weight) if want_w else None
    gb = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device) if want_b else None
    rows = max(1, GRAD_CHUNK_VALUES // weight.shape[1])
    for r in range(0, weight.shape[0], rows):
        g = g16[:, r : r + rows].float()  # [N, rows], contiguous
        if want_x:
            w = weight[r : r + rows].float()  # [rows, in]
            gx = onednn_linear(g, w.t()) if gx is None else onednn_linear_add(g, w.t(), None, gx)
        if want_w:
            gw[r : r + rows] = onednn_linear(g.t(), xf.t())
        if want_b:
            gb[r : r + rows] = g.sum(0)
    if gx is not None:
        gx = gx.view(*grad.shape[:-1], -1).to(x.dtype)
    return gx, gw, None if gb is None else gb.to(ctx.bias_dtype)


def backward_input(g: torch.Tensor, weight: torch.Tensor, gemm: str) -> torch.Tensor:
    """g [N, out] @ W [out, in] -> [N, in]"""
    return onednn_linear(g.contiguous(), weight.t()) if gemm == "onednn" else g.mm(weight)


# the values of a 16-bit weight whose gradients oneDNN computes in fp32 at a time: about 32 MB of fp32
GRAD_CHUNK_VALUES = 2**23


def backward_weight(g: torch.Tensor, x: torch.Tensor, gemm: str, dtype: torch.dtype) -> torch.Tensor:
    """g.T [out, N] @ x [N, in] in fp32, rounded to `dtype` -> [out, in] (a 16-bit weight's gradient with oneDNN is
    computed a chunk of output rows at a time by `_backward_by_rows`)."""
    if gemm != "onednn":
        return g.t().mm(x).to(dtype)
    return onednn_linear(g.contiguous().t(), x.contiguous().t()).to(dtype)


def _fp32_accumulate_linear(self, x: torch.Tensor) -> torch.Tensor:
    return Fp32Linear.apply(x, self.weight, self.bias, self.gemm)


FP32_SDPA = "unison_fp32_sdpa"


def _register_fp32_sdpa() -> str:
    """Register fp32-accumulate attention with transformers' attention interface (once)."""

    def forward(module, query, key, value, attention_mask, **kwargs):
        mask = (
            attention_mask if attention_mask is None or attention_mask.dtype == torch.bool else attention_mask.float()
        )
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
        return out.to(query.dtype), weights

    AttentionInterface.register(FP32_SDPA, forward)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)
    return FP32_SDPA


def set_matmul(module: torch.nn.Module, mode: str, gemm: str = "torch") -> torch.nn.Module:
    """Choose how the linear layers of a model multiply.

    `native`: PyTorch's fp16/bf16 kernels. `fp32-accumulate`: the fp16/bf16 inputs and weights are multiplied in
    fp32 and the result is rounded back to fp16/bf16 — what a GPU tensor core does (low-precision operands, fp32
    accumulation, rounded output), computed with fp32 kernels; used on CPUs without fast fp16/bf16 matrix units.
    Attention is computed the same way. Weights are stored in the low-precision dtype either way. The fp32 products
    (fp32-accumulate's, and an fp32 model's) are computed by `gemm` (a resolved `gemm_kernel`), which each linear
    layer keeps as its `gemm` attribute.
    """
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) in ("sdpa", FP32_SDPA):
        config._attn_implementation = _register_fp32_sdpa() if mode == "fp32-accumulate" else "sdpa"
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.gemm = gemm
            if mode == "fp32-accumulate" or (gemm == "onednn" and m.weight.dtype == torch.float32):
                m.forward = types.MethodType(_fp32_accumulate_linear, m)
            elif "forward" in m.__dict__:
                del m.forward
    return module


MATMUL_MODES = ("auto", "native", "fp32-accumulate")


def matmul_mode(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve `auto` to `native` where the device multiplies `dtype` fast, else `fp32-accumulate`."""
    if requested not in MATMUL_MODES:
        raise UserError(f"unknown matmul mode {requested!r}; choose one of: {', '.join(MATMUL_MODES)}")
    if requested != "auto":
        return requested
    if dtype == torch.float32 or native_low_precision_matmul(device.type, dtype):
        return "native"
    return "fp32-accumulate"


def compute_dtype(mode: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in under a resolved matmul mode: fp32 in `fp32-accumulate`, else `dtype`."""
    return torch.float32 if mode == "fp32-accumulate" else dtype
