"""The routing mismatch of MoE models: expert-set flips and router-probability gaps by hand, the engine's (on its fast
path, identical prompts prefilled once and finished rows dropped) and the learner's recorded decisions agreeing in
fp32, the fast path recording what the fallback records, and a 2-step train of each MoE architecture in each
precision."""

from __future__ import annotations

import json

import pytest
import torch

from unison.config import ModelConfig, MoeConfig
from unison.routing import flips, routing_metrics

MOE = ("qwen2-moe", "qwen3-moe", "mixtral")


def test_flips_compare_expert_sets_not_their_order():
    a = torch.tensor([[0, 1], [1, 0], [2, 3]])
    b = torch.tensor([[1, 0], [0, 2], [2, 3]])
    assert flips(a, b, 4).tolist() == [False, True, False]


def test_routing_metrics_by_hand():
    # one token, two layers, three experts, top-1
    la = torch.tensor([[[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]]])  # [B=1, T=1, L=2, E=3]
    lb = torch.tensor([[[[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]]]])
    ia, ib = la.argmax(-1, keepdim=True), lb.argmax(-1, keepdim=True)
    ia[..., 0, 0] = ib[..., 0, 0] = 0  # layer 0: a tie, both take expert 0
    m = routing_metrics(la, ia, lb, ib, torch.ones(1, 1, dtype=torch.bool))
    p = torch.tensor([2.0, 0.0, 0.0]).softmax(-1)
    gap1 = float((p - p[[1, 0, 2]]).abs().mean())
    assert m["routing_flip_frac/layer_0"] == 0.0 and m["routing_flip_frac/layer_1"] == 1.0
    assert m["routing_flip_frac"] == 0.5
    assert m["router_prob_gap/layer_0"] == 0.0 and m["router_prob_gap/layer_1"] == pytest.approx(gap1)
    assert m["router_prob_gap"] == pytest.approx(gap1 / 2)


