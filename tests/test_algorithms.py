"""Algorithm pieces: hand-computed advantages, corrections, objectives and aggregations; presets against their
formulas written out element by element; micro-batch equivalence; gradient direction; errors listing names."""

import math

import pytest
import torch

from unison import algorithms as alg
from unison.errors import UserError, choose

NAN = float("nan")
MASK = torch.tensor([[True, True, True], [True, True, False]])


def _close(got, want, atol=1e-6):
    want = torch.as_tensor(want, dtype=got.dtype)
    assert got.shape == want.shape and torch.allclose(got, want, atol=atol), (got, want)


# ----------------------------------------------------------------------------------------------- advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0, 1.0, 1.0, 1.0])  # three groups of 3


def test_grpo_advantages_hand():
    # group 1: mean 1/3, unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = 1/sqrt(3); group 2: mean 4, std 2; group 3: std 0
    want = [1.1547005383792517, -0.5773502691896258, -0.5773502691896258, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    _close(alg.ADVANTAGES["grpo"](REWARDS, 3), want)


def test_drgrpo_advantages_hand():
    _close(alg.ADVANTAGES["drgrpo"](REWARDS, 3), [2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0, 0.0, 0.0, 0.0])


def test_rloo_advantages_hand():
    # 1 - mean(0, 0) = 1;  0 - mean(1, 0) = -0.5;  2 - mean(4, 6) = -3;  6 - mean(2, 4) = 3
    _close(alg.ADVANTAGES["rloo"](REWARDS, 3), [1.0, -0.5, -0.5, -3.0, 0.0, 3.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("name", sorted(alg.ADVANTAGES))
def test_advantages_reject_bad_groups(name):
    with pytest.raises(UserError, match="groups of 4"):
        alg.ADVANTAGES[name](REWARDS, 4)
    with pytest.raises(UserError, match="at least 2"):
        alg.ADVANTAGES[name](REWARDS, 1)


# ----------------------------------------------------------------------------------------------- corrections
# rho = pi_old / mu: row 0 [4, 0.5, 1] (product 2), row 1 [0.25, 1.5] (product 0.375); padding is NaN

LOGP_MU = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.0, NAN]])
LOGP_OLD = LOGP_MU + torch.log(torch.tensor([[4.0, 0.5, 1.0], [0.25, 1.5, 1.0]]))

CORRECTION_CASES = {  # name, params -> weights, (weight_mean, weight_max, masked_frac, clipped_frac)
    ("none", ()): ([[1, 1, 1], [1, 1, 0]], (1.0, 1.0, 0.0, 0.0)),
    ("token_tis", (("cap", 2.0),)): ([[2, 0.5, 1], [0.25, 1.5, 0]], (1.05, 2.0, 0.0, 0.2)),
    ("token_mis", (("cap", 2.0),)): ([[0, 0.5, 1], [0.25, 1.5, 0]], (0.65, 1.5, 0.2, 0.0)),
    ("seq_tis", (("cap", 1.5),)): ([[1.5, 1.5, 1.5], [0.375, 0.375, 0]], (1.05, 1.5, 0.0, 0.6)),
    ("seq_mis", (("cap", 1.5),)): ([[0, 0, 0], [0.375, 0.375, 0]], (0.15, 0.375, 0.6, 0.0)),
    ("icepop", (("alpha", 0.3), ("beta", 2.0))): ([[0, 0.5, 1], [0, 1.5, 0]], (0.6, 1.5, 0.4, 0.0)),
}


@pytest.mark.parametrize("case", list(CORRECTION_CASES), ids=lambda c: c[0])
def test_corrections_hand(case):
    name, params = case
    want_w, want_m = CORRECTION_CASES[case]
    logp_old = LOGP_OLD.clone().requires_grad_()
    w, metrics = alg.CORRECTIONS[name](logp_old, LOGP_MU, MASK, **dict(params))
    _close(w, want_w)
    assert not w.requires_grad
    keys = ("is/weight_mean", "is/weight_max", "is/masked_frac", "is/clipped_frac")
    assert set(metrics) == set(keys)
    for key, want in zip(keys, want_m):
        assert metrics[key] == pytest.approx(want, abs=1e-6), key


def test_corrections_cover_the_whole_family():
    assert {name for name, _ in CORRECTION_CASES} == set(alg.CORRECTIONS)


