"""`unison probe --advise`: what the probe measures, turned into a precision to train with and the reasons.

Three measurements (`unison probe` makes them; `advise` reads them, so it can be tested on hand-made ones):

    activations  each layer's largest |activation| in an fp32 forward (`unison.overflow.activation_stats`), against
                 fp16's largest value 65504: the headroom is 65504 / that value
    gradients    a few fp32 backward passes of a policy-gradient loss on sampled responses (`gradient_stats`): the
                 share of nonzero gradient values that the initial fp16 loss scale would still leave below fp16's
                 smallest subnormal (2^-24, so they flush to zero), and whether the largest scaled value overflows
    mismatch     the probe's mean |log pi - log mu| (and exact KL where measured) of fp16 and of bf16

The recommendation is one of:

    fp16                    fp16 throughout: its activations fit with room, its gradients survive scaling
    fp16 + fp32 layers      fp16, with the layers whose MLP's inner activation comes near the limit run in fp32
                            (precision.on_activation_overflow=fp32_layers names and upcasts them as they appear)
    bf16 + correction       bf16 with a sequence-level correction (grpo-seq-mis) and an fp32 LM head, where fp16's
                            range does not hold the model: activations near the limit in many layers, or in a block
                            fp32 layers cannot cure (attention, the residual stream, an MLP's output: Gemma-style
                            models), or gradients that scaling cannot keep above fp16's smallest value

Activations measured on fewer than 1,024 tokens are too few to rely on: the advice says so among its reasons and
checks.
"""

from __future__ import annotations

import math

import torch

from unison.overflow import HEADROOM_MIN, SAMPLE_MIN_TOKENS

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # the smallest fp16 subnormal: a smaller scaled gradient flushes to zero
MANY_LAYERS = 0.25  # more than this share of the layers near the limit: fp16's range does not hold the model
UNDERFLOW_MAX = 1e-3  # more than this share of gradient values flushed to zero at the initial scale


def advise(activations: list[dict], gradients: dict, mismatch: dict[str, dict], tokens: int | None = None) -> dict:
    """The recommendation from hand-made or measured inputs: `activations` rows of `activation_stats` (layer,
    max_abs, where), `gradients` of `gradient_stats` (underflow_frac, max_abs, scale), `mismatch` by precision
    name (fp16, bf16) of probe metrics (abs_log_ratio_mean, exact_kl_mu_pi), `tokens` the activations were
    measured on. -> {"recommendation", "settings", "reasons", "checks"}"""
    near = [r for r in activations if r["max_abs"] > 0 and FP16_MAX / r["max_abs"] < HEADROOM_MIN]
    uncurable = [r for r in near if r["where"] != "mlp_hidden"]  # fp32 layers recompute an MLP's inner activation
    under = gradients.get("underflow_frac", 0.0)
    checks, ratio = _checks(activations, near, gradients, mismatch)
    range_fails = (len(near) > MANY_LAYERS * max(len(activations), 1)) or under > UNDERFLOW_MAX or bool(uncurable)
    rec, settings, reasons = _recommend(activations, near, gradients, range_fails)
    if tokens is not None:
        short = tokens < SAMPLE_MIN_TOKENS
        checks.append(
            {
                "check": "activation sample",
                "measured": f"{tokens} tokens",
                "limit": f">= {SAMPLE_MIN_TOKENS} tokens",
                "ok": not short,
            }
        )
        if short:
            reasons.append(
                f"the activations were measured on {tokens} tokens only: too few to rely on (a longer response can "
                "reach larger values); probe more prompts and longer responses (--num-prompts, --max-new-tokens)"
            )
    if ratio is not None and not range_fails:
        reasons.append(
            f"bf16's mismatch is {ratio:.3g}x fp16's" + (" (little difference at this length)" if ratio < 2 else "")
        )
    return {
        "recommendation": rec,
        "settings": settings,
        "reasons": reasons,
        "checks": checks,
        "layers_near_limit": [r["layer"] for r in near],
    }


def _checks(activations: list[dict], near: list[dict], gradients: dict, mismatch: dict) -> tuple[list, float | None]:
    """The measured checks behind a recommendation, and the bf16/fp16 mismatch ratio (None without both)."""
    checks = []
    worst = max(activations, key=lambda r: r["max_abs"]) if activations else None
    if worst is not None:
        headroom = FP16_MAX / worst["max_abs"] if worst["max_abs"] else math.inf
        checks.append(
            {
                "check": "fp16 activation headroom",
                "measured": f"{headroom:.3g}x (layer {worst['layer']} {worst['where']}, {worst['max_abs']:.4g})",
                "limit": f">= {HEADROOM_MIN:g}x",
                "ok": not near,
            }
        )
    scaled_max = gradients.get("max_abs", 0.0) * gradients.get("scale", 1.0)
    under = gradients.get("underflow_frac", 0.0)
    if gradients:
        checks.append(
            {
                "check": "fp16 gradients at the initial loss scale",
                "measured": f"{under:.2e} of values below 2^-24, largest scaled {scaled_max:.3g}",
                "limit": f"<= {UNDERFLOW_MAX:g} flushed",
                "ok": under <= UNDERFLOW_MAX,
            }
        )
    ratio = None
    if "fp16" in mismatch and "bf16" in mismatch:
        key = "exact_kl_mu_pi" if "exact_kl_mu_pi" in mismatch["fp16"] else "abs_log_ratio_mean"
        a, b = mismatch["bf16"].get(key, math.nan), mismatch["fp16"].get(key, math.nan)
        ratio = a / b if b else math.inf
        checks.append(
            {
                "check": f"mismatch bf16 / fp16 ({key})",
                "measured": f"{ratio:.3g}x ({a:.3g} / {b:.3g})",
                "limit": "",
                "ok": True,
            }
        )
    return checks, ratio


