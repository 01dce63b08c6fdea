"""The conformance contract, measured on any checkpoint: in fp32 the rollout engine's sampled log-probs and the
learner's recompute equal the model's own Hugging Face forward, and in fp16/bf16 the engine-learner mismatch is
finite and larger than fp32's.

    reference   log_softmax(model(prompt + response).logits) at the positions that predict the response, one
                unpadded row at a time, in fp32: every logit transform the model applies included
    engine      the log-prob the rollout engine reports for each token it sampled (temperature 1, no top-k/top-p),
                after the learner's weights were synced into it and verified by checksum
    learner     `Learner.recompute` of the same rows, in fp32
    mismatch    mean |log pi - log mu| between the learner and the engine, both in fp16 (or bf16)

The contract: engine and learner against the reference, mean |delta log p| <= 1e-6 and max <= 1e-4 (`MEAN_TOL`,
`MAX_TOL`). `tests/test_conformance.py` checks it on a tiny random checkpoint of every architecture family unison
accepts (`unison.archs`); `bench/conformance.py` writes the table of docs/conformance.md and the README from the
same function.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass, field

import torch

from unison.config import ModelConfig
from unison.learner import Learner
from unison.models import load_model
from unison.precision import PrecisionPolicy, precision_name
from unison.rollout import make_engine
from unison.rollout.base import Rollouts, SamplingParams

MEAN_TOL = 1e-6
MAX_TOL = 1e-4
PROMPT_LENGTHS = (12, 16, 20, 13)  # longer than the tiny checkpoints' 8-token windows


def default_prompts(seed: int = 0, vocab: tuple[int, int] = (5, 260)) -> list[list[int]]:
    """Random token-id prompts (byte tokens of the built-in tokenizer) of `PROMPT_LENGTHS`, the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(*vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@dataclass
class Conformance:
    """What `measure` found on one checkpoint."""

    model_type: str
    decode_path: str  # the rollout engine's: fast, fallback, or the engine's name where it has no such choice
    reason: str  # why the fallback
    engine_vs_hf: tuple[float, float]  # fp32 (mean, max) |delta log p|
    learner_vs_hf: tuple[float, float]
    mismatch: dict[str, float] = field(default_factory=dict)  # precision -> mean |log pi - log mu|
    tokens: int = 0

    @property
    def exact(self) -> bool:
        return all(mean <= MEAN_TOL and top <= MAX_TOL for mean, top in (self.engine_vs_hf, self.learner_vs_hf))

    @property
    def ordered(self) -> bool:
        """Every fp16/bf16 mismatch finite and below 1, and above fp32's on the fast path, which fuses what the model
        does in several roundings. The fallback's cached decode can share every kernel and rounding with the learner
        (Gemma2's eager attention; gpt-neox with fp32-accumulate matmuls): there a mismatch may be at or below fp32's,
        down to 0."""
        fp32 = self.mismatch.get("fp32", 0.0)
        low = [v for k, v in self.mismatch.items() if k != "fp32"]
        above = self.decode_path != "fast" or all(v > fp32 for v in low)
        return above and all(math.isfinite(v) and 0 <= v < 1.0 for v in low)


@torch.no_grad()
def reference_logprobs(model, rollouts: Rollouts) -> torch.Tensor:
    """log p of each response token under `model(ids).logits` (fp32 log-softmax), one unpadded row at a time.
    -> [B, T]"""
    device = next(model.parameters()).device
    out = torch.zeros(rollouts.response_ids.shape)
    for i, (prompt, response) in enumerate(zip(rollouts.prompt_ids, rollouts.responses())):
        ids = torch.tensor([prompt + response], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1 : -1]  # [n, V]
        target = torch.tensor(response, device=device)
        out[i, : len(response)] = logits.float().log_softmax(-1).gather(-1, target[:, None])[:, 0].cpu()
    return out


def _gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    d = (a - b).abs()[mask]
    return float(d.mean()), float(d.max())


def measure(
    model_dir,
    prompts: list[list[int]],
    max_new_tokens: int = 24,
    precisions=("fp16", "bf16"),
    engine: str = "native",
    seed: int = 0,
    stop_token_ids: tuple[int, ...] = (),
    matmul: str = "auto",
    **engine_kwargs,
) -> Conformance:
    """Sample `prompts` with the rollout engine and hold its log-probs and the learner's against the model's own
    forward (fp32); then the fp16/bf16 engine-learner mismatch on the same prompts, both engines multiplying as
    `matmul` says (`unison.matmul`)."""

    device = torch.device("cpu")
    params = SamplingParams(max_new_tokens, 1.0, stop_token_ids=stop_token_ids)
    fp32 = PrecisionPolicy(torch.float32, torch.float32)
    model = load_model(model_dir, device=device)
    learner = Learner(model, fp32)
    sampler = make_engine(engine, model_dir, dtype=torch.float32, device=device, seed=seed, **engine_kwargs)
    try:
        learner.sync(sampler)  # the weights reach the engine and read back exactly
        path, reason = sampler.decode_path() if hasattr(sampler, "decode_path") else (engine, "")
        ro = sampler.generate(prompts, params)
    finally:
        getattr(sampler, "close", lambda: None)()
    ref = reference_logprobs(learner.model, ro)  # an fp32 learner's model is the checkpoint's, untouched
    pi = learner.recompute(ro)
    result = Conformance(
        learner.model.config.model_type,
        path,
        reason,
        _gap(ro.logprobs, ref, ro.mask),
        _gap(pi, ref, ro.mask),
        tokens=int(ro.mask.sum()),
    )
    result.mismatch["fp32"] = float((pi - ro.logprobs).abs()[ro.mask].mean())
    for name in precisions:
        dtype = PrecisionPolicy.from_names(name, name)
        learner = Learner(load_model(model_dir, device=device), dtype, model_cfg=ModelConfig(matmul=matmul))
        sampler = make_engine(
            engine, model_dir, dtype=dtype.rollout, device=device, seed=seed, matmul=matmul, **engine_kwargs
        )
        try:
            learner.sync(sampler)
            low = sampler.generate(prompts, params)
        finally:
            getattr(sampler, "close", lambda: None)()
        pi = learner.recompute(low)
        result.mismatch[precision_name(dtype.train)] = float((pi - low.logprobs).abs()[low.mask].mean())
    return result


# ---- the engine self-test at the start of a run ---------------------------------------------------------------
# mean |log pi - log mu| a run's first tokens may show, by the looser of its two precisions. Set about 10x above the
# largest mismatch measured with a sound engine on a dense model (docs/conformance.md: tiny random checkpoints of 18
# families, fp32 at most 6.6e-7, fp16 1.5e-3, bf16 1.1e-2; the built-in model 1e-7, 1e-4, 1e-3) and below what a
# broken engine gives (a logit transform left out: 0.2; another dtype than the learner's: see tests/test_self_test in
# test_setup.py). An MoE learner routes with the engine's experts here: a token routed to other experts moves its
# log-prob by up to about 1, which is the routing mismatch (logged every step), not an engine fault.
SELF_TEST_BANDS = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-1}


