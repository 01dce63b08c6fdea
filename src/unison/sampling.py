"""The sampling distribution, shared by the rollout engine (which samples from it) and the learner (which
recomputes it), so that log mu and log pi refer to the same distribution.

    q(. | y_<t) = renormalise( restrict_{top-k, top-p}( softmax(fp32(logits) / temperature) ) )

Logits are always upcast to fp32 before the softmax, in both engines. With `exact` (precision.bitwise) every
softmax over the vocabulary is `unison.exact`'s, whose sums have one layout whatever the number of rows.
"""

from __future__ import annotations

import torch

from unison import exact as exact_ops


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, exact: bool = False
) -> torch.Tensor:
    """fp32 logits / temperature, with tokens outside the top-k and top-p support set to -inf. [..., V] -> [..., V]

    Top-p keeps the smallest set of most likely tokens whose probability sum reaches `top_p` (the token that
    crosses the threshold is kept). Top-k is applied first, as in vLLM and Hugging Face.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / max(temperature, 1e-6)
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = exact_ops.softmax(sorted_logits) if exact else sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability mass strictly above each token
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def log_softmax(logits: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """fp32 log softmax over the vocabulary (`unison.exact.log_softmax` with `exact`). [..., V] -> [..., V]"""
    return exact_ops.log_softmax(logits) if exact else logits.float().log_softmax(-1)


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    exact: bool = False,
) -> torch.Tensor:
    """log q(token) under the processed distribution. logits [..., V], tokens [...] -> [...] fp32."""
    processed = process_logits(logits, temperature, top_k, top_p, exact)
    return log_softmax(processed, exact).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# positions per chunk of the chunked log-probs: about 8M vocabulary entries (32 MB in fp32) at a time
CHUNK_VALUES = 2**23


def chunk_rows(vocab: int) -> int:
    """Positions per chunk for a vocabulary of `vocab` entries."""
    return max(1, CHUNK_VALUES // max(vocab, 1))


def _chunked_logprobs(logits: torch.Tensor, tokens: torch.Tensor, sampling: tuple) -> torch.Tensor:
    """`token_logprobs(logits, tokens, *sampling)`, one chunk of positions at a time (no gradient)."""
    flat, tok = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    out = torch.empty(tok.shape, dtype=torch.float32, device=logits.device)
    rows = chunk_rows(flat.shape[-1])
    for i in range(0, len(tok), rows):
        out[i : i + rows] = token_logprobs(flat[i : i + rows], tok[i : i + rows], *sampling)
    return out.view(tokens.shape)


class ChunkedTokenLogprobs(torch.autograd.Function):
    """`token_logprobs` over chunks of positions, so that the fp32 upcast, the processing and the log-softmax of the
    logits exist for one chunk at a time, in the forward and in the backward pass (which recomputes them chunk by
    chunk from the logits, kept in their own dtype, and writes the gradient over them). Every step is a function of
    one position's row alone, so the values and gradients are those of `token_logprobs` over the whole tensor, to
    the bit.

    logits [..., V] (any float dtype), tokens [...] -> [...] fp32"""

    @staticmethod
    def forward(ctx, logits, tokens, temperature: float, top_k: int, top_p: float, exact: bool):
        ctx.save_for_backward(logits, tokens)
        ctx.sampling = (temperature, top_k, top_p, exact)
        return _chunked_logprobs(logits, tokens, ctx.sampling)

    @staticmethod
    def backward(ctx, grad):
        logits, tokens = ctx.saved_tensors
        flat, tok, g = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), grad.reshape(-1)
        # each chunk's gradient overwrites its logits once computed from them: the logits are needed by this
        # backward alone, so their memory holds the gradient and a second [positions, vocabulary] tensor never exists
        out = flat
        rows = chunk_rows(flat.shape[-1])
        for i in range(0, len(tok), rows):
            x = flat[i : i + rows].detach()
            with torch.enable_grad():
                x.requires_grad_()
                (part,) = torch.autograd.grad(token_logprobs(x, tok[i : i + rows], *ctx.sampling), x, g[i : i + rows])
            out[i : i + rows] = part
        return out.view(logits.shape), None, None, None, None, None


def chunked_token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    exact: bool = False,
) -> torch.Tensor:
    """`token_logprobs` computed chunk by chunk (`ChunkedTokenLogprobs`), with gradient where the logits have one.
    logits [..., V], tokens [...] -> [...] fp32"""
    if torch.is_grad_enabled() and logits.requires_grad:
        return ChunkedTokenLogprobs.apply(logits, tokens, temperature, top_k, top_p, exact)
    return _chunked_logprobs(logits, tokens, (temperature, top_k, top_p, exact))


def chunked_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`entropy` computed chunk by chunk (no gradient). [..., V] -> [...] fp32"""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    rows = chunk_rows(flat.shape[-1])
    with torch.no_grad():
        for i in range(0, flat.shape[0], rows):
            out[i : i + rows] = entropy(flat[i : i + rows], temperature)
    return out.view(logits.shape[:-1])


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(fp32(logits) / temperature). [..., V] -> [...]"""
    logp = (logits.float() / max(temperature, 1e-6)).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def sample(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float,
    top_k: int,
    top_p: float,
    exact: bool = False,
):
    """Draw one token per row and return (tokens [B], log q(tokens) [B]); greedy when temperature is 0."""
    if temperature <= 0.0:
        tokens = log_softmax(logits, exact).argmax(-1)
        return tokens, torch.zeros_like(tokens, dtype=torch.float32)
    logp = log_softmax(process_logits(logits, temperature, top_k, top_p, exact), exact)  # [B, V]
    return draw(logp, generator)


def draw(logp: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of log-probabilities logp [B, V] by inverse-CDF sampling, and its log-probability.

    Row i takes the first token whose cumulative probability exceeds U_i * (its total), U_i ~ Uniform[0, 1): one
    uniform draw per row (an exponential race or Gumbel-max draws V of them) and no host synchronisation. The
    cumulative sum runs in fp64, so each token's interval is its fp32 probability to about 1e-16; a token of
    probability 0 (outside top-k/top-p) has an empty interval and is never drawn."""
    cdf = logp.exp().double().cumsum_(-1)  # [B, V]
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=logp.device).mul_(total)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # U * total may round up to total
    tokens = torch.searchsorted(cdf, u, right=True).squeeze_(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
