"""Numerics in one place: precision names, the precision policy, the FP16 loss scaler and the one step function.

Every backward pass and optimizer step in unison goes through `backward` and `step` (`backward_and_step` is the
two together), so that loss scaling, unscale-before-clip and skip-on-overflow cannot be bypassed, and a non-finite
value never reaches the fp32 master weights.

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
from unison.matmul import Fp32Linear

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
        raise UserError(
            f"this GPU ({torch.cuda.get_device_name(device)}) cannot run bf16; use --precision fp16 or fp32"
        )
    try:
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as exc:
        raise UserError(
            f"device {device} cannot run {precision_name(dtype)} matrix products ({exc}); choose another precision"
        ) from None


LM_HEADS = ("same", "fp32")


def _fp32_head_forward(self, x: torch.Tensor) -> torch.Tensor:
    return Fp32Linear.apply(x.float(), self.weight, self.bias, getattr(self, "gemm", "torch"))


def upcast_lm_head(model: torch.nn.Module, dtype: torch.dtype) -> set[str]:
    """Compute `model`'s LM head in fp32: its weight (and bias) stored in fp32, its input upcast, its logits left in
    fp32 (not rounded to `dtype`, the dtype of the rest of the model). A head tied to the input embeddings shares
    its fp32 weight with them; their lookups are rounded to `dtype`, as they were before. Returns the names of the
    head's parameters (as `named_parameters` gives them)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise UserError(f"precision.lm_head=fp32 needs a linear LM head; this model's is a {type(head).__name__}")
    ids = {id(head.weight)} | ({id(head.bias)} if head.bias is not None else set())
    head.float()
    head.forward = types.MethodType(_fp32_head_forward, head)
    embed = model.get_input_embeddings()
    if embed is not None and embed.weight is head.weight:
        embed.register_forward_hook(lambda module, args, out: out.to(dtype))
    return {name for name, p in model.named_parameters() if id(p) in ids}


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
    lm_head_fp32: bool = False  # the LM head computed in fp32 in both engines (`upcast_lm_head`)

    @classmethod
    def from_names(cls, rollout: str, train: str, lm_head: str = "same") -> PrecisionPolicy:
        return cls(rollout=parse_precision(rollout), train=parse_precision(train), lm_head_fp32=lm_head == "fp32")

    @property
    def needs_loss_scaling(self) -> bool:
        return self.train == torch.float16

    def describe(self) -> str:
        head = ", LM head fp32" if self.lm_head_fp32 else ""
        return f"rollout {precision_name(self.rollout)}, train {precision_name(self.train)}{head}, master fp32"


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

    In fp32 the model's own parameters are the master weights. In fp16/bf16 each trainable parameter's fp32 tensor
    becomes its master (no copy is made) and the model is cast to the train dtype; each 16-bit gradient is added into
    its master's fp32 gradient as soon as the backward pass has finished it, and dropped (`_take_grad`), so the
    model's 16-bit gradients never all exist at once beside the fp32 ones; the masters are cast back into the model
    after every step.
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
            # `.data`: the model's fp32 tensor itself, with a version counter of its own
            self.params = [torch.nn.Parameter(p.data if p.dtype == torch.float32 else p.data.float()) for p in params]
            cast_module(model, train_dtype)
            self.model_params = [p for _, p in model.named_parameters() if p.requires_grad]
            for p, m in zip(self.model_params, self.params):
                p.register_post_accumulate_grad_hook(functools.partial(_take_grad, m))

    @property
    def shared(self) -> bool:
        return self.params is self.model_params

    def accumulate_grads(self) -> None:
        """Move the model's gradients (train dtype) into the master gradients (fp32), summing micro-batches (those the
        backward pass has not moved already)."""
        if self.shared:
            return
        for p, m in zip(self.model_params, self.params):
            _take_grad(m, p)

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


def _take_grad(master: torch.Tensor, p: torch.Tensor) -> None:
    """Add p's gradient (train dtype) into master's (fp32), then drop it."""
    if p.grad is None:
        return
    if master.grad is None:
        master.grad = p.grad.float()
    else:
        master.grad.add_(p.grad)
    p.grad = None


@dataclass
class StepResult:
    """What one optimizer step did."""

    skipped: bool
    grad_norm: float  # of the unscaled fp32 gradient before clipping (inf/nan when skipped)
    loss_scale: float  # the scale used for this step


