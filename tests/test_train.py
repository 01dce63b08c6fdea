import json
import math
import os
from pathlib import Path

import pytest
import torch

from unison.algorithms import PRESETS
from unison.config import OptimConfig, TrainConfig, load_config
from unison.trainer import train


def tiny_cfg(model_dir, out, **extra):
    overrides = {
        "model.path": str(model_dir),
        "run.out": str(out),
        "run.steps": 2,
        "run.eval_every": 0,
        "run.eval_prompts": 4,
        "run.save_every": 0,
        "run.progress": False,
        "run.loggers": ["jsonl"],
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 4,
        "rollout.max_new_tokens": 24,
        "optim.train_batch_size": 4,
        "optim.micro_batch_size": 3,
        "optim.lr": 1e-3,
        "data.max_prompts": 8,
    }
    overrides.update(extra)
    return load_config(TrainConfig, None, overrides)


def params_of(run_dir):
    from unison.checkpoint import latest_checkpoint, load_master

    return load_master(latest_checkpoint(run_dir))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_every_precision_runs(tiny_dir, tmp_path, preset, precision):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{i}-3:", "answer": "0"}}\n' for i in range(10, 30)))
    reward = f"{Path(__file__).parent / 'reward_fixture.py'}:even_length"  # varies, so advantages are non-zero
    cfg = tiny_cfg(
        tiny_dir,
        tmp_path / "run",
        **{
            "algorithm.preset": preset,
            "precision.rollout": precision,
            "precision.train": precision,
            "data.source": str(prompts),
            "data.reward": reward,
            "data.template": "plain",
        },
    )
    run = train(cfg, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        for key, value in row.items():
            assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
    before = {
        n: t for n, t in __import__("unison.models", fromlist=["load_model"]).load_model(tiny_dir).named_parameters()
    }
    after = params_of(run)
    assert max(row["rollout/advantage_abs_mean"] for row in rows) > 0  # a step of 8 samples may draw one reward
    changed = sum(not torch.equal(before[n].float(), after[n]) for n in after)
    assert changed == len(after)
    assert rows[-1]["learner/updates"] == 2


def test_parameters_change_when_rewards_vary(builtin_dir, tmp_path):
    cfg = tiny_cfg(
        builtin_dir,
        tmp_path / "run",
        **{"rollout.max_new_tokens": 160, "rollout.prompts_per_step": 4, "optim.train_batch_size": 16, "run.steps": 1},
    )
    run = train(cfg, quiet=True)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["rollout/advantage_abs_mean"] > 0
    from unison.models import load_model

    before = dict(load_model(builtin_dir).named_parameters())
    after = params_of(run)
    assert any(not torch.equal(before[n], after[n]) for n in after)


def test_same_seed_same_run_bit_for_bit(tiny_dir, tmp_path):
    runs = [
        train(
            tiny_cfg(tiny_dir, tmp_path / f"r{i}", **{"precision.rollout": "fp16", "precision.train": "fp16"}),
            quiet=True,
        )
        for i in range(2)
    ]
    a, b = (params_of(r) for r in runs)
    assert all(torch.equal(a[n], b[n]) for n in a)
    ma = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    assert strip(ma) == strip(mb)


def test_resume_continues_exactly(tiny_dir, tmp_path):
    full = train(tiny_cfg(tiny_dir, tmp_path / "full", **{"run.steps": 4, "run.save_every": 2}), quiet=True)
    part = tiny_cfg(tiny_dir, tmp_path / "part", **{"run.steps": 2, "run.save_every": 2})
    train(part, quiet=True)
    part.run.steps = 4
    resumed = train(part, resume=True, quiet=True)
    a, b = params_of(full), params_of(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    rows = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_a_finished_run_resumed_for_more_steps_goes_on_as_one_run(tiny_dir, tmp_path):
    # a run evaluates at its end; the steps resumed after that sample what one longer run samples (a reward that
    # varies, so that the weights move and a different sample would show)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{i}-3:", "answer": "0"}}\n' for i in range(10, 30)))
    reward = f"{Path(__file__).parent / 'reward_fixture.py'}:even_length"
    extra = {
        "data.source": str(prompts),
        "data.reward": reward,
        "data.template": "plain",
        "precision.rollout": "fp16",
        "precision.train": "fp16",
    }
    full = train(tiny_cfg(tiny_dir, tmp_path / "full", **{**extra, "run.steps": 3}), quiet=True)
    part = tiny_cfg(tiny_dir, tmp_path / "part", **extra)
    train(part, quiet=True)
    part.run.steps = 3
    resumed = train(part, resume=True, quiet=True)

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not k.startswith(("perf/", "eval/"))} for x in lines]

    assert rows(full) == rows(resumed) and max(r["rollout/advantage_abs_mean"] for r in rows(full)) > 0
    a, b = params_of(full), params_of(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_existing_run_folder_needs_resume_or_overwrite(tiny_dir, tmp_path):
    from unison.errors import UserError

    cfg = tiny_cfg(tiny_dir, tmp_path / "run", **{"run.steps": 1})
    train(cfg, quiet=True)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="--resume"):
        train(cfg, quiet=True)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_length_buckets_cut_by_padding_waste():
    from unison.batching import length_buckets

    lengths = torch.tensor([5, 100, 7, 90, 8, 120, 6, 30])
    # sorted 5 6 7 8 30 90 100 120 (rows 0 6 2 4 7 3 1 5). Size 3: [5 6 7] is full; 8 then 30 would pad to
    # 2 x 30 = 60 > 1.25 x 38; 30 then 90: 180 > 1.25 x 120; 90 + 100: 200 <= 1.25 x 190; + 120: 360 <= 1.25 x 310.
    # Size 64: 5 6 7 8 stay together (4 x 8 = 32 <= 1.25 x 26 = 32.5).
    assert [b.tolist() for b in length_buckets(lengths, 3)] == [[0, 6, 2], [4], [7], [3, 1, 5]]
    assert [b.tolist() for b in length_buckets(lengths, 64)] == [[0, 6, 2, 4], [7], [3, 1, 5]]
    buckets = length_buckets(torch.randint(1, 200, (97,)), 16)
    assert sorted(torch.cat(buckets).tolist()) == list(range(97)) and max(len(b) for b in buckets) <= 16


