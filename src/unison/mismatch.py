"""The train-inference mismatch: how far the learner's token probabilities (pi) sit from the sampler's (mu).

Paper "Defeating the Training-Inference Mismatch via FP16" (Qi et al. 2025), figure "offline mismatch" and the
metrics the public code logs (oat: k1, k2, max/min of the probability gap; verl: |pi - mu|, k3, chi2).

Every function takes the same three tensors:

    logp_pi  [B, T]  log pi(y_t): the learner's log-prob of each sampled token
    logp_mu  [B, T]  log mu(y_t): the sampler's log-prob of the same token
    mask     [B, T]  bool, True on response tokens; what sits elsewhere (padding, NaN, -inf) is never read

with r_t = log pi_t - log mu_t, rho_t = exp(r_t) and, per sequence, s_i = sum_t r_t = log(pi(y_i) / mu(y_i)).
The samples come from mu, so the KL estimators below estimate KL(mu || pi). Everything is computed in float64 and
returned as Python floats. Rows without tokens are left out of the sequence statistics; a batch without any token
gives zeros (never NaN) and num_tokens 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

METRIC_KEYS = (
    "prob_abs_diff_mean",
    "prob_abs_diff_max",
    "prob_diff_max",
    "prob_diff_min",
    "log_ratio_mean",
    "log_ratio_min",
    "log_ratio_max",
    "abs_log_ratio_mean",
    "k1",
    "k2",
    "k3",
    "chi2_token",
    "seq_log_ratio_mean",
    "seq_log_ratio_abs_mean",
    "seq_log_ratio_min",
    "seq_log_ratio_max",
    "seq_kl",
    "chi2_seq",
    "num_tokens",
    "num_seqs",
    "bit_equal_frac",
    "max_abs_log_ratio",
)


def _prepare(logp_pi: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor):
    if logp_pi.shape != logp_mu.shape or logp_pi.shape != mask.shape:
        raise ValueError(
            f"shapes differ: logp_pi {tuple(logp_pi.shape)}, logp_mu {tuple(logp_mu.shape)}, mask {tuple(mask.shape)}"
        )
    return logp_pi.detach().double(), logp_mu.detach().double(), mask.bool()


def bits_equal(logp_pi: torch.Tensor, logp_mu: torch.Tensor) -> torch.Tensor:
    """Where the two log-probs have the same fp32 bit pattern (precision.bitwise's promise). bool [B, T]"""
    return logp_pi.detach().float().view(torch.int32) == logp_mu.detach().float().view(torch.int32)


def _expm1_or_inf(x: float) -> float:
    """exp(x) - 1, accurate near 0, and inf (never NaN, never an exception) when exp(x) overflows."""
    try:
        return math.expm1(x)
    except OverflowError:
        return math.inf


def _chi2(log_values: torch.Tensor) -> float:
    """mean(exp(2 v)) - 1 over a flat float64 tensor, computed in log space: inf on overflow, 0 when empty."""
    if log_values.numel() == 0:
        return 0.0
    log_mean = torch.logsumexp(2.0 * log_values, dim=0).item() - math.log(log_values.numel())
    return _expm1_or_inf(log_mean)


def token_log_ratio(logp_pi: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r_t = log pi_t - log mu_t on response tokens, 0 elsewhere. float64 [B, T]."""
    lp, lm, m = _prepare(logp_pi, logp_mu, mask)
    return torch.where(m, lp - lm, 0.0)  # [B, T]


def prob_abs_diff(logp_pi: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|pi_t - mu_t| in probability space on response tokens, 0 elsewhere (verl's probs diff). float64 [B, T]."""
    lp, lm, m = _prepare(logp_pi, logp_mu, mask)
    return torch.where(m, (lp.exp() - lm.exp()).abs(), 0.0)  # [B, T]


def seq_log_ratio(logp_pi: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s_i = sum_t r_t = log(pi(y_i) / mu(y_i)), the paper's sequence-level mismatch; 0 for empty rows. float64 [B]."""
    return token_log_ratio(logp_pi, logp_mu, mask).sum(dim=-1)  # [B]


def length_slope(seq_log_ratio: Sequence[float] | torch.Tensor, lengths: Sequence[float] | torch.Tensor):
    """Least-squares line s_i = a * length_i + b; returns (a * 1000, b): the slope per 1K response tokens.

    The paper's figure "offline mismatch" fits this line: about -1.01 per 1K tokens in BF16, -0.07 in FP16. Fewer
    than two points, or all lengths equal, give slope 0 and the mean of s as the intercept.
    """
    y = torch.as_tensor(seq_log_ratio, dtype=torch.float64).flatten()  # [n]
    x = torch.as_tensor(lengths, dtype=torch.float64).flatten()  # [n]
    if x.shape != y.shape:
        raise ValueError(f"{y.numel()} sequence log-ratios but {x.numel()} lengths")
    if y.numel() == 0:
        return 0.0, 0.0
    dx = x - x.mean()
    var = dx.square().sum().item()
    if y.numel() < 2 or var == 0.0:
        return 0.0, y.mean().item()
    slope = (dx * (y - y.mean())).sum().item() / var
    return slope * 1000.0, y.mean().item() - slope * x.mean().item()


# Token statistics kept by the accumulator: how each one merges across batches.
_SUMS = ("n", "abs_pdiff_sum", "r_sum", "abs_r_sum", "r2_sum", "k3_sum", "bit_equal")
_MAXES = ("abs_pdiff_max", "pdiff_max", "r_max")
_MINS = ("pdiff_min", "r_min")


def _logaddexp(a: float, b: float) -> float:
    top = max(a, b)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.exp(a - top) + math.exp(b - top))


class MismatchAccumulator:
    """Mismatch metrics over several batches, equal to one `mismatch_metrics` call on their concatenation.

    Keeps float64 sums, minima and maxima of the token statistics, log-sum-exp of 2 r_t for chi2_token, and every
    non-empty sequence's s_i and length (`seq_log_ratios`, `lengths`) for the sequence statistics and the slope.
    """

    def __init__(self) -> None:
        self.stats = {k: 0.0 for k in _SUMS} | {k: -math.inf for k in _MAXES} | {k: math.inf for k in _MINS}
        self.lse_2r = -math.inf  # log sum_t exp(2 r_t)
        self.seq_log_ratios: list[float] = []
        self.lengths: list[int] = []

    def add(self, logp_pi: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor) -> None:
        same_bits = bits_equal(logp_pi, logp_mu)  # [B, T]
        lp, lm, m = _prepare(logp_pi, logp_mu, mask)
        lengths = m.sum(dim=-1)  # [B]
        keep = lengths > 0  # [B]
        self.seq_log_ratios += torch.where(m, lp - lm, 0.0).sum(dim=-1)[keep].tolist()
        self.lengths += lengths[keep].tolist()
        if not bool(keep.any()):
            return
        lp, lm = lp[m], lm[m]  # [N]
        r = lp - lm  # [N]
        pdiff = lp.exp() - lm.exp()  # [N]
        values = torch.stack(
            [
                torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device),
                pdiff.abs().sum(),
                r.sum(),
                r.abs().sum(),
                r.square().sum(),
                (torch.expm1(r) - r).sum(),
                same_bits[m].sum().double(),
                pdiff.abs().max(),
                pdiff.max(),
                r.max(),
                pdiff.min(),
                r.min(),
                torch.logsumexp(2.0 * r, dim=0),
            ]
        ).tolist()
        batch = dict(zip(_SUMS + _MAXES + _MINS, values[:-1]))
        for key in _SUMS:
            self.stats[key] += batch[key]
        for key in _MAXES:
            self.stats[key] = max(self.stats[key], batch[key])
        for key in _MINS:
            self.stats[key] = min(self.stats[key], batch[key])
        self.lse_2r = _logaddexp(self.lse_2r, values[-1])

    def length_slope(self) -> tuple[float, float]:
        """(slope per 1K tokens, intercept) of s_i against response length over every sequence added."""
        return length_slope(self.seq_log_ratios, self.lengths)

    def result(self) -> dict[str, float]:
        """The metrics of everything added so far; keys in `METRIC_KEYS`."""
        out = dict.fromkeys(METRIC_KEYS, 0.0)
        st = self.stats
        n = st["n"]
        if n > 0:
            out |= {
                "prob_abs_diff_mean": st["abs_pdiff_sum"] / n,
                "prob_abs_diff_max": st["abs_pdiff_max"],
                "prob_diff_max": st["pdiff_max"],
                "prob_diff_min": st["pdiff_min"],
                "log_ratio_mean": st["r_sum"] / n,
                "log_ratio_min": st["r_min"],
                "log_ratio_max": st["r_max"],
                "abs_log_ratio_mean": st["abs_r_sum"] / n,
                "k1": -st["r_sum"] / n,
                "k2": 0.5 * st["r2_sum"] / n,
                "k3": st["k3_sum"] / n,
                "chi2_token": _expm1_or_inf(self.lse_2r - math.log(n)),
                "num_tokens": float(n),
                "bit_equal_frac": st["bit_equal"] / n,
                "max_abs_log_ratio": max(abs(st["r_min"]), abs(st["r_max"])),
            }
        if self.seq_log_ratios:
            s = torch.tensor(self.seq_log_ratios, dtype=torch.float64)  # [n_seqs]
            mean = s.mean().item()
            out |= {
                "seq_log_ratio_mean": mean,
                "seq_log_ratio_abs_mean": s.abs().mean().item(),
                "seq_log_ratio_min": s.min().item(),
                "seq_log_ratio_max": s.max().item(),
                "seq_kl": -mean,
                "chi2_seq": _chi2(s),
                "num_seqs": float(s.numel()),
            }
        return out


def mismatch_metrics(logp_pi: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Every mismatch metric of one batch, keys in `METRIC_KEYS` (unprefixed; callers namespace them `mismatch/`).

    prob_abs_diff_mean/max  |pi_t - mu_t|              prob_diff_max/min  pi_t - mu_t (probability space)
    log_ratio_mean/min/max  r_t                        abs_log_ratio_mean mean_t |r_t| (token-level headline)
    k1, k2, k3              KL(mu || pi) per token     chi2_token         mean_t rho_t^2 - 1
    seq_log_ratio_mean/abs_mean/min/max  s_i           seq_kl             mean_i(-s_i), the paper's KL[mu||pi]
    chi2_seq                mean_i exp(2 s_i) - 1      num_tokens, num_seqs  counts (rows without tokens skipped)
    """
    acc = MismatchAccumulator()
    acc.add(logp_pi, logp_mu, mask)
    return acc.result()


SPLIT_KEYS = ("abs_log_ratio_mean", "log_ratio_mean", "k3", "seq_kl")


def staleness_split(
    logp_now: torch.Tensor, logp_sampled: torch.Tensor, logp_mu: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """A stale batch's off-policy gap log pi_now - log mu in two parts that add up to it, token by token:

        mismatch  log pi_sampled - log mu       the learner at the weights the batch was sampled with, against
                                                the engine (the same weights: only the kernels differ)
        policy    log pi_now - log pi_sampled   the learner now against the learner then (the updates since)

    Each part's `SPLIT_KEYS` and the total's, as `mismatch_*`, `policy_*`, `total_*`."""
    parts = {
        "mismatch": mismatch_metrics(logp_sampled, logp_mu, mask),
        "policy": mismatch_metrics(logp_now, logp_sampled, mask),
        "total": mismatch_metrics(logp_now, logp_mu, mask),
    }
    return {f"{name}_{k}": part[k] for name, part in parts.items() for k in SPLIT_KEYS}


# ---- exact divergences from the whole distributions ------------------------------------------------------------
EXACT_KEYS = (
    "exact_kl_mu_pi",
    "exact_kl_pi_mu",
    "exact_tv",
    "exact_seq_kl_mu_pi",
    "exact_seq_kl_pi_mu",
    "exact_seq_tv",
    "support_mismatch_frac",
    "k3_vs_exact",
    "seq_kl_vs_exact",
)


def token_divergences(logq_pi: torch.Tensor, logq_mu: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """At each position, from the two whole distributions (log-probabilities over the vocabulary, -inf outside a
    truncated support; [..., V]): KL(mu || pi), KL(pi || mu) and the total variation 1/2 sum_v |mu_v - pi_v|, in
    float64 [...]. A token that one distribution can sample and the other cannot makes that KL infinite."""
    lp, lm = logq_pi.detach().double(), logq_mu.detach().double()
    lp, lm = lp - lp.logsumexp(-1, keepdim=True), lm - lm.logsumexp(-1, keepdim=True)  # each sums to 1 in float64
    p, m = lp.exp(), lm.exp()
    kl_mu_pi = torch.where(m > 0, m * (lm - lp), 0.0).sum(-1)
    kl_pi_mu = torch.where(p > 0, p * (lp - lm), 0.0).sum(-1)
    tv = 0.5 * (p - m).abs().sum(-1)
    return kl_mu_pi, kl_pi_mu, tv


EXACT_CHUNK_ELEMENTS = 2**22  # vocabulary entries per part of `masked_divergences`: 32 MiB per float64 temporary


def masked_divergences(
    logq_pi: torch.Tensor, logq_mu: torch.Tensor, mask: torch.Tensor, chunk_elements: int = EXACT_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_divergences` at the positions of `mask` ([B, T] bool) of two [B, T, V] distributions, in parts of at
    most `chunk_elements` entries, so that its float64 temporaries stay small for a large vocabulary and long
    responses (a [B, T, V] float64 tensor would be 4 GB for 64 x 160 tokens over 49K). -> ([B, T, 3] float64: KL(mu ||
    pi), KL(pi || mu), total variation; [B, T] bool: the supports differ), zero and False off the mask."""
    B, T, V = logq_pi.shape
    where = mask.reshape(-1).nonzero()[:, 0]
    kls = torch.zeros(B * T, 3, dtype=torch.float64)
    differ = torch.zeros(B * T, dtype=torch.bool)
    lp, lm = logq_pi.reshape(B * T, V), logq_mu.reshape(B * T, V)
    step = max(1, chunk_elements // max(1, V))
    for a in range(0, len(where), step):
        idx = where[a : a + step]
        p, q = lp[idx], lm[idx]
        kls[idx] = torch.stack(token_divergences(p, q), -1)
        differ[idx] = (torch.isfinite(p) != torch.isfinite(q)).any(-1)
    return kls.reshape(B, T, 3), differ.reshape(B, T)


class ExactAccumulator:
    """The exact per-position divergences of batches (`token_divergences` at every sampled position, from the
    rollout engine's distribution mu and the learner's pi), summed per sequence.

    exact_kl_mu_pi, exact_kl_pi_mu, exact_tv      means over response tokens
    exact_seq_kl_mu_pi, _pi_mu, exact_seq_tv       means over sequences of the per-sequence sums: by the chain rule
                                                   the sequence-level KL(mu || pi) is the expectation of the sum of
                                                   the per-position KLs, so this averages exact terms over sampled
                                                   prefixes where `seq_kl` averages one sampled log-ratio each
    support_mismatch_frac                          share of positions whose supports differ (top-k/top-p)
    k3_vs_exact, seq_kl_vs_exact                   the sampled-token estimators against these: k3 / exact_kl_mu_pi
                                                   and seq_kl / exact_seq_kl_mu_pi (1 when they agree)
    """

    def __init__(self) -> None:
        self.tok = torch.zeros(3, dtype=torch.float64)
        self.seq: list[torch.Tensor] = []
        self.tokens = 0
        self.mismatched = 0

    def add(self, logq_pi: torch.Tensor, logq_mu: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.bool()
        kls, differ = masked_divergences(logq_pi, logq_mu, m)  # [B, T, 3], [B, T]
        self.tok += kls.sum((0, 1))
        rows = m.any(-1)
        self.seq.append(kls.sum(1)[rows])
        self.tokens += int(m.sum())
        self.mismatched += int(differ.sum())

    def merge(self, others: list[ExactAccumulator]) -> ExactAccumulator:
        """This accumulator with what `others` (say, the other ranks') hold added."""
        for o in others:
            self.tok += o.tok
            self.seq += o.seq
            self.tokens += o.tokens
            self.mismatched += o.mismatched
        return self

    def result(self, estimated: dict | None = None) -> dict[str, float]:
        """The keys of `EXACT_KEYS`; the estimator comparisons with `estimated` (a `mismatch_metrics` result)."""
        out = dict.fromkeys(EXACT_KEYS, 0.0)
        if not self.tokens:
            return out
        tok = (self.tok / self.tokens).tolist()
        seq = torch.cat(self.seq).mean(0).tolist()
        out.update(zip(("exact_kl_mu_pi", "exact_kl_pi_mu", "exact_tv"), tok))
        out.update(zip(("exact_seq_kl_mu_pi", "exact_seq_kl_pi_mu", "exact_seq_tv"), seq))
        out["support_mismatch_frac"] = self.mismatched / self.tokens
        if estimated is not None:
            out["k3_vs_exact"] = _ratio(estimated.get("k3", 0.0), out["exact_kl_mu_pi"])
            out["seq_kl_vs_exact"] = _ratio(estimated.get("seq_kl", 0.0), out["exact_seq_kl_mu_pi"])
        return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) else float("nan")


def exact_metrics(
    logq_pi: torch.Tensor, logq_mu: torch.Tensor, mask: torch.Tensor, estimated: dict | None = None
) -> dict[str, float]:
    """`ExactAccumulator` over one batch."""
    acc = ExactAccumulator()
    acc.add(logq_pi, logq_mu, mask)
    return acc.result(estimated)