def backward(loss: torch.Tensor, weights: MasterWeights, scaler: LossScaler) -> None:
    """Backpropagate one micro-batch's loss (weighted so that the micro-batch losses sum to the step's loss), scaled
    by the loss scale, and add its gradients into the fp32 master gradients."""
    scale = scaler.scale
    (loss * scale).backward() if scale != 1.0 else loss.backward()
    weights.accumulate_grads()


def local_tensor(t):
    """This rank's shard of a sharded (DTensor) tensor; anything else as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded (DTensor) tensor, gathered from every rank; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def step(
    weights: MasterWeights,
    optimizer: torch.optim.Optimizer,
    scaler: LossScaler,
    max_grad_norm: float | None = 1.0,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> StepResult:
    """After the backward passes of a step: unscale the fp32 gradients, take their norm, and step or skip.

    If the norm is inf/NaN the step is skipped (master weights untouched), the scale backs off and the skip is
    counted. With sharded gradients (several ranks), `all_reduce` sums the squared norms of the ranks' shards, so
    the norm, and with it the decision to skip, is the same on every rank."""
    scale = scaler.scale
    grads = [p.grad for p in weights.params if p.grad is not None]
    local = [local_tensor(g) for g in grads]
    if scale != 1.0:
        torch._foreach_mul_(local, 1.0 / scale)
    norm_t = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(local))) if local else torch.zeros(())
    if all_reduce is not None:  # the global norm: sqrt of the sum of the ranks' squared norms
        norm_t = all_reduce(norm_t.double().pow(2).reshape(1)).sqrt()
    norm = float(norm_t)
    if not math.isfinite(norm):
        weights.zero_grad()
        scaler.update(found_nonfinite=True)
        return StepResult(skipped=True, grad_norm=norm, loss_scale=scale)
    if max_grad_norm and norm > max_grad_norm:
        torch._foreach_mul_(local, max_grad_norm / (norm + 1e-6))
    optimizer.step()
    weights.zero_grad()
    weights.copy_to_model()
    scaler.update(found_nonfinite=False)
    return StepResult(skipped=False, grad_norm=norm, loss_scale=scale)


def backward_and_step(
    losses: Iterable[torch.Tensor],
    weights: MasterWeights,
    optimizer: torch.optim.Optimizer,
    scaler: LossScaler,
    max_grad_norm: float | None = 1.0,
) -> StepResult:
    """One optimizer step over micro-batch losses: `backward` each (a generator computes each loss after the
    previous one's backward, so one micro-batch's graph is held at a time), then `step`."""
    weights.zero_grad()
    for loss in losses:
        backward(loss, weights, scaler)
    return step(weights, optimizer, scaler, max_grad_norm)


# positions' odd weights in the checksum repeat with this period; a chunk of the pass is a whole number of periods
_PERIOD = 32749
_CHUNK = _PERIOD * 64
_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _position_weights(device: torch.device) -> torch.Tensor:
    if device not in _WEIGHTS:
        _WEIGHTS[device] = 2 * (torch.arange(_CHUNK, device=device, dtype=torch.int32) % _PERIOD) + 1
    return _WEIGHTS[device]


def _words(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as int32 words (zero-padded to a whole word), on its device, without a copy where the
    tensor is contiguous, aligned and a whole number of words."""
    flat = t.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    if raw.numel() % 4 or flat.storage_offset() * flat.element_size() % 4:
        pad = (-raw.numel()) % 4
        raw = torch.cat((raw, raw.new_zeros(pad)))
    return raw.view(torch.int32)


def checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A checksum over tensors, exact to the bit, computed where they live in one pass over their bytes.

    Each tensor's bytes, read as 32-bit words, are multiplied by odd position weights (products wrap modulo 2^32,
    so any changed bit changes its word's product) and summed in int64; the per-tensor sums, with names, dtypes and
    shapes, are hashed in name order. Integer arithmetic makes the value the same on any device and thread count:
    two holders of the same values in the same dtype give the same string."""
    h = hashlib.sha256()
    items = sorted(named_tensors, key=lambda kv: kv[0])
    sums = []
    for _, t in items:
        words = _words(t)
        w = _position_weights(words.device)
        total = torch.zeros((), dtype=torch.int64, device=words.device)
        for i in range(0, words.numel(), _CHUNK):
            part = words[i : i + _CHUNK]
            total += (part * w[: part.numel()]).sum()
        sums.append(total)
    values = torch.stack([v.to(sums[0].device) for v in sums]).tolist() if sums else []  # one copy to the host
    for (name, t), value in zip(items, values):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{value};".encode())
    return h.hexdigest()[:16]
