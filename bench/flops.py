"""Model FLOPs of the work the benchmarks time, the matrix-product rate they are measured against, and the timer."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from unison.matmul import onednn_linear

_RATES: dict = {}
# what `timed` reads: wall-clock seconds, or (`use_cpu_clock`) the CPU seconds of the process, which on a machine
# shared with other processes leave out the time they hold the cores
CLOCK = {"now": time.perf_counter}


def use_cpu_clock() -> None:
    """Time with the process's CPU seconds from now on (one thread: the work's own seconds)."""
    CLOCK["now"] = time.process_time
    _RATES.clear()


def matmul_rate(
    device: torch.device,
    compute: torch.dtype,
    hidden: int,
    repeats: int = 5,
    again: bool = False,
    gemm: str = "torch",
) -> float:
    """FLOP/s of one matrix product in `compute` on `device`, the best of `repeats` (measured once per setting, or
    once more with `again`, keeping the best of all measurements).

    On a CPU, [4096, hidden] x [hidden, 4 hidden] (the learner's typical shape) by `gemm` (`F.linear`, or oneDNN's
    product where the learner multiplies with it, `unison.matmul.gemm_kernel`); on a GPU, a square 8192 product,
    the rate its matrix units reach."""
    key = (device.type, compute, hidden, gemm)
    if key in _RATES and not again:
        return _RATES[key]
    m, k, n = (8192, 8192, 8192) if device.type == "cuda" else (4096, hidden, 4 * hidden)
    x, w = torch.randn(m, k, dtype=compute, device=device), torch.randn(n, k, dtype=compute, device=device)
    calls = 20 if device.type == "cuda" else 1
    product = onednn_linear if gemm == "onednn" and compute == torch.float32 else F.linear
    product(x, w)

    def products():
        for _ in range(calls):
            product(x, w)

    best = min(timed(products, device) for _ in range(repeats)) / calls
    _RATES[key] = max(_RATES.get(key, 0.0), 2 * m * k * n / best)
    return _RATES[key]


def timed(fn, device: torch.device | None = None) -> float:
    """Seconds `fn()` takes, with the device's queued work waited for before and after (a GPU runs asynchronously)."""
    synchronize(device)
    t0 = CLOCK["now"]()
    fn()
    synchronize(device)
    return CLOCK["now"]() - t0


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_parameters(model) -> tuple[int, int]:
    """(weights of the matrix products in the layers, weights of the LM head): the input embedding is a lookup, and
    a head tied to it is counted once, as the head."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    dense = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not embed and p is not head)
    return dense, head.numel()


def forward_flops(model, rows: int, length: int, head_tokens: int) -> float:
    """Matrix-product FLOPs of a causal forward over `rows` sequences of `length` tokens with the LM head on
    `head_tokens` positions per row: 2 x weights per token, plus attention scores and weighted values (2 x heads x
    head size x length^2 per layer, half of the square under the causal mask)."""
    cfg = model.config
    dense, head = matmul_parameters(model)
    attention = cfg.num_hidden_layers * 4 * attention_width(cfg) * length * length / 2
    return rows * (2 * dense * length + 2 * head * head_tokens + attention)


def sampling_flops(model, rows: int, prompt: int, new: int) -> float:
    """Matrix-product FLOPs of sampling `new` tokens after a `prompt`-token prompt for `rows` rows with a KV cache:
    each token costs the weights once (head included) and attention over its context."""
    cfg = model.config
    dense, head = matmul_parameters(model)
    per_token = 2 * (dense + head)
    return rows * sum(per_token + 4 * cfg.num_hidden_layers * attention_width(cfg) * (prompt + t) for t in range(new))


def attention_width(cfg) -> int:
    """Query heads x head size (the hidden size, unless the config sets its own head size)."""
    return cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
