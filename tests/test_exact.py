"""Exact divergences from the two engines' whole distributions: hand-computed values, truncated supports, per
sequence sums against a float64 loop, and what the native engine and the learner hand over."""

from __future__ import annotations

import json
import math

import pytest
import torch

from unison.config import ModelConfig
from unison.mismatch import ExactAccumulator, exact_metrics, masked_divergences, token_divergences


def test_token_divergences_by_hand():
    mu, pi = torch.tensor([0.5, 0.3, 0.2]).log(), torch.tensor([0.4, 0.4, 0.2]).log()
    kl_mu_pi, kl_pi_mu, tv = token_divergences(pi, mu)
    assert kl_mu_pi.item() == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4), rel=1e-6)
    assert kl_pi_mu.item() == pytest.approx(0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.3), rel=1e-6)
    assert tv.item() == pytest.approx(0.1, rel=1e-6)


def test_truncated_supports():
    mu = torch.tensor([0.5, 0.3, 0.2]).log()
    pi = torch.tensor([0.6, 0.4, 0.0]).log()  # top-2: the third token is outside pi's support
    kl_mu_pi, kl_pi_mu, tv = token_divergences(pi, mu)
    assert kl_mu_pi.item() == math.inf  # mu samples a token pi cannot
    assert kl_pi_mu.item() == pytest.approx(0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.3), rel=1e-6)
    assert tv.item() == pytest.approx(0.5 * (0.1 + 0.1 + 0.2), rel=1e-6)
    r = exact_metrics(pi[None, None], mu[None, None], torch.ones(1, 1, dtype=torch.bool))
    assert r["support_mismatch_frac"] == 1.0 and r["exact_kl_mu_pi"] == math.inf


def test_sequence_sums_against_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 7
    lp = torch.randn(B, T, V, generator=g).log_softmax(-1)
    lm = (torch.randn(B, T, V, generator=g) * 0.5 + lp).log_softmax(-1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    acc = ExactAccumulator()
    acc.add(lp[:2], lm[:2], mask[:2])
    acc.add(lp[2:], lm[2:], mask[2:])
    r = acc.result({"k3": 0.25, "seq_kl": 1.0})
    per_tok, per_seq = [], []
    for i in range(B):
        s = 0.0
        for t in range(T):
            if mask[i, t]:
                p, m = lp[i, t].double().exp(), lm[i, t].double().exp()
                p, m = p / p.sum(), m / m.sum()
                kl = float((m * (m.log() - p.log())).sum())
                per_tok.append(kl)
                s += kl
        if mask[i].any():
            per_seq.append(s)
    assert r["exact_kl_mu_pi"] == pytest.approx(sum(per_tok) / len(per_tok), rel=1e-9)
    assert r["exact_seq_kl_mu_pi"] == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-9)  # the empty row left out
    assert r["k3_vs_exact"] == pytest.approx(0.25 / r["exact_kl_mu_pi"])
    merged = ExactAccumulator()
    merged.add(lp[:1], lm[:1], mask[:1])
    other = ExactAccumulator()
    other.add(lp[1:], lm[1:], mask[1:])
    assert merged.merge([other]).result() == pytest.approx(acc.result())  # two ranks' parts, as one


@pytest.mark.parametrize("chunk", [1, 7, 8, 100, 2**22])
def test_masked_divergences_in_parts_equal_the_whole(chunk):
    """Computed a few positions at a time (a part of `chunk` vocabulary entries), the divergences are those of the
    whole batch at once, zero off the mask, and the support check is the same."""
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 4, 8
    lp = torch.randn(B, T, V, generator=g).log_softmax(-1)
    lm = (torch.randn(B, T, V, generator=g) * 0.3 + lp).log_softmax(-1)
    lm[1, 2, 5] = -math.inf  # a truncated support at one position
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    kls, differ = masked_divergences(lp, lm, mask, chunk_elements=chunk)
    whole = torch.where(mask[..., None], torch.stack(token_divergences(lp, lm), -1), 0.0)
    assert torch.equal(kls, whole)
    assert differ.tolist() == [[False] * 4, [False, False, True, False], [False] * 4]