@pytest.mark.parametrize("arch", MOE)
def test_engine_and_learner_route_alike_in_fp32(arch, tmp_path):
    from unison.archs import save_tiny
    from unison.learner import Learner
    from unison.models import load_model, load_tokenizer
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    d = save_tiny(arch, tmp_path / arch)
    tok = load_tokenizer(d)
    f32 = torch.float32
    learner = Learner(load_model(d, device="cpu", dtype=f32), PrecisionPolicy(f32, f32))
    engine = NativeEngine(load_model(d, device="cpu", dtype=f32), f32, "cpu", seed=0)
    assert engine.decode_path() == ("fast", "")
    # identical prompts (one prefill for each), and rows that stop early (dropped from the batch)
    ro = engine.generate(
        [tok("hello world")["input_ids"], tok("a b")["input_ids"]] * 4,
        SamplingParams(max_new_tokens=12, stop_token_ids=tuple(range(60, 140))),
        keep_routing=True,
    )
    assert (ro.lengths < ro.lengths.max()).sum() >= 2
    logits, idx = ro.routing
    layers = engine.model.config.num_hidden_layers
    assert logits.shape[:3] == (*ro.response_ids.shape, layers)
    assert idx.shape[-1] == engine.model.config.num_experts_per_tok
    theirs = learner.routing(ro)
    m = routing_metrics(logits, idx, *theirs, ro.mask)
    assert m["routing_flip_frac"] == 0.0 and m["router_prob_gap"] < 1e-6
    torch.testing.assert_close(theirs[0][ro.mask], logits[ro.mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", MOE)
def test_the_fast_path_records_what_the_fallback_records(arch):
    # greedy, so both paths decode the same tokens; rows of other lengths, identical prompts, rows dropped
    from unison.archs import tiny_model
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    prompts = [list(range(5, 5 + n)) for n in (3, 9, 14, 6)] * 3
    p = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=tuple(range(60, 120)))
    out = {}
    for path in ("fast", "fallback"):
        eng = NativeEngine(tiny_model(arch), torch.float32, "cpu", seed=0)
        eng.forced_fallback = "tested" if path == "fallback" else ""
        assert eng.decode_path()[0] == path
        out[path] = eng.generate(prompts, p, keep_routing=True)
    fast, slow = out["fast"], out["fallback"]
    assert torch.equal(fast.response_ids, slow.response_ids) and len(set(fast.lengths.tolist())) > 1
    m = fast.mask
    assert fast.routing[0].shape == slow.routing[0].shape and torch.equal(fast.routing[1][m], slow.routing[1][m])
    torch.testing.assert_close(fast.routing[0][m], slow.routing[0][m], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(fast.replay, slow.replay))


@pytest.mark.parametrize("replay", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_two_steps_of_each_moe_architecture(precision, replay, tmp_path):
    from unison.archs import save_tiny
    from unison.cli import main

    for arch in MOE:
        d = save_tiny(arch, tmp_path / arch)
        out = tmp_path / f"run-{arch}"
        code = main(
            [
                "train",
                "--model",
                str(d),
                "--precision",
                precision,
                "--steps",
                "2",
                "--out",
                str(out),
                "rollout.prompts_per_step=2",
                "rollout.group_size=2",
                "rollout.max_new_tokens=8",
                "optim.train_batch_size=4",
                "run.eval_prompts=2",
                "run.progress=false",
                "data.max_prompts=4",
                f"moe.routing_replay={str(replay).lower()}",
            ]
        )
        assert code == 0, arch
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(0 <= r["routing/routing_flip_frac"] <= 1 for r in rows)
        if precision == "fp32" or replay:  # the same experts: fp32 agrees, and replay routes with the engine's
            assert all(r["routing/routing_flip_frac"] == 0 for r in rows)


@pytest.mark.parametrize("arch", MOE)
def test_replay_makes_the_learner_route_as_the_engine_did(arch, tmp_path):
    from unison.archs import save_tiny
    from unison.learner import Learner
    from unison.mismatch import mismatch_metrics
    from unison.models import load_model, load_tokenizer
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    d = save_tiny(arch, tmp_path / arch)
    tok = load_tokenizer(d)
    bf16 = torch.bfloat16
    engine = NativeEngine(load_model(d, device="cpu", dtype=torch.float32), bf16, "cpu", seed=0, matmul="native")
    ro = engine.generate([tok("hello world")["input_ids"]] * 48, SamplingParams(max_new_tokens=24), keep_routing=True)
    assert [len(r) for r in ro.replay] == [len(p) + int(n) for p, n in zip(ro.prompt_ids, ro.lengths)]
    got = {}
    for replay in (False, True):
        learner = Learner(
            load_model(d, device="cpu", dtype=torch.float32),
            PrecisionPolicy(bf16, bf16),
            model_cfg=ModelConfig(matmul="native"),
            moe=MoeConfig(routing_replay=replay),
        )
        m = routing_metrics(*ro.routing, *learner.routing(ro), ro.mask)
        got[replay] = (m["routing_flip_frac"], mismatch_metrics(learner.recompute(ro), ro.logprobs, ro.mask)["k3"])
        if replay:  # the learner's chosen experts are the engine's, to the last token fed
            assert torch.equal(learner.routing(ro)[1][ro.mask], ro.routing[1][ro.mask])
    assert got[True][0] == 0.0 and got[True][1] < got[False][1]


def test_replay_with_no_plan_changes_nothing(tmp_path):
    from unison.archs import save_tiny
    from unison.models import load_model
    from unison.routing import install_replay

    d = save_tiny("mixtral", tmp_path / "m")
    a, b = (load_model(d, device="cpu", dtype=torch.float32) for _ in range(2))
    assert len(install_replay(b)) == b.config.num_hidden_layers
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_replay_on_a_dense_model_is_refused(tiny_dir, tmp_path, capsys):
    from unison.cli import main

    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_dir), "moe.routing_replay=true", f"run.out={out}", "run.steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs a mixture-of-experts model" in err[0] and not out.exists()


def test_the_engine_self_test_routes_an_moe_learner_with_the_engines_experts(monkeypatch):
    # the self-test holds the engine's numerics to their band: with the engine's experts the learner's log-probs in
    # bf16 come closer to the engine's than routing itself, and a learner that may not replay is the comparison
    from unison.archs import tiny_model
    from unison.conformance import self_test
    from unison.learner import Learner
    from unison.precision import PrecisionPolicy
    from unison.rollout.native import NativeEngine

    bf16 = PrecisionPolicy(torch.bfloat16, torch.bfloat16)
    engine = NativeEngine(tiny_model("qwen3-moe", seed=3), torch.bfloat16, "cpu", seed=0, matmul="native")
    learner = Learner(tiny_model("qwen3-moe", seed=3), bf16, model_cfg=ModelConfig(matmul="native"))
    assert learner.moe and not learner.routing_replay
    prompts = [[5 + i, 9, 17 + i, 40] for i in range(8)]
    replayed = self_test(engine, learner, prompts, tokens=32)["self_test/abs_log_ratio_mean"]
    assert not learner.routing_replay  # as it was
    monkeypatch.setattr(Learner, "replaying", lambda self: __import__("contextlib").nullcontext())
    plain = self_test(engine, learner, prompts, tokens=32)["self_test/abs_log_ratio_mean"]
    assert replayed < plain
