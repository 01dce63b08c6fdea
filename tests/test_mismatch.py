"""Mismatch metrics: hand-computed values, a float64 loop reference, the accumulator, edge cases."""

import math
import struct

import pytest
import torch

from unison import mismatch as mm

LN2 = 0.6931471805599453
NAN = float("nan")


def _assert_close(got, want):
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12), (got, want)


def _hand_batch():
    """3 rows: row 0 has 3 tokens, row 1 has 2, row 2 none; padding holds NaN and -inf on purpose.

    pi: [.5, .25, 1], [.25, .5]    mu: [.25, .5, .5], [.5, 1]
    r = log pi - log mu: [L, -L, L], [-L, -L]  (L = ln 2);  rho: [2, .5, 2], [.5, .5];  s = [L, -2L]
    """
    logp_pi = torch.tensor([[math.log(0.5), math.log(0.25), 0.0], [math.log(0.25), math.log(0.5), NAN], [NAN] * 3])
    logp_mu = torch.tensor(
        [[math.log(0.25), math.log(0.5), math.log(0.5)], [math.log(0.5), 0.0, -math.inf], [-math.inf] * 3]
    )
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    return logp_pi, logp_mu, mask


# every value below worked out by hand from the docstring of _hand_batch
HAND = {
    "prob_abs_diff_mean": 0.35,  # |pi - mu| = .25, .25, .5, .25, .5 -> 1.75 / 5
    "prob_abs_diff_max": 0.5,
    "prob_diff_max": 0.5,  # pi - mu = .25, -.25, .5, -.25, -.5
    "prob_diff_min": -0.5,
    "log_ratio_mean": -0.2 * LN2,  # sum r = -L over 5 tokens
    "log_ratio_min": -LN2,
    "log_ratio_max": LN2,
    "abs_log_ratio_mean": LN2,
    "k1": 0.2 * LN2,
    "k2": 0.5 * LN2**2,  # 0.5 * (5 L^2) / 5
    "k3": 0.1 + 0.2 * LN2,  # rho - r - 1 = 1-L, L-.5, 1-L, L-.5, L-.5 -> (0.5 + L) / 5
    "chi2_token": 0.75,  # rho^2 = 4, .25, 4, .25, .25 -> 8.75 / 5 - 1
    "seq_log_ratio_mean": -0.5 * LN2,  # s = L, -2L
    "seq_log_ratio_abs_mean": 1.5 * LN2,
    "seq_log_ratio_min": -2 * LN2,
    "seq_log_ratio_max": LN2,
    "seq_kl": 0.5 * LN2,
    "chi2_seq": 1.03125,  # (e^{2L} + e^{-4L}) / 2 - 1 = (4 + 1/16) / 2 - 1
    "num_tokens": 5.0,
    "num_seqs": 2.0,
    "bit_equal_frac": 0.0,  # no token's log-probs agree
    "max_abs_log_ratio": LN2,
}


def test_hand_values_every_metric():
    out = mm.mismatch_metrics(*_hand_batch())
    assert set(out) == set(mm.METRIC_KEYS) == set(HAND)
    for key, want in HAND.items():
        assert out[key] == pytest.approx(want, abs=1e-7), key
        assert isinstance(out[key], float)


def test_hand_values_small_functions():
    batch = _hand_batch()
    r = mm.token_log_ratio(*batch)
    assert r.dtype == torch.float64
    _assert_close(r, torch.tensor([[LN2, -LN2, LN2], [-LN2, -LN2, 0], [0, 0, 0]], dtype=torch.float64))
    d = mm.prob_abs_diff(*batch)
    _assert_close(d, torch.tensor([[0.25, 0.25, 0.5], [0.25, 0.5, 0], [0, 0, 0]], dtype=torch.float64))
    _assert_close(mm.seq_log_ratio(*batch), torch.tensor([LN2, -2 * LN2, 0.0], dtype=torch.float64))


def test_length_slope_hand():
    # points (3, L), (2, -2L): slope 3L per token -> 3000 L per 1K tokens, intercept L - 3 * 3L = -8L
    slope, intercept = mm.length_slope([LN2, -2 * LN2], [3, 2])
    assert slope == pytest.approx(3000 * LN2)
    assert intercept == pytest.approx(-8 * LN2)
    # exact line y = -0.001 x + 0.5 -> slope -1 per 1K tokens
    slope, intercept = mm.length_slope(torch.tensor([0.4, 0.3, -0.5]), torch.tensor([100, 200, 1000]))
    assert (slope, intercept) == (pytest.approx(-1.0), pytest.approx(0.5))
    assert mm.length_slope([0.7], [10]) == (0.0, pytest.approx(0.7))
    assert mm.length_slope([1.0, 3.0], [5, 5]) == (0.0, pytest.approx(2.0))
    assert mm.length_slope([], []) == (0.0, 0.0)


