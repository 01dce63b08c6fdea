"""The built-in default: tokenizer, shipped model, perfectible set and warm-start recipe."""

import json
import random

import torch

from unison.evaluation import encode_all, evaluate
from unison.models import ASSETS, build_tokenizer, load_tokenizer
from unison.rollout.base import SamplingParams
from unison.rollout.native import NativeEngine
from unison.tasks.countdown import CountdownTask
from unison.warmstart import training_response


def test_tokenizer_round_trip_and_loads_from_checkpoint(builtin_dir):
    tok = load_tokenizer(builtin_dir)
    text = "347-8:\n347,339\n#3 é"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert tok(text, add_special_tokens=False).input_ids == build_tokenizer()(text, add_special_tokens=False).input_ids
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0


def test_starting_accuracy_between_10_and_60_percent(builtin_dir):
    task = CountdownTask()
    tok = load_tokenizer(builtin_dir)
    engine = NativeEngine.from_pretrained(builtin_dir, torch.float32, "cpu", seed=0)
    examples = task.examples("test", n=96, seed=0)
    prompts = encode_all(tok, examples, "plain")
    res = evaluate(engine, task, tok, examples, prompts, SamplingParams(256, 1.0, stop_token_ids=(1,)), n=1)
    assert 0.10 <= res["avg@1"] <= 0.60, res["avg@1"]


def test_perfectible_set_is_training_prompts():
    rows = [json.loads(x) for x in (ASSETS / "countdown-perfectible.jsonl").read_text().splitlines()]
    train_ids = {e.id for e in CountdownTask().all_examples("train")}
    assert len(rows) > 100
    assert all(r["id"] in train_ids and 0.2 <= r["solve_rate"] <= 0.8 for r in rows)


def test_warm_start_answer_noise():
    task = CountdownTask()
    ex = task.example(47, 9)
    rng = random.Random(0)
    clean = {training_response(task, ex, rng, 0.0) for _ in range(20)}
    assert clean == {task.reference(ex)}
    noisy = [training_response(task, ex, rng, 0.5) for _ in range(200)]
    assert set(noisy) == {task.reference(ex), "47,38,29,20,11,2\n#11"}
    assert 60 < sum(r == task.reference(ex) for r in noisy) < 140


def test_the_builtin_moe_model_is_a_warm_started_qwen3_moe():
    from unison.models import load_model, resolve_model_dir
    from unison.routing import routers

    path = resolve_model_dir("builtin-moe")
    model = load_model(path)
    assert model.config.model_type == "qwen3_moe" and len(routers(model)) == model.config.num_hidden_layers
    task, tok = CountdownTask(), load_tokenizer(path)
    engine = NativeEngine(model, torch.float32, "cpu", seed=0)
    examples = task.examples("test", n=64, seed=0)
    res = evaluate(
        engine,
        task,
        tok,
        examples,
        encode_all(tok, examples, "plain"),
        SamplingParams(256, 1.0, stop_token_ids=(1,)),
        n=1,
    )
    assert 0.10 <= res["avg@1"] <= 0.75, res["avg@1"]


def test_the_builtin_long_model_takes_long_responses():
    from unison.config import DataConfig, ModelConfig, RolloutConfig
    from unison.setup import build

    s = build(ModelConfig(path="builtin-long"), DataConfig(source="countdown-long"), RolloutConfig(max_new_tokens=1400))
    assert s.context == 2048 and s.task.name == "countdown-long" and s.max_new_tokens == 1400
    assert s.config.model_type == "qwen2" and s.tokenizer.model_max_length == 2048