class SelfTestError(RuntimeError):
    """The rollout engine and the learner disagree far beyond what their precisions allow."""


@torch.no_grad()
def self_test(engine, learner, prompts: list[list[int]], rows: int = 8, tokens: int = 16) -> dict:
    """Sample `tokens` tokens for `rows` prompts with the engine (its random state left as it was), recompute them
    with the learner and hold the mean |log pi - log mu| against `SELF_TEST_BANDS`; raises SelfTestError outside."""

    t0 = time.perf_counter()
    state = engine.rng_state()
    # an MoE learner routes with the engine's experts where the engine records them: a token routed otherwise is
    # the routing mismatch (measured on every step), not a fault of the engine's numerics
    replay = learner.moe and "keep_routing" in inspect.signature(engine.generate).parameters
    try:
        ro = engine.generate(prompts[:rows], SamplingParams(tokens, 1.0), **({"keep_routing": True} if replay else {}))
    finally:
        engine.set_rng_state(state)
    with learner.replaying() if replay else contextlib.nullcontext():
        logp = learner.recompute(ro)
    gap = (logp - ro.logprobs).abs()[ro.mask]
    mean = float(gap.mean()) if gap.numel() else 0.0
    band = max(SELF_TEST_BANDS[engine.dtype], SELF_TEST_BANDS[learner.policy.train])
    pair = f"rollout {precision_name(engine.dtype)} / train {precision_name(learner.policy.train)}"
    if not math.isfinite(mean) or mean > band:
        raise SelfTestError(
            f"engine self-test failed: mean |log pi - log mu| is {mean:.3g} on {int(ro.mask.sum())} sampled tokens"
            f"{' (the learner routing with the engine experts)' if replay else ''}, "
            f"beyond the {band:g} that {pair} allows: the engine and the learner disagree (a broken engine version, "
            "a wrong dtype, a model the engine computes otherwise); run `unison probe` on the model to see the "
            "mismatch, or set run.self_test=false to train anyway"
        )
    return {"self_test/abs_log_ratio_mean": mean, "self_test/band": band, "self_test/seconds": time.perf_counter() - t0}