def test_length_buckets_keep_a_token_budget():
    from unison.batching import length_buckets

    lengths = torch.tensor([5, 100, 7, 90, 8, 120, 6, 30])
    # the buckets of test_length_buckets_cut_by_padding_waste (size 64), with 200 padded tokens at most:
    # [5 6 7 8] pads to 32; 90 + 100 pads to 200 (kept), + 120 would pad to 360 > 200; 120 alone
    assert [b.tolist() for b in length_buckets(lengths, 64, max_tokens=200)] == [[0, 6, 2, 4], [7], [3, 1], [5]]
    assert [b.tolist() for b in length_buckets(lengths, 64, max_tokens=50)][-3:] == [[3], [1], [5]]  # one row each


def test_learner_micro_batches_count_prompt_tokens_within_the_device_budget(builtin_dir):
    from unison.learner import Learner
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import Rollouts

    policy = PrecisionPolicy(torch.float32, torch.float32)
    assert Learner.from_pretrained(builtin_dir, policy).batcher.token_budget == 2**18 // 128  # hidden 128
    learner = Learner.from_pretrained(builtin_dir, policy, optim=OptimConfig(micro_batch_tokens=100))
    n = torch.tensor([10, 40, 20, 30])  # with prompts of 30, 0, 20, 10 tokens: 40 each
    r = Rollouts(
        prompt_ids=[[5] * 30, [], [5] * 20, [5] * 10],
        response_ids=torch.zeros(4, 40, dtype=torch.long),
        logprobs=torch.zeros(4, 40),
        mask=torch.arange(40)[None] < n[:, None],
        lengths=n,
        finished=torch.ones(4, dtype=torch.bool),
    )
    assert [b.tolist() for b in learner.batcher.plan(r, 64)] == [[0, 1], [2, 3]]  # 2 x 40 <= 100 < 3 x 40
    assert [b.tolist() for b in learner.batcher.plan(r, 64, rows=torch.tensor([3, 1]))] == [[0, 1]]


