"""Sampling while learning (rollout.max_staleness > 0): the schedule, the split of the off-policy gap, resume,
refusals, a failing engine thread, and no engine state surviving a weight load."""

import json
import math
from pathlib import Path

import pytest
import torch
from test_train import params_of, tiny_cfg

from unison.ahead import split_rows
from unison.algorithms import clip_binding_frac
from unison.errors import RunFault, UserError
from unison.mismatch import staleness_split
from unison.trainer import train


def varied(tmp_path, **extra):
    """Settings whose rewards vary (so that the weights move) and a held-out set."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{i}-3:", "answer": "0"}}\n' for i in range(10, 30)))
    return {
        "data.source": str(prompts),
        "data.reward": f"{Path(__file__).parent / 'reward_fixture.py'}:odd_char_sum",  # any token can flip it
        "data.template": "plain",
        "precision.rollout": "fp16",
        "precision.train": "fp16",
        "rollout.max_staleness": 1,
        "algorithm.staleness_correction": "rollout",
        "run.threads": "1",  # fixed: with auto the learner's thread count follows the engine's timing
        # a random model seldom samples its EOS, and a response cut at the limit gets reward 0: stop strings end most
        # responses early, so that the rewards vary (and the weights move) whatever the CPU samples
        "rollout.stop": list("0123456789abcdefghij"),
        **extra,
    }


def rows_of(run, drop=("perf/",)):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith(drop)} for x in lines]


# ---- the metrics, by hand ------------------------------------------------------------------------------------------
def test_clip_binding_frac_by_hand():
    # ratios e^0.3 = 1.35, e^-0.3 = 0.74, e^0.1 = 1.11, e^0.3; clip 0.2 / 0.28
    logp = torch.tensor([[0.3, -0.3, 0.1, 0.3]])
    ref = torch.zeros(1, 4)
    mask = torch.tensor([[True, True, True, False]])
    # A > 0: only ratio > 1.28 binds (the first token); the fourth is masked
    assert clip_binding_frac(logp, ref, torch.tensor([1.0]), mask, 0.2, 0.28) == pytest.approx(1 / 3)
    # A < 0: only ratio < 0.8 binds (the second token)
    assert clip_binding_frac(logp, ref, torch.tensor([-1.0]), mask, 0.2, 0.28) == pytest.approx(1 / 3)
    # equal log-probs: nothing binds, whatever the advantage
    assert clip_binding_frac(ref, ref, torch.tensor([5.0]), mask, 0.2, 0.28) == 0.0


def test_staleness_split_parts_add_up_by_hand():
    mu = torch.tensor([[-1.0, -2.0, -3.0]])
    sampled = torch.tensor([[-1.1, -2.0, -2.8]])  # mismatch r: -0.1, 0, 0.2
    now = torch.tensor([[-1.4, -1.5, -2.8]])  # policy r: -0.3, 0.5, 0
    mask = torch.tensor([[True, True, True]])
    out = staleness_split(now, sampled, mu, mask)
    assert out["mismatch_log_ratio_mean"] == pytest.approx(0.1 / 3)
    assert out["policy_log_ratio_mean"] == pytest.approx(0.2 / 3)
    assert out["total_log_ratio_mean"] == pytest.approx(0.3 / 3)  # the parts add up token by token
    assert out["mismatch_abs_log_ratio_mean"] == pytest.approx(0.3 / 3)
    assert out["policy_abs_log_ratio_mean"] == pytest.approx(0.8 / 3)
    # k3 of r = log pi - log mu: e^r - 1 - r (KL(mu || pi) from samples of mu), per token, averaged
    k3 = lambda rs: sum(math.exp(r) - 1 - r for r in rs) / len(rs)  # noqa: E731
    assert out["policy_k3"] == pytest.approx(k3([-0.3, 0.5, 0.0]))
    assert out["mismatch_seq_kl"] == pytest.approx(-0.1)  # mean_i(-s_i), s = -0.1 + 0 + 0.2


def test_split_rows_are_whole_groups():
    assert split_rows(16, 4, 0.25).tolist() == [0, 1, 2, 3]
    assert split_rows(16, 4, 0.3).tolist() == list(range(8))  # ceil(0.3 x 4 groups) = 2
    assert split_rows(8, 4, 0.01).tolist() == [0, 1, 2, 3]  # at least one group


# ---- runs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_each_batch_is_at_most_k_updates_old_and_the_split_adds_up(tiny_dir, tmp_path, k):
    cfg = tiny_cfg(tiny_dir, tmp_path / "run", **varied(tmp_path, **{"run.steps": 4, "rollout.max_staleness": k}))
    rows = rows_of(train(cfg, quiet=True))
    assert [r["staleness/max"] for r in rows] == [min(s, k) for s in range(4)]  # batch s: the weights of s - k
    first = rows[0]  # sampled with the weights the learner still has: no policy change, to the bit
    assert first["staleness/policy_abs_log_ratio_mean"] == 0.0
    assert first["staleness/total_abs_log_ratio_mean"] == first["staleness/mismatch_abs_log_ratio_mean"]
    assert rows[-1]["staleness/policy_abs_log_ratio_mean"] > 0  # the updates since moved the policy
    assert all(r["sync/checksum_ok"] == 1.0 for r in rows)
    assert max(r["rollout/advantage_abs_mean"] for r in rows) > 0


def test_sampling_ahead_gives_the_same_run_twice(tiny_dir, tmp_path):
    runs = [train(tiny_cfg(tiny_dir, tmp_path / f"r{i}", **varied(tmp_path)), quiet=True) for i in range(2)]
    assert rows_of(runs[0]) == rows_of(runs[1])
    a, b = (params_of(r) for r in runs)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_with_batches_in_flight_is_bit_exact(tiny_dir, tmp_path):
    extra = varied(tmp_path, **{"run.save_every": 2, "run.eval_every": 2})
    full = train(tiny_cfg(tiny_dir, tmp_path / "full", **{**extra, "run.steps": 4}), quiet=True)
    part = tiny_cfg(tiny_dir, tmp_path / "part", **extra)
    train(part, quiet=True)
    part.run.steps = 4
    resumed = train(part, resume=True, quiet=True)
    assert rows_of(full) == rows_of(resumed)
    assert any(k.startswith("eval/avg@") for k in rows_of(full)[1])  # evaluated in the engine's thread
    a, b = params_of(full), params_of(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_rollout_correction_clips_what_the_phantom_clip_fraction_says(tiny_dir, tmp_path, monkeypatch):
    # one update per batch and mu as pi_old: the update's clip of pi_theta / mu binds exactly where the mismatch
    # alone puts a token outside the (narrow) clip range, on the side its advantage makes binding; the update's
    # micro-batches are weighed here by their tokens, as the phantom-clip fraction counts them
    from unison import algorithms
    from unison.step import PolicyUpdate

    steps: list[list[tuple[float, int]]] = []
    objective, update = algorithms.OBJECTIVES["ppo_clip"], PolicyUpdate.__call__

    def recording(logp, logp_old, logp_mu, advantages, mask, weights, **kw):
        loss, metrics = objective(logp, logp_old, logp_mu, advantages, mask, weights, **kw)
        steps[-1].append((metrics["policy/clip_frac"], int(mask.sum())))
        return loss, metrics

    def marking(self, *args, **kwargs):
        steps.append([])
        return update(self, *args, **kwargs)

    monkeypatch.setitem(algorithms.OBJECTIVES, "ppo_clip", recording)
    monkeypatch.setattr(PolicyUpdate, "__call__", marking)
    cfg = tiny_cfg(
        tiny_dir,
        tmp_path / "run",
        **varied(
            tmp_path,
            **{
                "rollout.max_staleness": 0,
                "precision.rollout": "bf16",
                "precision.train": "fp32",
                "rollout.prompts_per_step": 4,
                "optim.train_batch_size": 16,
                "data.reward": f"{Path(__file__).parent / 'reward_fixture.py'}:odd_char_sum",
                "run.steps": 4,
                "algorithm.clip_low": 0.002,
                "algorithm.clip_high": 0.002,
            },
        ),
    )
    rows = rows_of(train(cfg, quiet=True))
    assert max(r["mismatch/phantom_clip_frac"] for r in rows) > 0.01
    assert len(steps) == len(rows)
    for r, calls in zip(rows, steps):
        clipped = sum(frac * n for frac, n in calls) / sum(n for _, n in calls)
        assert clipped == pytest.approx(r["mismatch/phantom_clip_frac"], abs=1e-6)


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"algorithm.staleness_correction": ""}, "algorithm.staleness_correction: must be chosen"),
        ({"algorithm.staleness_correction": "decoupled"}, "choose algorithm.preset=grpo-token-tis"),
        ({"rollout.engine": "vllm"}, "rollout.max_staleness=1"),
        ({"precision.bitwise": True, "precision.rollout": "fp32", "precision.train": "fp32"}, "precision.bitwise"),
        ({"rollout.engine_threads": "0"}, "rollout.engine_threads"),
    ],
)
def test_refusals_say_what_to_do(tiny_dir, tmp_path, extra, says):
    with pytest.raises(UserError, match=says.replace(".", r"\.").replace("=", "=")):
        tiny_cfg(tiny_dir, tmp_path / "run", **{**varied(tmp_path), **extra}).validate()
    assert not (tmp_path / "run").exists()


def test_decoupled_with_a_correction_runs(tiny_dir, tmp_path):
    extra = varied(tmp_path, **{"algorithm.staleness_correction": "decoupled", "algorithm.preset": "grpo-token-tis"})
    rows = rows_of(train(tiny_cfg(tiny_dir, tmp_path / "run", **{**extra, "run.steps": 3}), quiet=True))
    assert rows[-1]["staleness/max"] == 1 and "is/weight_mean" in rows[-1]


def test_a_failing_engine_thread_ends_the_run_with_one_line(tiny_dir, tmp_path, monkeypatch):
    from unison.rollout.native import NativeEngine

    calls = {"n": 0}
    generate = NativeEngine.generate

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the self-test, the batches of steps 1 and 2, then this: the batch of step 3
            raise RuntimeError("decode buffer gone")
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(NativeEngine, "generate", failing)
    cfg = tiny_cfg(tiny_dir, tmp_path / "run", **varied(tmp_path, **{"run.steps": 5, "run.save_every": 2}))
    with pytest.raises(RunFault) as info:
        train(cfg, quiet=True)
    line = str(info.value)
    assert "\n" not in line and "engine's thread failed" in line and "decode buffer gone" in line
    assert "batch of step 3" in line and "during step 3" in line  # found when step 3 needs it, step 2 saved
    assert f"the newest complete checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-000002'}" in line
    assert len(rows_of(tmp_path / "run")) >= 2  # what was written stays


def test_no_engine_state_survives_a_weight_load(tiny_dir):
    # an engine that sampled with other weights, then loaded new ones (verified), samples what a fresh engine
    # holding the new weights samples, to the bit
    from unison.learner import load_verified
    from unison.models import load_model
    from unison.rollout import SamplingParams
    from unison.rollout.native import NativeEngine

    prompts = [[5, 6, 7], [5, 6, 7], [8, 9]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    torch.manual_seed(0)
    new = [(n, t + 0.01 * torch.randn_like(t)) for n, t in load_model(tiny_dir).named_parameters()]
    used = NativeEngine.from_pretrained(tiny_dir, torch.float32, "cpu", seed=3)
    used.generate(prompts, params)
    load_verified(used, new)
    fresh = NativeEngine.from_pretrained(tiny_dir, torch.float32, "cpu", seed=3)
    load_verified(fresh, new)
    used.set_rng_state(fresh.rng_state())
    a, b = used.generate(prompts, params), fresh.generate(prompts, params)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)


def test_lora_samples_ahead_with_the_merged_adapter(tiny_dir, tmp_path):
    extra = varied(tmp_path, **{"lora.enabled": True, "lora.rank": 4, "run.steps": 3, "optim.lr": 1e-2})
    rows = rows_of(train(tiny_cfg(tiny_dir, tmp_path / "run", **extra), quiet=True))
    assert [r["staleness/max"] for r in rows] == [0, 1, 1]
    assert rows[0]["staleness/policy_abs_log_ratio_mean"] == 0.0 and rows[-1]["staleness/policy_abs_log_ratio_mean"] > 0
    assert all(r["sync/checksum_ok"] == 1.0 for r in rows)


@pytest.mark.parametrize("replay", [False, True])
def test_moe_samples_ahead_with_routing_recorded_at_the_sampling_weights(tmp_path, replay):
    from unison.archs import save_tiny

    d = save_tiny("qwen2-moe", tmp_path / "moe")
    cfg = tiny_cfg(
        d,
        tmp_path / "run",
        **varied(tmp_path, **{"run.steps": 3, "moe.routing_replay": replay, "rollout.max_new_tokens": 8}),
    )
    rows = rows_of(train(cfg, quiet=True))
    assert [r["staleness/max"] for r in rows] == [0, 1, 1]
    assert all(0 <= r["routing/routing_flip_frac"] <= 1 for r in rows)
    if replay:  # the learner routes with the experts the engine chose, at the weights it sampled with
        assert all(r["routing/routing_flip_frac"] == 0 for r in rows)


def test_several_ranks_are_refused_by_name(tiny_dir, tmp_path):
    from unison.trainer import check_world_settings

    cfg = tiny_cfg(tiny_dir, tmp_path / "run", **varied(tmp_path, **{"optim.train_batch_size": 8}))
    with pytest.raises(UserError, match="rollout.max_staleness=1 with several ranks is not supported yet"):
        check_world_settings(cfg, 2, torch.device("cpu"))


def test_the_learner_takes_every_core_while_the_engine_waits():
    import threading

    from unison import threads

    before = torch.get_num_threads()
    busy = {"now": True}
    threads.lend(lambda: 1 if busy["now"] else 3)
    try:
        threads.rebalance()
        assert torch.get_num_threads() == 1
        busy["now"] = False
        threads.rebalance()
        assert torch.get_num_threads() == 3
        seen = []

        def engine_thread():  # another thread (the engine's) keeps its own count
            torch.set_num_threads(2)
            threads.rebalance()
            seen.append(torch.get_num_threads())

        t = threading.Thread(target=engine_thread)
        t.start(), t.join()
        assert seen == [2]
    finally:
        threads.lend(None)
        torch.set_num_threads(before)
    threads.rebalance()  # nothing lent: nothing changes
    assert torch.get_num_threads() == before