def test_sequence_weight_with_infinite_cap_stays_finite():
    logp_old, logp_mu, mask = torch.zeros(1, 2), torch.full((1, 2), -200.0), torch.ones(1, 2, dtype=torch.bool)
    w, _ = alg.CORRECTIONS["seq_tis"](logp_old, logp_mu, mask, cap=math.inf)
    _close(w, [[math.exp(alg.MAX_LOG_WEIGHT)] * 2], atol=1e16)
    w, _ = alg.CORRECTIONS["token_tis"](logp_old, logp_mu, mask, cap=math.inf)
    assert torch.isfinite(w).all()


def test_correction_parameters_are_checked():
    with pytest.raises(UserError, match="positive"):
        alg.CORRECTIONS["token_tis"](LOGP_OLD, LOGP_MU, MASK, cap=0.0)
    with pytest.raises(UserError, match="alpha <= beta"):
        alg.CORRECTIONS["icepop"](LOGP_OLD, LOGP_MU, MASK, alpha=2.0, beta=1.0)


# ----------------------------------------------------------------------------------------------- objectives

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.25, -3.0, NAN]])
ADV = torch.tensor([1.0, -1.0])
WEIGHTS = torch.tensor([[1.0, 2.0, 1.0], [0.5, 1.0, 0.0]])


def _leaf(x):
    return x.detach().clone().requires_grad_()


def test_ppo_clip_hand_values_and_grads():
    # r = [1.5, 0.5, 1.1], [1.5, 0.5]; clip range [0.8, 1.28]
    # A = +1: max(-r, -clip r) = [-1.28 (clipped), -0.5, -1.1];  A = -1: max(r, clip r) = [1.5, 0.8 (clipped)]
    logp = _leaf(OLD + torch.log(torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.0]])))
    loss, metrics = alg.OBJECTIVES["ppo_clip"](logp, OLD, None, ADV, MASK, WEIGHTS, clip_low=0.2, clip_high=0.28)
    _close(loss, [[-1.28, -1.0, -1.1], [0.75, 0.8, 0.0]])
    assert metrics == {"policy/clip_frac": pytest.approx(0.4), "policy/ratio_mean": pytest.approx(1.02)}
    loss.sum().backward()
    # d/dlogp (-A r w) = -A r w where unclipped, 0 where clipped or padded
    _close(logp.grad, [[0.0, -1.0, -1.1], [0.75, 0.0, 0.0]])


def test_gspo_hand_values_and_grads():
    # log pi - log pi_old: row 0 [0.3, -0.1, 0.1] (mean 0.1), row 1 [-0.2, 0.0] (mean -0.1)
    logp = _leaf(OLD + torch.tensor([[0.3, -0.1, 0.1], [-0.2, 0.0, 0.0]]))
    loss, metrics = alg.OBJECTIVES["gspo"](logp, OLD, None, ADV, MASK, MASK.float())  # default [1-3e-4, 1+4e-4]
    # s = e^0.1 = 1.105 > 1.0004 with A > 0 -> -1.0004;  s = e^-0.1 = 0.905 < 0.9997 with A < 0 -> 0.9997
    _close(loss, [[-1.0004, -1.0004, -1.0004], [0.9997, 0.9997, 0.0]])
    assert metrics == {"policy/clip_frac": 1.0, "policy/ratio_mean": pytest.approx(1.0050041680558035)}
    loss.sum().backward()
    _close(logp.grad, torch.zeros(2, 3))

    logp = _leaf(logp)
    loss, metrics = alg.OBJECTIVES["gspo"](logp, OLD, None, ADV, MASK, MASK.float(), clip_low=0.2, clip_high=0.28)
    _close(loss, [[-1.1051709180756477] * 3, [0.9048374180359595] * 2 + [0.0]])
    assert metrics["policy/clip_frac"] == 0.0
    loss.sum().backward()
    # gradient of -A s_i,t is -A s_i on every token of sequence i: the sequence ratio, token by token
    _close(logp.grad, [[-1.1051709180756477] * 3, [0.9048374180359595] * 2 + [0.0]])


def test_pg_hand_values_and_grads():
    logp = _leaf(OLD)
    loss, metrics = alg.OBJECTIVES["pg"](logp, None, None, ADV, MASK, WEIGHTS)
    # -w A log pi: row 0 -[1, 2, 1] * [-1, -2, -0.5];  row 1 [0.5, 1] * [-0.25, -3]
    _close(loss, [[1.0, 4.0, 0.5], [-0.125, -3.0, 0.0]])
    assert metrics == {}
    loss.sum().backward()
    _close(logp.grad, [[-1.0, -2.0, -1.0], [0.5, 1.0, 0.0]])


