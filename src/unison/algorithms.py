"""RL algorithm pieces as pure tensor functions: advantages, rollout corrections, policy objectives, aggregation.

Paper "Defeating the Training-Inference Mismatch via FP16" (Qi et al. 2025), section "Algorithms". Notation:
pi_theta is the current learner (`logp`, with grad), pi_old the learner at theta' before the update (`logp_old`), mu
the sampler (inference engine) at theta' (`logp_mu`). Each family is one literal dict; `policy_loss` is the one call
site that chains a preset's choices:

    weights, m1 = CORRECTIONS[c](logp_base, logp_mu, mask, **correction_params)          # [B, T], detached
    loss_t, m2  = OBJECTIVES[o](logp, logp_old, logp_mu, adv, mask, weights, clip_low=, clip_high=)   # [B, T]
    loss        = AGGREGATIONS[a](loss_t, mask, max_len, total_tokens=, total_seqs=)     # scalar

`logp_base` is pi_old (preset ratio_base "old", the GRPO family) or sg(pi_theta) (ratio_base "current", the PG
family, which needs no extra forward pass for pi_old). Masked-out positions may hold anything; they are never read.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from unison.errors import UserError, choose

MAX_LOG_WEIGHT = 50.0  # e^50 ~ 5e21: an importance weight above this is clamped so that fp32 sums stay finite
MAX_LOG_RATIO = 20.0  # |log(pi_theta / pi_old)| is clamped here before exp, as verl does


# ---------------------------------------------------------------- advantages: rewards [N] -> advantages [N]


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one-dimensional [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise UserError(f"group size {group_size} is too small; sample at least 2 responses per prompt")
    if rewards.numel() % group_size:
        raise UserError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}; "
            "give every prompt exactly group_size responses"
        )
    return rewards.float().view(-1, group_size)  # [N/G, G], groups are contiguous


def grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (R_i - mean_g R) / (std_g R + 1e-8), paper "Algorithms".

    std is the unbiased one (divides by G - 1), like verl's torch.std. A group with equal rewards gets A = 0.
    """
    r = _grouped(rewards, group_size)  # [N/G, G]
    adv = (r - r.mean(dim=-1, keepdim=True)) / (r.std(dim=-1, keepdim=True, unbiased=True) + 1e-8)
    return adv.flatten()  # [N]


def drgrpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = R_i - mean_g R (no std division)."""
    r = _grouped(rewards, group_size)  # [N/G, G]
    return (r - r.mean(dim=-1, keepdim=True)).flatten()  # [N]


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_g R)."""
    r = _grouped(rewards, group_size)  # [N/G, G]
    others = (r.sum(dim=-1, keepdim=True) - r) / (group_size - 1)  # [N/G, G]
    return (r - others).flatten()  # [N]


ADVANTAGES = {"grpo": grpo_advantages, "drgrpo": drgrpo_advantages, "rloo": rloo_advantages}


# ------------------------------------------- rollout corrections: (logp_base, logp_mu, mask) -> weights [B, T]


