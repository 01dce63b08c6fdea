"""What RL users expect around the loop: learning-rate schedules, a KL penalty to the starting policy, gradient
checkpointing, a system prompt, pass@k from n samples, evaluation during training, readable samples, trackers and
the engine self-test. Hand-computed values where there is a formula."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unison.algorithms import kl_penalty
from unison.config import ModelConfig, TrainConfig, load_config
from unison.evaluation import pass_at_k
from unison.schedules import lr_factor
from unison.trainer import train

REWARD = f"{Path(__file__).parent / 'reward_fixture.py'}:even_length"


def cfg(tiny_dir, out, **extra):
    return load_config(
        TrainConfig,
        None,
        {
            "model.path": str(tiny_dir),
            "run.out": str(out),
            "run.steps": 3,
            "run.eval_every": 0,
            "run.eval_prompts": 4,
            "run.save_every": 0,
            "run.progress": False,
            "run.loggers": ["jsonl"],
            "rollout.prompts_per_step": 2,
            "rollout.group_size": 4,
            "rollout.max_new_tokens": 16,
            "optim.train_batch_size": 8,
            "optim.lr": 1e-3,
            "data.max_prompts": 8,
            "data.source": str(out.parent / "prompts.jsonl"),
            "data.reward": REWARD,
            "data.template": "plain",
            "precision.rollout": "fp32",
            "precision.train": "fp32",
            **extra,
        },
    )


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(f'{{"prompt": "{i}-3:", "answer": "0"}}\n' for i in range(10, 30)))
    return p


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    from unison.checkpoint import latest_checkpoint, load_master

    return load_master(latest_checkpoint(run))


# ---- learning-rate schedules -------------------------------------------------------------------------------------
def test_lr_factor_by_hand():
    # 10 steps, 2 of warm-up: 1/2, 2/2, then the schedule over steps 2..9 (progress 0, 1/7, ..., 1)
    assert [lr_factor("constant", s, 10, 2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor("linear", 2, 10, 2) == 1.0 and lr_factor("linear", 9, 10, 2) == 0.0
    assert lr_factor("linear", 9, 10, 2, floor=0.1) == pytest.approx(0.1)
    assert lr_factor("linear", 5, 10, 2) == pytest.approx(1 - 3 / 7)
    assert lr_factor("cosine", 2, 10, 2) == pytest.approx(1.0) and lr_factor("cosine", 9, 10, 2) == pytest.approx(0.0)
    assert lr_factor("cosine", 5, 10, 2, floor=0.2) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))


def test_the_schedule_sets_each_steps_learning_rate(tiny_dir, tmp_path, prompts):
    run = train(
        cfg(tiny_dir, tmp_path / "run", **{"optim.schedule": "linear", "optim.warmup_steps": 1, "run.steps": 3}),
        quiet=True,
    )
    assert [r["learner/lr"] for r in rows(run)] == pytest.approx([1e-3, 1e-3, 0.0])


# ---- KL penalty to the starting policy ---------------------------------------------------------------------------
def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[True, True, False]])
    # d = log ref - log pi = [-0.5, 1.0, 0]
    torch.testing.assert_close(kl_penalty("k1", logp, ref, mask), torch.tensor([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty("k2", logp, ref, mask), torch.tensor([[0.125, 0.5, 0.0]]))
    k3 = torch.tensor([[math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1.0, 0.0]])
    torch.testing.assert_close(kl_penalty("k3", logp, ref, mask), k3)


@pytest.mark.parametrize("where", ["loss", "reward"])
def test_a_kl_penalty_keeps_the_policy_nearer_its_start(tiny_dir, tmp_path, prompts, where):
    from unison.models import load_model

    start = dict(load_model(tiny_dir).named_parameters())
    free = train(cfg(tiny_dir, tmp_path / "free"), quiet=True)
    held = train(
        cfg(
            tiny_dir,
            tmp_path / "held",
            **{"algorithm.kl_coef": 50.0, "algorithm.kl_in": where, "algorithm.kl_estimator": "k2"},
        ),
        quiet=True,
    )
    m = rows(held)
    assert m[0]["kl/ref"] == 0.0 and m[-1]["kl/ref"] > 0  # the policy is its reference before the first update

    def distance(run):
        return sum(float((p - start[n]).pow(2).sum()) for n, p in weights(run).items()) ** 0.5

    if where == "loss":
        assert distance(held) < distance(free)
    else:  # in the reward the penalty changes the advantages: another update than without it
        assert distance(held) != distance(free)


# ---- gradient checkpointing --------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_run(tiny_dir, tmp_path, prompts):
    a = train(cfg(tiny_dir, tmp_path / "a"), quiet=True)
    b = train(cfg(tiny_dir, tmp_path / "b", **{"model.gradient_checkpointing": True}), quiet=True)
    wa, wb = weights(a), weights(b)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6)


def test_checkpointed_layers_recompute_in_the_backward_with_dropout_off():
    from unison.archs import tiny_model
    from unison.learner import Learner
    from unison.precision import PrecisionPolicy

    learner = Learner(
        tiny_model("gpt2"),
        PrecisionPolicy(torch.float32, torch.float32),
        model_cfg=ModelConfig(gradient_checkpointing=True),
    )
    assert not learner.batcher.share_prompts
    dropouts = [m for m in learner.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and not any(m.training for m in dropouts)
    calls = []
    # a module inside a checkpointed layer (a pre-hook: the replay stops as soon as the backward has what it needs)
    inner = learner.model.transformer.h[0].attn
    inner.register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    ids = torch.randint(5, 200, (2, 12))
    learner.model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2  # once in the forward, once more in the backward


# ---- prompts, evaluation, samples ----------------------------------------------------------------------------------
def test_system_prompt_comes_first(tiny_dir):
    from unison.config import DataConfig, ModelConfig, RolloutConfig
    from unison.models import build_tokenizer
    from unison.setup import build
    from unison.tasks.base import Example

    s = build(
        ModelConfig(path=str(tiny_dir)), DataConfig(template="plain", system_prompt="Count down."), RolloutConfig()
    )
    ids = s.encode([Example("47-9:", "0", id="a")])[0]
    assert build_tokenizer().decode(ids) == "Count down.\n\n47-9:"


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 2, 4) == 1.0 and pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(100, 3, 10) == pytest.approx(1 - math.comb(97, 10) / math.comb(100, 10))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_eval_n_and_k(tiny_dir, tmp_path):
    out = tmp_path / "e.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "unison.cli",
            "eval",
            "--model",
            str(tiny_dir),
            "--n",
            "4",
            "--k",
            "1,2",
            "--json",
            str(out),
            "data.max_prompts=3",
            "rollout.max_new_tokens=8",
            "run.progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["n"] == 4 and {"avg@4", "pass@1", "pass@2"} <= set(res) and len(res["per_prompt"]) == 3
    for p in res["per_prompt"]:
        assert p["n"] == 4 and 0 <= p["solved"] <= 4
    solved = [p["solved"] for p in res["per_prompt"]]
    assert res["pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in solved) / 3)


def test_eval_during_training_with_n_samples_and_readable_samples(tiny_dir, tmp_path, prompts):
    run = train(
        cfg(
            tiny_dir,
            tmp_path / "run",
            **{"run.eval_every": 1, "run.eval_samples": 2, "run.steps": 2, "run.log_samples": 3},
        ),
        quiet=True,
    )
    m = rows(run)
    assert all({"eval/avg@2", "eval/pass@1", "eval/pass@2"} <= set(r) for r in m)
    lines = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [len(x["rows"]) for x in lines] == [3, 3]
    row = lines[-1]["rows"][0]
    assert {"id", "prompt", "response", "reward", "length", "finished", "mismatch"} <= set(row)
    assert row["prompt"].endswith("-3:") and row["mismatch"] < 1e-5  # fp32
    from unison.cli import main

    assert main(["samples", str(run), "--step", "1"]) == 0


# ---- trackers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("logger", ["tensorboard", "wandb", "mlflow"])
def test_trackers_log_offline(tiny_dir, tmp_path, prompts, logger, monkeypatch):
    pytest.importorskip(logger, reason=f"pip install 'unison[{logger}]' to test it")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = train(cfg(tiny_dir, tmp_path / "run", **{"run.loggers": [logger], "run.steps": 2}), quiet=True)
    if logger == "tensorboard":
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    elif logger == "wandb":
        assert list((run / "wandb").glob("offline-run-*"))
    else:
        import mlflow

        mlflow.set_tracking_uri((run / "mlruns").absolute().as_uri())
        found = mlflow.search_runs(experiment_names=["unison"], output_format="list")
        assert len(found) == 1 and found[0].data.metrics["rollout/accuracy"] >= 0
        assert found[0].data.params["optim.lr"] == "0.001"
    assert json.loads((run / "trackers.json").read_text()) if logger != "tensorboard" else True


def test_mlflow_logs_into_the_file_store_its_uri_names(tiny_dir, tmp_path, prompts, monkeypatch):
    # MLflow keeps file stores opt-in (MLFLOW_ALLOW_FILE_STORE); a file:// MLFLOW_TRACKING_URI is one too
    pytest.importorskip("mlflow", reason="pip install 'unison[mlflow]' to test it")
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    train(cfg(tiny_dir, tmp_path / "run", **{"run.loggers": ["mlflow"], "run.steps": 1}), quiet=True)
    import mlflow

    mlflow.set_tracking_uri(store.as_uri())
    found = mlflow.search_runs(experiment_names=["unison"], output_format="list")
    assert len(found) == 1 and found[0].data.metrics["rollout/accuracy"] >= 0


def test_list_settings_take_either_form(tmp_path):
    # run.loggers=tensorboard,mlflow and lora.target_modules as a YAML list were refused without saying which form
    # works: both forms are one setting
    given = load_config(TrainConfig, None, ["run.loggers=tensorboard,mlflow", "lora.target_modules=[q_proj, v_proj]"])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("run:\n  loggers: [tensorboard, mlflow]\nlora:\n  target_modules: q_proj,v_proj\n")
    written = load_config(TrainConfig, yaml_file)
    for c in (given, written):
        assert c.run.loggers == ["tensorboard", "mlflow"] and c.lora.target_modules == "q_proj,v_proj"


def test_a_missing_tracker_is_one_line(monkeypatch):
    import importlib.util

    from unison.errors import UserError
    from unison.report import resolve_loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'unison\[wandb\]'"):
        resolve_loggers(["wandb"])


# ---- the engine self-test --------------------------------------------------------------------------------------------
def test_the_self_test_passes_a_sound_engine_and_stops_a_broken_one(tiny_dir, tmp_path, prompts, monkeypatch, capsys):
    from unison.conformance import SELF_TEST_BANDS, SelfTestError
    from unison.rollout.native import NativeEngine

    train(cfg(tiny_dir, tmp_path / "ok", **{"run.steps": 1}))
    first = capsys.readouterr().out.splitlines()[0]
    assert "engine self-test" in first and f"(band {SELF_TEST_BANDS[torch.float32]:g})" in first
    generate = NativeEngine.generate

    def off_by_a_tenth(self, prompts, params, progress=False):  # an engine reporting other log-probs
        ro = generate(self, prompts, params, progress)
        ro.logprobs[ro.mask] -= 0.1
        return ro

    monkeypatch.setattr(NativeEngine, "generate", off_by_a_tenth)
    with pytest.raises(SelfTestError, match=r"mean \|log pi - log mu\| is 0.1 .* beyond the 0.0001 that rollout fp32"):
        train(cfg(tiny_dir, tmp_path / "broken", **{"run.steps": 1}), quiet=True)
    assert not (tmp_path / "broken" / "checkpoints").exists()
    train(cfg(tiny_dir, tmp_path / "anyway", **{"run.steps": 1, "run.self_test": False}), quiet=True)