def _reference(logp_pi, logp_mu, mask):
    """Straightforward float64 loops over Python numbers."""
    toks, seqs = [], []
    for i in range(mask.shape[0]):
        row = [(float(logp_pi[i, t]), float(logp_mu[i, t])) for t in range(mask.shape[1]) if mask[i, t]]
        toks += row
        if row:
            seqs.append(sum(a - b for a, b in row))
    n, ns = len(toks), len(seqs)
    r = [a - b for a, b in toks]
    d = [math.exp(a) - math.exp(b) for a, b in toks]
    return {
        "prob_abs_diff_mean": sum(abs(x) for x in d) / n,
        "prob_abs_diff_max": max(abs(x) for x in d),
        "prob_diff_max": max(d),
        "prob_diff_min": min(d),
        "log_ratio_mean": sum(r) / n,
        "log_ratio_min": min(r),
        "log_ratio_max": max(r),
        "abs_log_ratio_mean": sum(abs(x) for x in r) / n,
        "k1": sum(-x for x in r) / n,
        "k2": 0.5 * sum(x * x for x in r) / n,
        "k3": sum(math.exp(x) - x - 1 for x in r) / n,
        "chi2_token": sum(math.exp(x) ** 2 for x in r) / n - 1,
        "seq_log_ratio_mean": sum(seqs) / ns,
        "seq_log_ratio_abs_mean": sum(abs(s) for s in seqs) / ns,
        "seq_log_ratio_min": min(seqs),
        "seq_log_ratio_max": max(seqs),
        "seq_kl": -sum(seqs) / ns,
        "chi2_seq": sum(math.exp(2 * s) for s in seqs) / ns - 1,
        "num_tokens": float(n),
        "num_seqs": float(ns),
        "bit_equal_frac": sum(struct.pack("f", a) == struct.pack("f", b) for a, b in toks) / n,
        "max_abs_log_ratio": max(abs(x) for x in r),
    }


def _random_batch(gen, b=6, t=9, scale=0.3):
    logp_mu = torch.log_softmax(torch.randn(b, t, 5, generator=gen, dtype=torch.float64), -1)[..., 0]
    logp_pi = (logp_mu + scale * torch.randn(b, t, generator=gen, dtype=torch.float64)).clamp(max=0.0)
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    lengths[0] = 0  # always one empty row
    lengths[1] = t
    mask = torch.arange(t) < lengths[:, None]
    return logp_pi, logp_mu, mask


def test_against_loop_reference():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        batch = _random_batch(gen)
        got, want = mm.mismatch_metrics(*batch), _reference(*batch)
        for key in mm.METRIC_KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_accumulator_equals_one_call_on_concatenation():
    gen = torch.Generator().manual_seed(1)
    batches = [_random_batch(gen, b=b) for b in (4, 7, 3)]
    batches.append(tuple(x[:2] for x in (torch.zeros(2, 9), torch.zeros(2, 9), torch.zeros(2, 9, dtype=torch.bool))))
    acc = mm.MismatchAccumulator()
    for batch in batches:
        acc.add(*batch)
    whole = mm.mismatch_metrics(*(torch.cat(parts) for parts in zip(*batches)))
    got = acc.result()
    for key in mm.METRIC_KEYS:
        assert got[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-14), key
    cat = [torch.cat(parts) for parts in zip(*batches)]
    keep = cat[2].any(-1)
    assert acc.seq_log_ratios == pytest.approx(mm.seq_log_ratio(*cat)[keep].tolist())
    assert acc.lengths == cat[2].sum(-1)[keep].tolist()
    assert acc.length_slope() == mm.length_slope(mm.seq_log_ratio(*cat)[keep], cat[2].sum(-1)[keep])


def test_empty_mask_gives_zeros_not_nan():
    no_tokens = torch.zeros(2, 3, dtype=torch.bool)
    out = mm.mismatch_metrics(torch.full((2, 3), NAN), torch.full((2, 3), -math.inf), no_tokens)
    assert out == dict.fromkeys(mm.METRIC_KEYS, 0.0)
    assert mm.MismatchAccumulator().result() == out
    empty = (torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert mm.mismatch_metrics(*empty) == dict.fromkeys(mm.METRIC_KEYS, 0.0)


def test_chi2_seq_overflow_is_inf_not_nan():
    # s = 400 for one sequence: exp(800) overflows float64
    logp_pi = torch.zeros(1, 2)
    logp_mu = torch.full((1, 2), -200.0)
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = mm.mismatch_metrics(logp_pi, logp_mu, mask)
    assert out["chi2_seq"] == math.inf
    assert out["chi2_token"] == pytest.approx(math.exp(400) - 1, rel=1e-9)
    assert not any(math.isnan(v) for v in out.values())


def test_identical_policies_give_zero_mismatch():
    gen = torch.Generator().manual_seed(2)
    logp, _, mask = _random_batch(gen)
    out = mm.mismatch_metrics(logp, logp.clone(), mask)
    for key in mm.METRIC_KEYS:
        if not key.startswith("num_"):
            assert out[key] == (1.0 if key == "bit_equal_frac" else 0.0), key


def test_bit_equal_frac_counts_tokens_whose_fp32_bits_agree():
    # 4 response tokens: equal bits, one ulp apart, -0.0 against +0.0 (equal as numbers, not as bits), equal; a
    # padded position whose bits differ is not counted
    one_ulp = torch.nextafter(torch.tensor(-1.5), torch.tensor(0.0)).item()
    logp_pi = torch.tensor([[-1.5, -1.5, -0.0, -2.25, 7.0]])
    logp_mu = torch.tensor([[-1.5, one_ulp, 0.0, -2.25, 9.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    out = mm.mismatch_metrics(logp_pi, logp_mu, mask)
    assert out["bit_equal_frac"] == 0.5 and out["num_tokens"] == 4.0
    assert out["max_abs_log_ratio"] == abs(-1.5 - one_ulp)  # the ulp, computed in float64


def test_large_batch_is_vectorised_and_fp32_inputs():
    gen = torch.Generator().manual_seed(3)
    logp_mu = -torch.rand(512, 2000, generator=gen)
    logp_pi = logp_mu + 1e-3 * torch.randn(512, 2000, generator=gen)
    mask = torch.ones(512, 2000, dtype=torch.bool)
    out = mm.mismatch_metrics(logp_pi, logp_mu, mask)
    assert out["num_tokens"] == 512 * 2000 and out["num_seqs"] == 512
    assert out["k2"] == pytest.approx(0.5e-6, rel=0.05)