def test_one_update_per_batch_takes_pi_old_from_its_own_forward(builtin_dir, tmp_path, monkeypatch):
    """With one update per rollout batch the recompute pass is skipped; metrics match the run that recomputes."""
    import unison.step as step

    extra = {"rollout.max_new_tokens": 96, "optim.train_batch_size": 8, "optim.micro_batch_size": 8, "run.steps": 2}
    fast = [
        json.loads(x)
        for x in (train(tiny_cfg(builtin_dir, tmp_path / "a", **extra), quiet=True) / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert "perf/recompute_tokens_per_s" not in fast[0]
    monkeypatch.setattr(step, "needs_recompute", lambda optim, batch: True)
    slow = [
        json.loads(x)
        for x in (train(tiny_cfg(builtin_dir, tmp_path / "b", **extra), quiet=True) / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert "perf/recompute_tokens_per_s" in slow[0]
    for a, b in zip(fast, slow):
        for key in ("mismatch/k3", "mismatch/abs_log_ratio_mean", "policy/loss", "rollout/entropy", "rollout/accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key


def _group_rollouts(prompt_lengths, group, T, lengths=None, seed=0):
    from unison.rollout.base import Rollouts

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 261, (n,), generator=g).tolist() for n in prompt_lengths]
    rows = [p for p in prompts for _ in range(group)]
    B = len(rows)
    if lengths is None:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0], lengths[1] = T, 1
    lengths = torch.as_tensor(lengths)
    mask = torch.arange(T)[None] < lengths[:, None]
    return Rollouts(
        prompt_ids=rows,
        response_ids=torch.randint(5, 261, (B, T), generator=g).masked_fill(~mask, 0),
        logprobs=torch.zeros(B, T),
        mask=mask,
        lengths=lengths,
        finished=torch.ones(B, dtype=torch.bool),
    )


def test_shared_prompts_give_the_one_forward_logprobs_and_gradients(tiny_dir):
    # the rows of a group run on their prompt's keys and values, computed once: in fp32 the same log-probs and
    # gradients as one forward over every [prompt, response] row, up to summation order. Prompts of other lengths
    # (left-padded in the prompt forward), responses from 1 token to the longest.
    from unison.batching import SequenceBatch
    from unison.learner import Learner
    from unison.precision import PrecisionPolicy

    r = _group_rollouts([40, 55, 12], group=4, T=20)
    learner = Learner.from_pretrained(tiny_dir, PrecisionPolicy(torch.float32, torch.float32))
    assert learner.batcher.share_prompts
    out = {}
    for share in (False, True):
        learner.model.zero_grad()
        batch = SequenceBatch.from_rollouts(r, 0, "cpu", share=share)
        assert (batch.shared is not None) == share
        logp = learner.logprobs(batch)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        out[share] = logp.detach(), {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    assert out[True][0].shape == out[False][0].shape == r.mask.shape
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=2e-6)
    for name, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())
    assert batch.shared.ids.shape == (3, 55) and batch.input_ids.shape == (12, 19)


def test_prompts_are_shared_only_where_that_saves_tokens(tiny_dir):
    from unison.batching import SequenceBatch
    from unison.learner import Learner
    from unison.models import random_model
    from unison.precision import PrecisionPolicy

    policy = PrecisionPolicy(torch.float32, torch.float32)
    short = _group_rollouts([3, 4], group=4, T=20)  # 8 x (4 + 20) = 192 tokens in one forward, 2 x 4 + 8 x 19 = 160
    assert SequenceBatch.from_rollouts(short, 0, "cpu", share=True).shared is None
    long = _group_rollouts([40, 44], group=4, T=20)  # 8 x 64 = 512 against 2 x 44 + 8 x 19 = 240
    # 20-token prompts and 2-token responses: 2 x 20 + 8 x 1 = 48 against 8 x 22 = 176, but a prompt this short saves
    # less than a second pass costs (prompts must average 32 tokens)
    brief = _group_rollouts([20, 20], group=4, T=2, lengths=[2] * 8)
    assert SequenceBatch.from_rollouts(brief, 0, "cpu", share=True).shared is None
    assert SequenceBatch.from_rollouts(long, 0, "cpu", share=True).shared is not None
    # two 40-token prompts, 4 rows each, 10-token responses, a budget of 100 tokens: 2 rows a micro-batch (4 x 58
    # tokens, each run as its prompt then 2 x 9 response tokens: 232). Without the budget all 8 rows run in one,
    # 2 x 40 + 8 x 9 = 152 <= 0.8 x 232 tokens, so that is chosen; with short prompts it would not be
    learner = Learner.from_pretrained(tiny_dir, policy)
    assert learner.batcher.auto_budget
    learner.batcher.token_budget = 100  # as if this machine's automatic budget were 100 tokens
    even = _group_rollouts([40, 40], group=4, T=10, lengths=[10] * 8)
    assert [b.tolist() for b in learner.batcher.plan(even, 64)] == [list(range(8))]
    assert [b.tolist() for b in learner.batcher.plan(even, 64, rows=torch.tensor([4, 5, 6]))] == [[0, 1, 2]]
    learner.batcher.share_prompts = False
    assert [b.tolist() for b in learner.batcher.plan(even, 64)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    learner.batcher.share_prompts = True
    short = _group_rollouts([3, 3], group=4, T=10, lengths=[10] * 8)  # 8 x 13 tokens either way
    assert [b.tolist() for b in learner.batcher.plan(short, 64)] == [[0, 1, 2, 3, 4, 5, 6], [7]]
    user = Learner.from_pretrained(tiny_dir, policy, optim=OptimConfig(micro_batch_tokens=100))  # the user's is kept
    assert [b.tolist() for b in user.batcher.plan(even, 64)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert not Learner.from_pretrained(tiny_dir, policy, optim=OptimConfig(share_prompts=False)).batcher.share_prompts
    windowed = random_model(use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert not Learner(windowed, policy).batcher.share_prompts


def test_shared_prompts_train_like_one_forward_per_row(tiny_dir, tmp_path, monkeypatch):
    # long prompts shared by their group: the learner runs each once (in the update and, with two updates per rollout
    # batch, in the recompute of log pi_old). Over two fp32 steps the run matches one that runs every row's prompt.
    from unison.learner import PolicyForward

    shots = "12-3:12,9,6,3,0\n#0\n" * 4
    starts, steps = (40, 47, 54, 61), (3, 4, 5, 6)
    rows = [{"prompt": f"{shots}{a}-{b}:", "answer": str(a % b)} for a, b in zip(starts, steps)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = {
        "data.source": str(data),
        "data.reward": "countdown",
        "data.template": "plain",
        "run.save_every": 2,
        "optim.share_prompts": True,
        "precision.rollout": "fp32",
        "precision.train": "fp32",
    }

    passes = []
    shared_logits = PolicyForward.shared_prompt_logits
    monkeypatch.setattr(
        PolicyForward,
        "shared_prompt_logits",
        lambda self, batch: passes.append(len(batch.shared.ids)) or shared_logits(self, batch),
    )
    runs = {}
    for share in (True, False):
        passes.clear()
        cfg = tiny_cfg(tiny_dir, tmp_path / f"share-{share}", **{**extra, "optim.share_prompts": share})
        run = train(cfg, quiet=True)
        runs[share] = run, [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert bool(passes) == share and set(passes) <= {1, 2}  # distinct prompts of a micro-batch: 2 a step
    for a, b in zip(runs[True][1], runs[False][1]):
        assert a["rollout/response_length_mean"] == b["rollout/response_length_mean"]
        for key in ("mismatch/k3", "mismatch/abs_log_ratio_mean", "policy/loss", "learner/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    shared, each = params_of(runs[True][0]), params_of(runs[False][0])
    for name, value in each.items():
        torch.testing.assert_close(shared[name], value, rtol=0, atol=1e-5)


def _wide_vocab_model(tmp_path, vocab=8192, hidden=128):
    """A random Qwen2 with a vocabulary large beside its hidden size (as real models have), saved with the built-in
    tokenizer (its ids are below the vocabulary)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from unison.models import BUILTIN_CONFIG, build_tokenizer, save_model

    shape = dict(BUILTIN_CONFIG, hidden_size=hidden, intermediate_size=3 * hidden)
    config = Qwen2Config(vocab_size=vocab, bos_token_id=None, eos_token_id=1, pad_token_id=0, **shape)
    torch.manual_seed(2)
    return save_model(Qwen2ForCausalLM(config).eval(), build_tokenizer(), tmp_path / "wide")


@pytest.mark.parametrize("precision", [torch.float32, torch.float16])
def test_the_learner_keeps_one_logits_tensor_and_no_fp32_weight_copies_for_backward(tmp_path, precision, monkeypatch):
    # what the forward pass keeps for the backward pass: of the [B, T, V] tensors, the logits alone (in the train
    # dtype; the fp32 upcast and log-softmax are made a chunk at a time), and no fp32 copy of a 16-bit weight
    import unison.sampling as sampling
    from unison.learner import Learner
    from unison.precision import PrecisionPolicy

    path = _wide_vocab_model(tmp_path)
    learner = Learner.from_pretrained(path, PrecisionPolicy(precision, precision), "cpu")
    monkeypatch.setattr(sampling, "CHUNK_VALUES", 16 * learner.model.config.vocab_size)  # 16 positions a chunk
    r = _group_rollouts([7, 9], group=2, T=30)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logp = learner.logprobs(learner.batch(r, share=False))
    V = learner.model.config.vocab_size
    wide = {t.untyped_storage().data_ptr(): t for t in saved if t.shape[-1] == V and t.dim() > 1 and t.numel() > V}
    assert len(wide) == 1 and next(iter(wide.values())).dtype == precision
    shapes = {tuple(p.shape) for p in learner.model.parameters() if p.dim() == 2}
    if precision != torch.float32:
        assert not [t for t in saved if t.dtype == torch.float32 and tuple(t.shape) in shapes]
    assert sampling.chunk_rows(V) < int(r.mask.sum())  # the chunks were smaller than the batch
    logp.sum().backward()


def test_take_positions_is_gather_to_the_bit_with_repeated_positions():
    # the learner's response logits: gather's values and gradient (repeated positions add up), without the logits
    from unison.hf import TakePositions

    torch.manual_seed(0)
    x = torch.randn(3, 9, 50, dtype=torch.float16, requires_grad=True)
    pos = torch.tensor([[0, 1, 2, 8, 8], [3, 4, 5, 6, 7], [1, 2, 3, 8, 8]])
    g = torch.randn(3, 5, 50, dtype=torch.float16)
    want = x.gather(1, pos[..., None].expand(-1, -1, 50))
    got = TakePositions.apply(x, pos[..., None])
    assert torch.equal(want, got)
    grads = [torch.autograd.grad(y, x, g)[0] for y in (want, got)]
    assert torch.equal(*grads) and grads[1][0, 8].abs().sum() > 0  # both repeats reached position 8


def test_the_engine_frees_its_decode_weights_after_generate(tiny_dir, monkeypatch):
    import gc
    import weakref

    from unison.rollout.base import SamplingParams
    from unison.rollout.native import DecodeWeights, NativeEngine

    made = []
    init = DecodeWeights.__init__

    def recorded(self, *a, **k):
        init(self, *a, **k)
        made.append(weakref.ref(self))

    monkeypatch.setattr(DecodeWeights, "__init__", recorded)
    engine = NativeEngine.from_pretrained(tiny_dir, torch.float16, "cpu", matmul="fp32-accumulate")
    engine.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=6, stop_token_ids=()))
    gc.collect()
    assert made and all(ref() is None for ref in made)


MEMORY_STEP = """
import json, re, sys, torch
from unison.config import TrainConfig, load_config
from unison.trainer import build_run, PromptStream
from unison.step import RLStep
def peak():
    v = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    open("/proc/self/clear_refs", "w").write("5")
    return v
torch.set_num_threads(1)
base = peak()
cfg = load_config(TrainConfig, None, sys.argv[1:])
run = build_run(cfg)
s = run.setup
learner = s.learner(run.policy, model=s.policy_model(cfg.lora), optim=cfg.optim, precision=cfg.precision)
engine = s.engine(run.policy.rollout, seed=0)
step, stream = RLStep(cfg, run, learner, engine), PromptStream(run.train_examples, 0)
for i in range(3):
    step(i, stream, torch.Generator().manual_seed(0))
print(json.dumps({"base": base, "peak": peak(), "params": sum(p.numel() for p in learner.model.parameters())}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_an_fp16_step_holds_20_bytes_per_parameter(tmp_path):
    # fp32 masters 4, AdamW 8, fp32 gradients 4, the learner's and the engine's fp16 copies 2 + 2 (the engine's fp32
    # decode copies exist while it samples, when the gradients do not): 20 bytes a parameter. Measured as what four
    # more decoder layers add to the peak of a 3-step run (the process's fixed costs cancel): 20.1-20.2 here, 22.8
    # before the fp16 gradients were moved into the fp32 ones as the backward pass finishes each
    import subprocess
    import sys

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from unison.models import BUILTIN_CONFIG, build_tokenizer, save_model

    peaks = {}
    for layers in (2, 6):
        shape = dict(BUILTIN_CONFIG, hidden_size=512, intermediate_size=1536, num_hidden_layers=layers)
        shape.update(num_attention_heads=8, num_key_value_heads=2)
        config = Qwen2Config(vocab_size=8192, bos_token_id=None, eos_token_id=1, pad_token_id=0, **shape)
        torch.manual_seed(2)
        path = save_model(Qwen2ForCausalLM(config).eval(), build_tokenizer(), tmp_path / f"layers{layers}")
        settings = [
            f"model.path={path}",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=8",
            "optim.train_batch_size=4",
            "optim.micro_batch_size=4",
            "precision.rollout=fp16",
            "precision.train=fp16",
            "run.progress=false",
            "run.threads=1",
        ]
        # glibc's malloc serves a freed block's size from its heap from then on (its mmap threshold moves up), so
        # the resident peak can hold holes the tensors left: a fixed threshold makes it the tensors' own peak
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
        run = subprocess.run([sys.executable, "-c", MEMORY_STEP, *settings], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[layers] = json.loads(run.stdout.strip().splitlines()[-1])
    added = (peaks[6]["peak"] - peaks[2]["peak"]) / (peaks[6]["params"] - peaks[2]["params"])
    assert added < 21, (added, peaks)
