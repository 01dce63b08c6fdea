"""Numerics in one place: precision names, the precision policy, the FP16 loss scaler and the one step function.

Every backward pass and optimizer step in unison goes through `backward_and_step`, so that loss scaling,
unscale-before-clip and skip-on-overflow cannot be bypassed, and a non-finite value never reaches the fp32 master
weights.

    train dtype   forward and backward of the learner (a compute copy of the weights in that dtype)
    rollout dtype the rollout engine's copy of the weights
    master dtype  fp32: what the optimizer updates; the compute copies are cast from it after every step
"""

from __future__ import annotations

import functools
import hashlib
import math
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from unison.errors import UserError

PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
FP16_MAX = 65504.0


def parse_precision(name: str | torch.dtype) -> torch.dtype:
    """`fp32`/`float32`, `bf16`/`bfloat16`, `fp16`/`float16`/`half` to a torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in SHORT_NAMES:
            raise UserError(f"unsupported precision {name}; choose one of: fp32, bf16, fp16")
        return name
    key = str(name).strip().lower()
    if key not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}; choose one of: fp32, bf16, fp16 (or float32, bfloat16, float16)")
    return PRECISIONS[key]


def precision_name(dtype: torch.dtype) -> str:
    """The short name of a dtype: fp32, bf16 or fp16."""
    return SHORT_NAMES[dtype]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when available, else CPU; `cuda` without a GPU is a user error."""
    if isinstance(name, torch.device):
        return name
    key = str(name).strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for but no CUDA GPU is visible; use --device cpu or --device auto")
        return torch.device(key)
    raise UserError(f"unknown device {name!r}; choose one of: auto, cpu, cuda")


def check_dtype_supported(dtype: torch.dtype, device: torch.device) -> None:
    """Fail with a clear message when `device` cannot run matrix products in `dtype`."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError(f"this GPU ({torch.cuda.get_device_name(device)}) cannot run bf16; "
                        "use --precision fp16 or fp32")
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as exc:
        raise UserError(
            f"device {device} cannot run {precision_name(dtype)} matrix products ({exc}); choose another precision"
        ) from None


@functools.cache
def native_low_precision_matmul(device_type: str) -> bool:
    """Whether the device multiplies fp16/bf16 matrices in hardware at least as fast as fp32.

    GPUs do. CPUs do with AMX or AVX-512 BF16/FP16; on an AVX2-only CPU PyTorch emulates fp16/bf16 matrix products
    element by element, 10 to 50 times slower than fp32.
    """
    if device_type != "cpu":
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16", "avx512_fp16"))


def _fp32_accumulate_linear(self, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.float()
    return torch.nn.functional.linear(x.float(), self.weight.float(), bias).to(x.dtype)


FP32_SDPA = "unison_fp32_sdpa"


def _register_fp32_sdpa() -> str:
    """Register fp32-accumulate attention with transformers' attention interface (once)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def forward(module, query, key, value, attention_mask, **kwargs):
        mask = (attention_mask if attention_mask is None or attention_mask.dtype == torch.bool
                else attention_mask.float())
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
    """Resolve `auto` to `native` where the device has fast fp16/bf16 matrix units, else `fp32-accumulate`."""
    if requested not in MATMUL_MODES:
        raise UserError(f"unknown matmul mode {requested!r}; choose one of: {', '.join(MATMUL_MODES)}")
    if requested != "auto":
        return requested
    if dtype == torch.float32 or native_low_precision_matmul(device.type):
        return "native"
    return "fp32-accumulate"


