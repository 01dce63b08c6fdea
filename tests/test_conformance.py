"""The conformance contract on a tiny random checkpoint of every architecture family unison accepts (`unison.archs`):
in fp32 the native engine's sampled log-probs and the learner's recompute equal the model's own Hugging Face forward
(`unison.conformance`), the decode path is the one the architecture's features call for, fp16/bf16 mismatches are
finite and above fp32's, and a 2-step `train` changes the weights."""

import json
from pathlib import Path

import pytest
import torch

from unison.archs import ARCHS, save_tiny, tiny_model
from unison.conformance import MAX_TOL, MEAN_TOL, default_prompts, measure, reference_logprobs

FAST = {
    "qwen2",
    "qwen2-window",
    "qwen3",
    "llama",
    "llama-untied",
    "llama3-rope",
    "mistral-window",
    "qwen2-moe",
    "qwen3-moe",
    "mixtral",
}  # the rest: own forward
WINDOWED = {"qwen2-window", "mistral-window", "gemma2", "gemma3"}
TRANSFORMS = {"cohere", "granite", "gemma2", "gemma3"}  # logit scale, logit divisor, final softcap
REWARDS = Path(__file__).parent / "reward_fixture.py"
PROMPTS = default_prompts()  # 12-20 tokens: past the 8-token windows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {name: save_tiny(name, root / name) for name in ARCHS}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_engine_and_learner_equal_the_models_own_forward(checkpoints, name):
    r = measure(checkpoints[name], PROMPTS, max_new_tokens=24, precisions=())
    assert r.tokens >= 4 * 20
    for what, (mean, top) in (("engine", r.engine_vs_hf), ("learner", r.learner_vs_hf)):
        assert mean <= MEAN_TOL and top <= MAX_TOL, (name, what, mean, top)
    assert r.decode_path == ("fast" if name in FAST else "fallback"), (r.decode_path, r.reason)


@pytest.mark.parametrize("matmul", ["native", "fp32-accumulate"])
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_fp16_and_bf16_mismatches_are_finite_and_small(checkpoints, name, matmul):
    # in either matmul mode. The fast path fuses what the model's forward does in several roundings, so there fp16's
    # and bf16's mismatches are above fp32's; the fallback runs the model's own kernels with a cache, which can
    # round exactly as the full forward does (bf16's mismatch 0 on gpt-neox with fp32-accumulate matmuls)
    r = measure(checkpoints[name], PROMPTS, max_new_tokens=24, matmul=matmul)
    assert len(r.mismatch) == 3 and r.ordered, (name, r.decode_path, r.mismatch)


@pytest.mark.parametrize("name", sorted(WINDOWED | TRANSFORMS))
def test_the_features_the_contract_covers_change_the_log_probs(checkpoints, name):
    # the matrix can fail: without its window or its logit transform, each of these models gives other log-probs
    from unison.rollout.base import Rollouts

    model = tiny_model(name)
    ids = torch.tensor([PROMPTS[2] + PROMPTS[1]])  # 36 tokens, past every window
    response = ids[:, 20:]
    ro = Rollouts(
        [ids[0, :20].tolist()],
        response,
        torch.zeros(response.shape),
        torch.ones(response.shape, dtype=torch.bool),
        torch.tensor([response.shape[1]]),
        torch.tensor([True]),
    )
    ref = reference_logprobs(model, ro)
    with torch.no_grad():
        if name in TRANSFORMS:
            hidden = model.base_model(input_ids=ids).last_hidden_state
            plain = model.lm_head(hidden)[0, 19:-1].float().log_softmax(-1)
        else:
            model.config.sliding_window = 64
            plain = model(input_ids=ids).logits[0, 19:-1].float().log_softmax(-1)
    plain = plain.gather(-1, response[0, :, None])[:, 0]
    assert (plain - ref[0]).abs().mean() > 1e-3, name


def test_dropout_is_off_in_the_update_pass(checkpoints):
    # GPT-2's config asks for dropout 0.1: the learner's forward with gradients still computes the sampling policy
    from unison.learner import Learner
    from unison.precision import PrecisionPolicy
    from unison.rollout import make_engine
    from unison.rollout.base import SamplingParams

    d = checkpoints["gpt2"]
    ro = make_engine("native", d, dtype=torch.float32, device="cpu").generate(PROMPTS, SamplingParams(16))
    model = tiny_model("gpt2")
    assert model.config.resid_pdrop == 0.1
    learner = Learner(model, PrecisionPolicy(torch.float32, torch.float32))
    logp = learner.logprobs(learner.batch(ro))
    assert logp.requires_grad and not learner.model.training
    torch.testing.assert_close(logp.detach(), reference_logprobs(tiny_model("gpt2"), ro) * ro.mask, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_two_training_steps_change_the_weights(checkpoints, name, tmp_path):
    from unison.checkpoint import latest_checkpoint, load_master
    from unison.config import TrainConfig, load_config
    from unison.trainer import train

    # a random model rarely samples EOS: responses end at a lowercase letter (a stop string), and the reward
    # (response length even or odd) varies, so that advantages are not all zero
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{i}-3:", "answer": "0"}}\n' for i in range(10, 20)))
    overrides = {
        "model.path": str(checkpoints[name]),
        "run.out": str(tmp_path / "run"),
        "run.steps": 2,
        "run.eval_every": 0,
        "run.eval_prompts": 2,
        "run.save_every": 0,
        "run.progress": False,
        "run.loggers": ["jsonl"],
        "data.source": str(prompts),
        "data.template": "plain",
        "data.reward": f"{REWARDS}:even_length",
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 4,
        "rollout.max_new_tokens": 12,
        "rollout.stop": list("abcdefghijklmnopqrstuvwxyz"),
        "optim.train_batch_size": 8,
        "optim.micro_batch_size": 8,
        "optim.lr": 1e-3,
        "precision.rollout": "fp16",
        "precision.train": "fp16",
    }
    run = train(load_config(TrainConfig, None, overrides), quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["rollout/advantage_abs_mean"] for r in rows) > 0 and rows[-1]["precision/skipped_steps"] < 2
    after = load_master(latest_checkpoint(run))
    before = dict(tiny_model(name).named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p.detach(), after[n])]
    assert len(changed) >= len(before) // 2, (name, len(changed), len(before))