def _log_ratio(logp_base: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(pi_base / mu) per response token, 0 elsewhere, detached fp32. [B, T]"""
    return torch.where(mask, logp_base.detach().float() - logp_mu.detach().float(), 0.0)


def _log_cap(name: str, value: float) -> float:
    if not value > 0:
        raise UserError(f"correction parameter {name} must be positive, got {value}; e.g. {name}: 2.0")
    return math.log(value)


def _finish(w: torch.Tensor, mask: torch.Tensor, zeroed: torch.Tensor, clipped: torch.Tensor):
    """Zero the weights off the response; metrics over response tokens. Sequence corrections count tokens too."""
    w = torch.where(mask, w, 0.0).detach()  # [B, T]
    n = mask.sum().clamp(min=1)
    w_max = w.max() if w.numel() else w.new_zeros(())
    mean, top, masked, clip = torch.stack(
        [w.sum() / n, w_max, (zeroed & mask).sum() / n, (clipped & mask).sum() / n]
    ).tolist()
    return w, {"is/weight_mean": mean, "is/weight_max": top, "is/masked_frac": masked, "is/clipped_frac": clip}


def no_correction(logp_base: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor):
    """No rollout correction: w_t = 1 (what the paper's GRPO, Dr.GRPO and GSPO runs use)."""
    mask = mask.bool()
    never = torch.zeros_like(mask)
    return _finish(mask.float(), mask, never, never)


def token_tis(logp_base: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0):
    """Token-level truncated IS, paper "GRPO-Token-TIS": w_t = min(pi_base,t / mu_t, C); C = 2 (oat tis_c)."""
    mask = mask.bool()
    r = _log_ratio(logp_base, logp_mu, mask)  # [B, T]
    log_c = _log_cap("cap", cap)
    w = torch.exp(r.clamp(max=min(log_c, MAX_LOG_WEIGHT)))  # [B, T]
    return _finish(w, mask, torch.zeros_like(mask), r > log_c)


def token_mis(logp_base: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor, *, cap: float = 2.0):
    """Token-level masked IS: w_t = rho_t * 1{rho_t <= C}, rho_t = pi_base,t / mu_t.

    Tokens above C are dropped (weight 0) rather than truncated; those below keep their ratio, as in the paper's
    sequence-level MIS applied per token.
    """
    mask = mask.bool()
    r = _log_ratio(logp_base, logp_mu, mask)  # [B, T]
    keep = r <= _log_cap("cap", cap)  # [B, T]
    w = torch.where(keep, torch.exp(r.clamp(max=MAX_LOG_WEIGHT)), 0.0)  # [B, T]
    return _finish(w, mask, ~keep, torch.zeros_like(mask))


def seq_tis(logp_base: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor, *, cap: float = 3.0):
    """Sequence-level truncated IS: w_i = min(prod_t pi_base,t / mu_t, C), the same for every token of sequence i.

    Paper "PG-Seq-IS" uses C = infinity; the product is taken in log space and clamped at e^MAX_LOG_WEIGHT.
    """
    mask = mask.bool()
    r = _log_ratio(logp_base, logp_mu, mask)  # [B, T]
    log_rho = r.sum(dim=-1, keepdim=True)  # [B, 1]
    log_c = _log_cap("cap", cap)
    w = torch.exp(log_rho.clamp(max=min(log_c, MAX_LOG_WEIGHT))).expand_as(r)  # [B, T]
    return _finish(w, mask, torch.zeros_like(mask), (log_rho > log_c).expand_as(r))


def seq_mis(logp_base: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor, *, cap: float = 3.0):
    """Sequence-level masked IS, paper "GRPO-Seq-MIS": w_i = rho_i * 1{rho_i <= C}, rho_i = prod_t pi_base,t / mu_t.

    Masked, not truncated: a sequence above C drops out of the loss. C = 3 in the paper, 10 in oat, 3 in TRL.
    """
    mask = mask.bool()
    r = _log_ratio(logp_base, logp_mu, mask)  # [B, T]
    log_rho = r.sum(dim=-1, keepdim=True)  # [B, 1]
    keep = (log_rho <= _log_cap("cap", cap)).expand_as(r)  # [B, T]
    w = torch.where(keep, torch.exp(log_rho.clamp(max=MAX_LOG_WEIGHT)), 0.0)  # [B, T]
    return _finish(w, mask, ~keep, torch.zeros_like(mask))


def icepop(
    logp_base: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor, *, alpha: float = 0.5, beta: float = 5.0
):
    """IcePop (Ling team 2025, paper "related corrections"): w_t = rho_t * 1{alpha <= rho_t <= beta}."""
    mask = mask.bool()
    log_a, log_b = _log_cap("alpha", alpha), _log_cap("beta", beta)
    if log_a > log_b:
        raise UserError(f"icepop needs alpha <= beta, got alpha {alpha} and beta {beta}; e.g. alpha 0.5, beta 5")
    r = _log_ratio(logp_base, logp_mu, mask)  # [B, T]
    keep = (r >= log_a) & (r <= log_b)  # [B, T]
    w = torch.where(keep, torch.exp(r.clamp(max=log_b)), 0.0)  # [B, T]
    return _finish(w, mask, ~keep, torch.zeros_like(mask))


CORRECTIONS = {
    "none": no_correction,
    "token_tis": token_tis,
    "token_mis": token_mis,
    "seq_tis": seq_tis,
    "seq_mis": seq_mis,
    "icepop": icepop,
}


# ------------------------------------------------------------- policy objectives: -> per-token loss [B, T]


def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float):
    """max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) and where the clipped branch is the larger one."""
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clip_binding_frac(logp, logp_ref, advantages, mask, clip_low: float, clip_high: float) -> float:
    """The share of response tokens on which PPO's clip would be the binding term for the ratio pi / pi_ref:
    A > 0 and ratio > 1 + clip_high, or A < 0 and ratio < 1 - clip_low (`_clipped_surrogate`'s test).

    With pi = the learner before its first update and pi_ref = mu (the engine), the policy has not moved and only the
    mismatch can put a token there: the "phantom clipping" of a run that takes mu as pi_old."""
    mask = mask.bool()
    ratio = torch.exp((logp.detach().float() - logp_ref.detach().float()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    _, binding = _clipped_surrogate(ratio, advantages.float().unsqueeze(-1), clip_low, clip_high)
    return float((binding & mask).sum() / mask.sum().clamp(min=1))


def ppo_clip(logp, logp_old, logp_mu, advantages, mask, weights, *, clip_low=0.2, clip_high=0.28):
    """PPO clipped surrogate as GRPO uses it, paper "Algorithms" (clip-higher of DAPO, Yu et al. 2025):

    r_t = pi_theta,t / pi_old,t;  l_t = max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high)) * w_t.
    log r_t is clamped to [-20, 20] before exp (as verl does); logp_mu is used only through the weights.
    """
    mask = mask.bool()
    adv = advantages.detach().float().unsqueeze(-1)  # [B, 1]
    log_ratio = torch.where(mask, logp.float() - logp_old.detach().float(), 0.0)  # [B, T]
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # [B, T]
    loss, was_clipped = _clipped_surrogate(ratio, adv, clip_low, clip_high)  # [B, T]
    loss = torch.where(mask, loss * weights, 0.0)  # [B, T]
    n = mask.sum().clamp(min=1)
    clip_frac, ratio_mean = torch.stack([(was_clipped & mask).sum() / n, (ratio.detach() * mask).sum() / n]).tolist()
    return loss, {"policy/clip_frac": clip_frac, "policy/ratio_mean": ratio_mean}


def gspo(logp, logp_old, logp_mu, advantages, mask, weights, *, clip_low=3e-4, clip_high=4e-4):
    """GSPO (Zheng et al. 2025), paper "Algorithms", in its GSPO-token form:

    s_i = exp(mean_t(log pi_theta,t - log pi_old,t));  s_i,t = sg(s_i) * pi_theta,t / sg(pi_theta,t)
    l_t = max(-A s_i,t, -A clip(s_i,t, 1 - clip_low, 1 + clip_high)) * w_t,  clip range [1 - 3e-4, 1 + 4e-4].
    s_i,t has the value s_i and the gradient s_i * grad log pi_theta,t, so with seq_mean_token_mean aggregation
    this is GSPO's sequence-level gradient. GSPO ignores mu: logp_mu is unused, but a chosen correction's weights
    are still applied (the gspo preset uses none). Metrics are per sequence.
    """
    mask = mask.bool()
    adv = advantages.detach().float()  # [B]
    logp_m = torch.where(mask, logp.float(), 0.0)  # [B, T]
    diff = torch.where(mask, logp_m - logp_old.detach().float(), 0.0)  # [B, T]
    lengths = mask.sum(dim=-1)  # [B]
    log_s = (diff.sum(dim=-1) / lengths.clamp(min=1)).detach().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)  # [B]
    ratio = torch.exp(log_s.unsqueeze(-1) + logp_m - logp_m.detach())  # [B, T], value s_i
    loss, _ = _clipped_surrogate(ratio, adv.unsqueeze(-1), clip_low, clip_high)  # [B, T]
    loss = torch.where(mask, loss * weights, 0.0)  # [B, T]
    s = log_s.exp()  # [B]
    _, seq_clipped = _clipped_surrogate(s, adv, clip_low, clip_high)  # [B]
    has = lengths > 0  # [B]
    n = has.sum().clamp(min=1)
    clip_frac, ratio_mean = torch.stack([(seq_clipped & has).sum() / n, (s * has).sum() / n]).tolist()
    return loss, {"policy/clip_frac": clip_frac, "policy/ratio_mean": ratio_mean}


def pg(logp, logp_old, logp_mu, advantages, mask, weights, *, clip_low=None, clip_high=None):
    """REINFORCE with importance weights, paper "PG-Seq-IS", "PG-Seq-MIS", "PG-Token-IS":

    l_t = -w_t * A * log pi_theta(y_t), with w_t the detached correction weight. The pg presets set ratio_base
    "current", so the correction sees sg(pi_theta) instead of pi_old: e.g. w = min(rho_theta, C) with
    rho_theta = prod_t sg(pi_theta,t) / mu_t. logp_old, logp_mu and the clip range are not used.
    """
    mask = mask.bool()
    adv = advantages.detach().float().unsqueeze(-1)  # [B, 1]
    logp_m = torch.where(mask, logp.float(), 0.0)  # [B, T]
    return torch.where(mask, -weights * adv * logp_m, 0.0), {}


OBJECTIVES = {"ppo_clip": ppo_clip, "gspo": gspo, "pg": pg}


# --------------------------------------------------------- aggregation: per-token loss [B, T] -> scalar
# A mini-batch split into micro-batches: pass the mini-batch's `aggregation_counts` as total_tokens/total_seqs to
# every micro-batch; the micro-batch losses then sum exactly to the mini-batch's loss.


def aggregation_counts(mask: torch.Tensor) -> tuple[int, int]:
    """(response tokens, sequences with at least one token): the totals to pass when splitting a mini-batch."""
    mask = mask.bool()
    return int(mask.sum()), int(mask.any(dim=-1).sum())


def _count(total, default: torch.Tensor):
    total = default if total is None else total
    return total.clamp(min=1) if isinstance(total, torch.Tensor) else max(total, 1)


def token_mean(per_token_loss, mask, max_len=None, *, total_tokens=None, total_seqs=None):
    """Token-mean (GRPO, DAPO): sum of l_t over every response token / number of response tokens."""
    mask = mask.bool()
    total = torch.where(mask, per_token_loss, 0.0).sum()
    return total / _count(total_tokens, mask.sum())


def seq_mean_token_mean(per_token_loss, mask, max_len=None, *, total_tokens=None, total_seqs=None):
    """Seq-mean-token-mean (original GRPO, GSPO): mean over sequences of (sum_t l_t / |y_i|). Empty rows skipped."""
    mask = mask.bool()
    lengths = mask.sum(dim=-1)  # [B]
    per_seq = torch.where(mask, per_token_loss, 0.0).sum(dim=-1) / lengths.clamp(min=1)  # [B]
    return per_seq.sum() / _count(total_seqs, (lengths > 0).sum())


def seq_mean_token_sum_norm(per_token_loss, mask, max_len=None, *, total_tokens=None, total_seqs=None):
    """Seq-mean-token-sum-norm (Dr.GRPO): mean over sequences of (sum_t l_t / max_len), max_len the configured
    maximum response length (default: the T dimension), a constant so that no length bias enters the gradient."""
    mask = mask.bool()
    norm = per_token_loss.shape[-1] if max_len is None else max_len
    per_seq = torch.where(mask, per_token_loss, 0.0).sum(dim=-1) / norm  # [B]
    return per_seq.sum() / _count(total_seqs, mask.any(dim=-1).sum())


AGGREGATIONS = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}


# --------------------------------------- KL penalty to a reference policy: (logp, logp_ref) -> per token [B, T]
# Schulman's estimators of KL(pi || ref) from tokens sampled from pi, with d = log ref - log pi:
#   k1 = -d (unbiased, can be negative), k2 = d^2 / 2 (biased, low variance), k3 = exp(d) - 1 - d (unbiased, >= 0).
# verl's `low_var_kl` is k3 with d clamped to [-20, 20] (as here: exp(20) ~ 5e8 stays finite in fp32).
def kl_k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    return logp - logp_ref


def kl_k2(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp_ref - logp) ** 2


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    d = (logp_ref - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(d) - 1 - d


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(estimator: str, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The estimator's per-token KL(pi || ref), 0 off the response. logp, logp_ref, mask [B, T] -> [B, T]"""
    return choose("KL estimator", KL_ESTIMATORS, estimator)(logp, logp_ref).masked_fill(~mask.bool(), 0.0)


# ------------------------------------------------------------------------ presets and the one call site

RATIO_BASES = ("old", "current")


@dataclass(frozen=True)
class Preset:
    """One algorithm of the paper as a choice on each axis.

    advantage, objective, correction, aggregation  names in ADVANTAGES, OBJECTIVES, CORRECTIONS, AGGREGATIONS
    clip_low, clip_high   the objective's clip range [1 - clip_low, 1 + clip_high] (unused by pg)
    correction_params     keyword arguments of the correction (cap; alpha and beta for icepop)
    ratio_base            "old": corrections compare pi_old with mu (needs the extra pi_old forward pass);
                          "current": they compare sg(pi_theta) with mu (the PG presets)
    """

    advantage: str
    objective: str
    correction: str
    aggregation: str
    clip_low: float = 0.2
    clip_high: float = 0.28
    correction_params: dict = field(default_factory=dict)
    ratio_base: str = "old"

    def __post_init__(self) -> None:
        choose("advantage estimator", ADVANTAGES, self.advantage)
        choose("objective", OBJECTIVES, self.objective)
        choose("aggregation", AGGREGATIONS, self.aggregation)
        correct = choose("correction", CORRECTIONS, self.correction)
        if self.ratio_base not in RATIO_BASES:
            raise UserError(f"unknown ratio_base {self.ratio_base!r}; choose one of: {', '.join(RATIO_BASES)}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise UserError(
                f"clip range needs 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, "
                f"{self.clip_high}; e.g. clip_low 0.2, clip_high 0.28"
            )
        params = [p for p in inspect.signature(correct).parameters.values() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(self.correction_params) - {p.name for p in params})
        if unknown:
            valid = ", ".join(p.name for p in params) or "none"
            raise UserError(
                f"correction {self.correction!r} takes no parameter {', '.join(unknown)}; it takes: {valid}"
            )


_INF, _CUR = math.inf, "current"

PRESETS = {
    "grpo": Preset("grpo", "ppo_clip", "none", "token_mean"),
    "dr-grpo": Preset("drgrpo", "ppo_clip", "none", "seq_mean_token_sum_norm"),
    "grpo-token-tis": Preset("grpo", "ppo_clip", "token_tis", "token_mean", correction_params={"cap": 2.0}),
    "grpo-seq-mis": Preset("grpo", "ppo_clip", "seq_mis", "token_mean", correction_params={"cap": 3.0}),
    "gspo": Preset("grpo", "gspo", "none", "seq_mean_token_mean", clip_low=3e-4, clip_high=4e-4),
    "pg-seq-is": Preset("grpo", "pg", "seq_tis", "token_mean", correction_params={"cap": _INF}, ratio_base=_CUR),
    "pg-seq-mis": Preset("grpo", "pg", "seq_mis", "token_mean", correction_params={"cap": 3.0}, ratio_base=_CUR),
    "pg-token-is": Preset("grpo", "pg", "token_tis", "token_mean", correction_params={"cap": _INF}, ratio_base=_CUR),
}
# pg-token-is: per-token ratios sg(pi_theta,t) / mu_t, untruncated (C = infinity) like PG-Seq-IS; the pg presets
# aggregate by token mean, which the paper does not state.


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name raises UserError listing the valid ones."""
    return choose("algorithm preset", PRESETS, name)


@dataclass(frozen=True)
class KLTerm:
    """A KL penalty to a reference policy in the loss: + coef x the estimator's per-token KL(pi_theta || ref),
    aggregated as the policy loss is. logp_ref [B, T] log ref(y_t), without grad."""

    coef: float
    estimator: str
    logp_ref: torch.Tensor


def policy_loss(
    preset: Preset | str | Mapping,
    logp,
    logp_old,
    logp_mu,
    advantages,
    mask,
    max_len=None,
    total_tokens=None,
    total_seqs=None,
    kl: KLTerm | None = None,
):
    """The one call site of every policy loss: correction -> objective -> aggregation (+ the KL term). Returns
    (loss, metrics).

    preset        a Preset, a preset name, or a mapping of Preset fields
    logp          [B, T] log pi_theta(y_t), with grad          logp_old  [B, T] log pi_old (None for ratio_base current)
    logp_mu       [B, T] log mu(y_t) from the sampler          advantages [B] one per sequence
    mask          [B, T] bool response tokens                  max_len   configured max response length
    total_tokens, total_seqs   the mini-batch's `aggregation_counts` when this is one of its micro-batches
    kl            a KL penalty to the reference policy (`KLTerm`), with its metric kl/ref (per-token mean)
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    elif isinstance(preset, Mapping):
        preset = Preset(**preset)
    mask = mask.bool()
    if preset.ratio_base == "current":
        logp_base = logp.detach()
    elif logp_old is None:
        raise ValueError(f"objective {preset.objective!r} with ratio_base 'old' needs logp_old (pi_old)")
    else:
        logp_base = logp_old
    weights, metrics = CORRECTIONS[preset.correction](logp_base, logp_mu, mask, **preset.correction_params)
    per_token, obj_metrics = OBJECTIVES[preset.objective](
        logp,
        logp_base if logp_old is None else logp_old,
        logp_mu,
        advantages,
        mask,
        weights,
        clip_low=preset.clip_low,
        clip_high=preset.clip_high,
    )
    aggregate = AGGREGATIONS[preset.aggregation]
    loss = aggregate(per_token, mask, max_len, total_tokens=total_tokens, total_seqs=total_seqs)
    metrics = metrics | obj_metrics
    if kl is not None:  # + beta * aggregate_t KL_t(pi_theta || ref)
        per_kl = kl_penalty(kl.estimator, logp, kl.logp_ref, mask)  # [B, T]
        loss = loss + kl.coef * aggregate(per_kl, mask, max_len, total_tokens=total_tokens, total_seqs=total_seqs)
        metrics = {**metrics, "kl/ref": per_kl.detach().sum() / mask.sum().clamp(min=1)}
    return loss, metrics