def test_native_engine_keeps_the_distributions_it_samples_from():
    from unison.models import load_model, load_tokenizer, resolve_model_dir
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    path = resolve_model_dir("builtin")
    tok = load_tokenizer(path)
    prompts = [tok("12+34=")["input_ids"], tok("5+7=")["input_ids"]] * 3
    params = SamplingParams(max_new_tokens=16, top_k=20, top_p=0.9, stop_token_ids=(tok.eos_token_id,))
    runs = []
    for keep in (False, True):
        engine = NativeEngine(load_model(path, device="cpu", dtype=torch.float32), torch.float16, "cpu", seed=3)
        runs.append(engine.generate(prompts, params, keep_distributions=keep))
    plain, kept = runs
    assert plain.distributions is None and torch.equal(plain.response_ids, kept.response_ids)
    d = kept.distributions
    assert d.shape[:2] == kept.response_ids.shape
    picked = d.gather(-1, kept.response_ids[..., None]).squeeze(-1)
    assert torch.equal(picked[kept.mask], kept.logprobs[kept.mask])  # the reported log mu is read off the same q
    assert (d[kept.mask].isinf().sum(-1) >= d.shape[-1] - 20).all()  # top-k 20: the rest is outside the support
    assert (d[~kept.mask] == 0).all()


def test_learner_and_engine_distributions_agree_in_fp32():
    from unison.learner import Learner
    from unison.models import load_model, load_tokenizer, resolve_model_dir
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    path = resolve_model_dir("builtin")
    tok = load_tokenizer(path)
    engine = NativeEngine(load_model(path, device="cpu", dtype=torch.float32), torch.float32, "cpu", seed=0)
    fp32 = PrecisionPolicy(torch.float32, torch.float32)
    learner = Learner(load_model(path, device="cpu", dtype=torch.float32), fp32)
    ro = engine.generate([tok("40+2=")["input_ids"]] * 4, SamplingParams(max_new_tokens=24), keep_distributions=True)
    r = exact_metrics(learner.distributions(ro), ro.distributions, ro.mask)
    assert 0 <= r["exact_kl_mu_pi"] < 1e-9 and r["exact_tv"] < 1e-5 and r["support_mismatch_frac"] == 0


# ---- the LM head in fp32 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("matmul", ["native", "fp32-accumulate"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_lm_head_in_both_engines(dtype, matmul):
    from unison.conformance import SELF_TEST_BANDS
    from unison.learner import Learner
    from unison.models import load_model, load_tokenizer, resolve_model_dir
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    path = resolve_model_dir("builtin")
    tok = load_tokenizer(path)
    policy = PrecisionPolicy(dtype, dtype, lm_head_fp32=True)
    learner = Learner(load_model(path, device="cpu", dtype=torch.float32), policy, model_cfg=ModelConfig(matmul=matmul))
    engine = NativeEngine(
        load_model(path, device="cpu", dtype=torch.float32), dtype, "cpu", seed=0, matmul=matmul, lm_head="fp32"
    )
    head = engine.model.get_output_embeddings().weight
    assert head.dtype == torch.float32 and learner.model.get_output_embeddings().weight.dtype == torch.float32
    assert engine.model.model.layers[0].mlp.up_proj.weight.dtype == dtype  # the rest stays in the rollout dtype
    exported = dict(learner.export_weights(dtype))
    assert {n for n, t in exported.items() if t.dtype == torch.float32} == learner.fp32_names
    assert learner.sync(engine)["sync/checksum_ok"] == 1.0  # the engine holds the fp32 head exactly
    # the tied embeddings still give the rollout dtype (the head's fp32 values rounded)
    ids = torch.tensor([tok("12+34=")["input_ids"]])
    emb = engine.model.get_input_embeddings()(ids)
    assert emb.dtype == dtype and torch.equal(emb, torch.nn.functional.embedding(ids, head).to(dtype))
    ro = engine.generate([tok("12+34=")["input_ids"]] * 8, SamplingParams(max_new_tokens=24), keep_distributions=True)
    logp = learner.recompute(ro)
    gap = (logp - ro.logprobs)[ro.mask].abs().mean().item()
    assert 0 < gap < SELF_TEST_BANDS[dtype]
    logits = learner.forward.response_logits(learner.batch(ro))
    assert logits.dtype == torch.float32  # not rounded to the train dtype


def test_a_training_step_logs_the_exact_divergences_and_their_time(tmp_path):
    from unison.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "data.subset=builtin",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=16",
            "optim.train_batch_size=4",
            "run.steps=1",
            "run.progress=false",
            "metrics.exact_divergence=true",
            f"run.out={out}",
        ]
    )
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert code == 0 and row["mismatch/exact_kl_mu_pi"] >= 0 and row["perf/exact_divergence_seconds"] > 0