def compute_dtype(mode: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in under a resolved matmul mode: fp32 in `fp32-accumulate`, else `dtype`."""
    return torch.float32 if mode == "fp32-accumulate" else dtype


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a model's parameters and floating buffers to `dtype`, keeping rotary `inv_freq` buffers in fp32.

    Rotary frequencies are positions' angles, not weights: every engine computes them in fp32, so casting them
    would add a mismatch that no real engine has.
    """
    keep = {name: buf.detach().clone() for name, buf in module.named_buffers() if name.endswith("inv_freq")}
    module.to(dtype)
    for name, buf in keep.items():
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        setattr(owner, name.rsplit(".", 1)[-1], buf.float())
    return module


@dataclass(frozen=True)
class PrecisionPolicy:
    """Separate rollout and train dtypes over fp32 master weights."""

    rollout: torch.dtype = torch.float16
    train: torch.dtype = torch.float16
    master: torch.dtype = torch.float32

    @classmethod
    def from_names(cls, rollout: str, train: str) -> PrecisionPolicy:
        return cls(rollout=parse_precision(rollout), train=parse_precision(train))

    @property
    def needs_loss_scaling(self) -> bool:
        return self.train == torch.float16

    def describe(self) -> str:
        return f"rollout {precision_name(self.rollout)}, train {precision_name(self.train)}, master fp32"


class LossScaleFloorError(RuntimeError):
    """The dynamic loss scale fell below its floor: the gradients overflow even when barely scaled."""


class LossScaler:
    """Dynamic loss scaling for FP16 gradients.

    Starts at `init_scale` (2^16); after `growth_interval` (400) finite steps in a row the scale is multiplied by
    `growth_factor` (2); on an inf/NaN gradient the step is skipped and the scale multiplied by `backoff_factor`
    (0.5). A scale below `min_scale` stops the run with `LossScaleFloorError`. Disabled (bf16, fp32), the scale is
    1 and never changes, but a non-finite gradient still skips the step.
    """

    def __init__(
        self,
        enabled: bool = True,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 400,
        min_scale: float = 1.0,
    ):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.good_steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def update(self, found_nonfinite: bool) -> None:
        """Advance the scale after a step: back off on overflow, grow after `growth_interval` finite steps."""
        if found_nonfinite:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            self.good_steps = 0
            if self.enabled:
                self.scale *= self.backoff_factor
                if self.scale < self.min_scale:
                    raise LossScaleFloorError(
                        f"fp16 loss scale fell to {self.scale:g}, below its floor {self.min_scale:g}: "
                        f"{self.skipped_steps} steps overflowed in all ({self.consecutive_skips} in a row at the "
                        f"end), too often for {self.growth_interval} finite steps in a row to grow the scale back; "
                        "the gradients overflow fp16 even when barely scaled (a learning rate too high, or "
                        "activations out of fp16 range): lower the learning rate or train in bf16 or fp32"
                    )
            return
        self.consecutive_skips = 0
        self.good_steps += 1
        if self.enabled and self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("enabled", "scale", "good_steps", "skipped_steps", "consecutive_skips")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class MasterWeights:
    """fp32 master weights beside a compute copy of the model in the train dtype.

    In fp32 the model's own parameters are the master weights. In fp16/bf16 the model is cast to the train dtype
    and each trainable parameter gets an fp32 twin that the optimizer updates; gradients are accumulated into the
    twins in fp32 after every backward, and the twins are cast back into the model after every step.
    """

    def __init__(self, model: torch.nn.Module, train_dtype: torch.dtype):
        self.model = model
        self.train_dtype = train_dtype
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        if train_dtype == torch.float32:
            model.float()
            self.model_params = params
            self.params = params
        else:
            self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
            cast_module(model, train_dtype)
            self.model_params = [p for _, p in model.named_parameters() if p.requires_grad]

    @property
    def shared(self) -> bool:
        return self.params is self.model_params

    def accumulate_grads(self) -> None:
        """Move the model's gradients (train dtype) into the master gradients (fp32), summing micro-batches."""
        if self.shared:
            return
        for p, m in zip(self.model_params, self.params):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if not self.shared:
            for p in self.model_params:
                p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        if not self.shared:
            for p, m in zip(self.model_params, self.params):
                p.copy_(m)

    def named_master(self) -> Iterable[tuple[str, torch.Tensor]]:
        return zip(self.names, (p.detach() for p in self.params))

    def load_master(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in zip(self.names, self.params):
                p.copy_(state[name])
        self.copy_to_model()


@dataclass
class StepResult:
    """What one optimizer step did."""

    skipped: bool
    grad_norm: float  # of the unscaled fp32 gradient before clipping (inf/nan when skipped)
    loss_scale: float  # the scale used for this step


def backward_and_step(
    micro_losses: Iterable[Callable[[], torch.Tensor]],
    weights: MasterWeights,
    optimizer: torch.optim.Optimizer,
    scaler: LossScaler,
    max_grad_norm: float | None = 1.0,
) -> StepResult:
    """The one path from losses to an optimizer step: scale, backward, unscale, clip, step-or-skip, update.

    `micro_losses` yields zero-argument callables, each running one micro-batch forward and returning its loss
    (already weighted so that the micro-batch losses sum to the step's loss); each is backpropagated before the
    next runs. Gradients are unscaled in fp32; if any is inf/NaN the step is skipped (master weights untouched),
    the scale backs off and the skip is counted.
    """
    scale = scaler.scale
    weights.zero_grad()
    for compute in micro_losses:
        loss = compute()
        (loss * scale).backward() if scale != 1.0 else loss.backward()
        weights.accumulate_grads()
    grads = [p.grad for p in weights.params if p.grad is not None]
    if scale != 1.0:
        torch._foreach_mul_(grads, 1.0 / scale)
    if grads:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()
    else:
        norm = 0.0
    if not math.isfinite(norm):
        weights.zero_grad()
        scaler.update(found_nonfinite=True)
        return StepResult(skipped=True, grad_norm=norm, loss_scale=scale)
    if max_grad_norm and norm > max_grad_norm:
        torch._foreach_mul_(grads, max_grad_norm / (norm + 1e-6))
    optimizer.step()
    weights.zero_grad()
    weights.copy_to_model()
    scaler.update(found_nonfinite=False)
    return StepResult(skipped=False, grad_norm=norm, loss_scale=scale)


def checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A checksum over tensors, exact to the bit: a position-weighted sum of each tensor's bit patterns.

    Computed where the tensors live (no copy to the host beyond one integer per tensor), in name order, so two
    holders of the same values in the same dtype give the same string and any changed bit changes it.
    """
    h = hashlib.sha256()
    int_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        flat = t.detach().contiguous().reshape(-1)
        bits = flat.view(int_view[flat.element_size()]).long()
        weight = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
        value = int(((bits & 0xFFFFFFFF) * weight).sum().item())
        h.update(f"{name}|{flat.dtype}|{tuple(t.shape)}|{value};".encode())
    return h.hexdigest()[:16]