def test_positive_advantage_raises_logp_under_ppo_clip():
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=gen) - 0.1
    mu = old + 0.01 * torch.randn(4, 6, generator=gen)
    mask = torch.ones(4, 6, dtype=torch.bool)
    for sign in (1.0, -1.0):
        for name in ("grpo", "grpo-token-tis", "gspo", "pg-seq-is"):
            logp = _leaf(old)
            loss, _ = alg.policy_loss(name, logp, old, mu, torch.full((4,), sign), mask, max_len=6)
            loss.backward()
            step = -logp.grad  # one gradient-descent step on the loss
            assert (sign * step > 0).all(), (name, sign)


# ----------------------------------------------------------------------------------------------- aggregation

LOSS3 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN], [7.0, 7.0, 7.0]])
MASK3 = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])  # row 2 empty


def test_aggregations_hand():
    agg = alg.AGGREGATIONS
    assert agg["token_mean"](LOSS3, MASK3).item() == pytest.approx(3.0)  # 15 / 5
    assert agg["seq_mean_token_mean"](LOSS3, MASK3).item() == pytest.approx(3.25)  # (6/3 + 9/2) / 2
    assert agg["seq_mean_token_sum_norm"](LOSS3, MASK3, 4).item() == pytest.approx(1.875)  # (6/4 + 9/4) / 2
    assert agg["seq_mean_token_sum_norm"](LOSS3, MASK3, None).item() == pytest.approx(2.5)  # (6/3 + 9/3) / 2
    assert alg.aggregation_counts(MASK3) == (5, 2)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert all(fn(LOSS3[:2], empty, 3).item() == 0.0 for fn in agg.values())


@pytest.mark.parametrize("name", sorted(alg.AGGREGATIONS))
def test_micro_batches_sum_to_the_mini_batch(name):
    gen = torch.Generator().manual_seed(1)
    loss = torch.randn(8, 7, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 0, 3, 1, 5, 7, 2, 4])
    mask = torch.arange(7) < lengths[:, None]
    fn = alg.AGGREGATIONS[name]
    whole = fn(loss, mask, 10)
    tokens, seqs = alg.aggregation_counts(mask)
    parts = [fn(loss[a:b], mask[a:b], 10, total_tokens=tokens, total_seqs=seqs) for a, b in ((0, 3), (3, 5), (5, 8))]
    assert sum(p.item() for p in parts) == pytest.approx(whole.item(), rel=1e-12)
    parts_t = [
        fn(loss[a:b], mask[a:b], 10, total_tokens=torch.tensor(tokens), total_seqs=torch.tensor(seqs))
        for a, b in ((0, 4), (4, 8))
    ]
    assert sum(p.item() for p in parts_t) == pytest.approx(whole.item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------- presets


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def _reference_loss(name, logp, old, mu, adv, mask, max_len):
    """Each preset's loss written out element by element with Python floats."""
    rows = []  # per sequence: list of per-token losses
    for i in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if mask[i, t]]
        lp, lo, lm = ([float(x[i, t]) for t in idx] for x in (logp, old, mu))
        a = float(adv[i])
        if not idx:
            continue
        ppo = [max(-a * math.exp(p - o), -a * _clip(math.exp(p - o), 0.8, 1.28)) for p, o in zip(lp, lo)]
        rho_old = math.exp(sum(o - m for o, m in zip(lo, lm)))
        rho_cur = math.exp(sum(p - m for p, m in zip(lp, lm)))
        if name in ("grpo", "dr-grpo"):
            rows.append(ppo)
        elif name == "grpo-token-tis":
            rows.append([term * min(math.exp(o - m), 2.0) for term, o, m in zip(ppo, lo, lm)])
        elif name == "grpo-seq-mis":
            rows.append([term * rho_old * (rho_old <= 3.0) for term in ppo])
        elif name == "gspo":
            s = math.exp(sum(p - o for p, o in zip(lp, lo)) / len(idx))
            rows.append([max(-a * s, -a * _clip(s, 1 - 3e-4, 1 + 4e-4))] * len(idx))
        elif name == "pg-seq-is":
            rows.append([-rho_cur * a * p for p in lp])
        elif name == "pg-seq-mis":
            rows.append([-rho_cur * (rho_cur <= 3.0) * a * p for p in lp])
        elif name == "pg-token-is":
            rows.append([-math.exp(p - m) * a * p for p, m in zip(lp, lm)])
    if name == "dr-grpo":
        return sum(sum(r) / max_len for r in rows) / len(rows)
    if name == "gspo":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) for r in rows) / sum(len(r) for r in rows)