def _recommend(activations: list[dict], near: list[dict], gradients: dict, range_fails: bool):
    """-> (recommendation, settings, reasons)"""
    under, reasons = gradients.get("underflow_frac", 0.0), []
    if range_fails:
        settings = {
            "precision.rollout": "bf16",
            "precision.train": "bf16",
            "algorithm.preset": "grpo-seq-mis",
            "precision.lm_head": "fp32",
        }
        if len(near) > MANY_LAYERS * max(len(activations), 1):
            reasons.append(f"{len(near)} of {len(activations)} layers come within {HEADROOM_MIN:g}x of fp16's limit")
        uncurable = [r for r in near if r["where"] != "mlp_hidden"]
        if uncurable:
            names = ", ".join(f"layer {r['layer']} ({r['where']}, {FP16_MAX / r['max_abs']:.2g}x)" for r in uncurable)
            reasons.append(
                f"activations within {HEADROOM_MIN:g}x of fp16's limit in {names}: fp32 layers compute only an MLP's "
                "inner activation in fp32 and cannot keep an attention block, the residual stream or an MLP's output "
                "in range"
            )
        if under > UNDERFLOW_MAX:
            reasons.append(
                f"{under:.2e} of the gradient values flush to zero in fp16 even at the loss scale "
                f"{gradients.get('scale', 1.0):g}"
            )
        reasons.append("bf16's range holds them; its larger mismatch needs the sequence-level correction")
        return "bf16 + correction", settings, reasons
    if near:
        names = ", ".join(f"layer {r['layer']} ({r['where']})" for r in near)
        reasons.append(f"activations near fp16's limit in {names}: run those in fp32")
        settings = {
            "precision.rollout": "fp16",
            "precision.train": "fp16",
            "precision.on_activation_overflow": "fp32_layers",
        }
        return "fp16 + fp32 layers", settings, reasons
    reasons.append("fp16's range holds every layer's activations and the scaled gradients")
    return "fp16", {"precision.rollout": "fp16", "precision.train": "fp16"}, reasons


def format_advice(advice: dict) -> str:
    lines = [f"{'check':42s}{'measured':60s}{'limit':>18s}  ok"]
    for c in advice["checks"]:
        lines.append(f"{c['check']:42s}{c['measured']:60s}{c['limit']:>18s}  {'yes' if c['ok'] else 'NO'}")
    lines.append(
        f"recommendation: {advice['recommendation']}: " + " ".join(f"{k}={v}" for k, v in advice["settings"].items())
    )
    lines += [f"  - {r}" for r in advice["reasons"]]
    return "\n".join(lines)


def gradient_stats(learner, rollouts, scale: float, passes: int = 3, seed: int = 0) -> dict:
    """Gradients of a policy-gradient loss (token mean of -A log pi, random advantages of +-1 per sequence) on
    `rollouts`, in the learner's dtype (fp32 for this measure): over `passes` backward passes, the share of nonzero
    values below 2^-24 once multiplied by `scale`, and the largest |value|."""

    g = torch.Generator().manual_seed(seed)
    total = tiny = 0
    largest = 0.0
    for _ in range(passes):
        adv = torch.randint(0, 2, (len(rollouts),), generator=g).float() * 2 - 1
        n = int(rollouts.mask.sum())
        learner.weights.zero_grad()
        for idx in learner.batcher.plan(rollouts, 64):
            part = rollouts.select(idx)
            batch = learner.batch(part)
            logp = learner.logprobs(batch)
            (-(logp * adv[idx].to(logp.device)[:, None] * batch.mask).sum() / n).backward()
        for p in learner.model.parameters():
            if p.grad is None:
                continue
            v = p.grad.detach().abs().flatten()
            nz = v[v > 0]
            total += nz.numel()
            tiny += int((nz * scale < FP16_TINY).sum())
            largest = max(largest, float(v.max()))
        learner.weights.zero_grad()
    return {"underflow_frac": tiny / total if total else 0.0, "max_abs": largest, "scale": scale, "passes": passes}
