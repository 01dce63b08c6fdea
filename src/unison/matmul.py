"""fp16/bf16 matrix products on machines without fast units for them: how a model's linear layers and attention
multiply (`model.matmul`).

    native            PyTorch's own fp16/bf16 kernels (GPUs; CPUs with the instructions for that dtype)
    fp32-accumulate   the fp16/bf16 operands multiplied in fp32 and the product rounded back, as a GPU tensor core
                      does: the default where PyTorch would emulate the dtype's products element by element, 10 to
                      50 times slower than fp32 (CPUs with AVX2 only; fp16 on CPUs with AVX-512 BF16 but no FP16)
    auto              native where it is fast for the dtype, else fp32-accumulate

Weights and activations stay in the chosen dtype either way; only where the products accumulate changes.
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


def _fp32_accumulate_linear(self, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.float()
    return torch.nn.functional.linear(x.float(), self.weight.float(), bias).to(x.dtype)


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


def set_matmul(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Choose how the linear layers of a fp16/bf16 model multiply.

    `native`: PyTorch's fp16/bf16 kernels. `fp32-accumulate`: the fp16/bf16 inputs and weights are multiplied in
    fp32 and the result is rounded back to fp16/bf16 — what a GPU tensor core does (low-precision operands, fp32
    accumulation, rounded output), computed with fp32 kernels; used on CPUs without fast fp16/bf16 matrix units.
    Attention is computed the same way. Weights are stored in the low-precision dtype either way.
    """
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) in ("sdpa", FP32_SDPA):
        config._attn_implementation = _register_fp32_sdpa() if mode == "fp32-accumulate" else "sdpa"
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            if mode == "fp32-accumulate":
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