def _preset_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    b, t = 6, 5
    mu = torch.log_softmax(torch.randn(b, t, 4, generator=gen), -1)[..., 0]
    old = mu + 0.4 * torch.randn(b, t, generator=gen)
    logp = old + 0.3 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, generator=gen)
    mask = torch.arange(t) < torch.tensor([5, 3, 0, 1, 4, 5])[:, None]
    return logp, old, mu, adv, mask


@pytest.mark.parametrize("name", sorted(alg.PRESETS))
def test_preset_loss_matches_formula(name):
    for seed in range(3):
        logp, old, mu, adv, mask = _preset_inputs(seed)
        loss, metrics = alg.policy_loss(name, _leaf(logp), old, mu, adv, mask, max_len=8)
        want = _reference_loss(name, logp, old, mu, adv, mask, 8)
        assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6), seed
        assert "is/weight_mean" in metrics


def test_preset_fields():
    p = alg.PRESETS
    assert (p["grpo"].clip_low, p["grpo"].clip_high) == (0.2, 0.28)
    assert p["dr-grpo"].advantage == "drgrpo" and p["dr-grpo"].aggregation == "seq_mean_token_sum_norm"
    assert p["grpo-token-tis"].correction_params == {"cap": 2.0}
    assert p["grpo-seq-mis"].correction_params == {"cap": 3.0}
    assert (p["gspo"].clip_low, p["gspo"].clip_high, p["gspo"].correction) == (3e-4, 4e-4, "none")
    for name in ("pg-seq-is", "pg-seq-mis", "pg-token-is"):
        assert (p[name].ratio_base, p[name].objective, p[name].advantage) == ("current", "pg", "grpo")
    assert p["pg-seq-is"].correction_params == {"cap": math.inf}
    assert alg.get_preset("gspo") is p["gspo"]


def test_pg_preset_weights_carry_no_gradient_and_need_no_logp_old():
    logp, _, mu, adv, mask = _preset_inputs(4)
    leaf = _leaf(logp)
    loss, _ = alg.policy_loss("pg-seq-is", leaf, None, mu, adv, mask)
    loss.backward()
    rho = torch.exp(torch.where(mask, logp - mu, 0.0).sum(-1, keepdim=True))  # [B, 1]
    want = torch.where(mask, -rho * adv[:, None] / mask.sum(), 0.0)
    _close(leaf.grad, want, atol=1e-5)
    with pytest.raises(ValueError, match="logp_old"):
        alg.policy_loss("grpo", leaf, None, mu, adv, mask)


def test_policy_loss_accepts_a_mapping_of_fields():
    logp, old, mu, adv, mask = _preset_inputs(5)
    fields = {
        "advantage": "grpo",
        "objective": "ppo_clip",
        "correction": "token_tis",
        "aggregation": "token_mean",
        "correction_params": {"cap": 2.0},
    }
    a, _ = alg.policy_loss(fields, logp, old, mu, adv, mask)
    b, _ = alg.policy_loss("grpo-token-tis", logp, old, mu, adv, mask)
    assert a.item() == b.item()


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("family", ["ADVANTAGES", "CORRECTIONS", "OBJECTIVES", "AGGREGATIONS", "PRESETS"])
def test_unknown_names_list_the_valid_ones(family):
    table = getattr(alg, family)
    with pytest.raises(UserError) as err:
        choose(family.lower(), table, "no-such-name")
    assert all(name in str(err.value) for name in table)


def test_unknown_preset_and_fields_raise_user_error():
    with pytest.raises(UserError) as err:
        alg.get_preset("ppo")
    assert all(name in str(err.value) for name in alg.PRESETS)
    with pytest.raises(UserError, match="gspo, pg, ppo_clip"):
        alg.Preset("grpo", "nope", "none", "token_mean")
    with pytest.raises(UserError, match="ratio_base"):
        alg.Preset("grpo", "pg", "none", "token_mean", ratio_base="new")
    with pytest.raises(UserError, match="takes: cap"):
        alg.Preset("grpo", "ppo_clip", "seq_mis", "token_mean", correction_params={"c": 3.0})
    with pytest.raises(UserError, match="clip"):
        alg.Preset("grpo", "ppo_clip", "none", "token_mean", clip_low=1.5)
