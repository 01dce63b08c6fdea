"""The shared set-up (`unison.setup`) and what it resolves for every command: stop ids and strings, the model's
context, the attention implementation, the decode path it reports; checkpoints a user can load anywhere (the
dtype config.json states, shards, `unison export`); one config shape and flags and overrides in any order."""

import json

import pytest
import torch

from unison.config import DataConfig, ModelConfig, RolloutConfig
from unison.errors import UserError
from unison.models import build_tokenizer, eos_token_ids, random_model, save_model
from unison.rollout.base import Rollouts, SamplingParams, cut_at_stop_strings, stop_string_end
from unison.setup import build

TOK = build_tokenizer()


def _setup(model_dir, **rollout):
    return build(ModelConfig(path=str(model_dir)), DataConfig(), RolloutConfig(**rollout))


# ---- stop tokens and strings ---------------------------------------------------------------------------------
def test_eos_ids_are_the_union_of_tokenizer_generation_config_and_config(tmp_path):
    model = random_model(seed=0)
    model.generation_config.eos_token_id = [1, 7]  # a list, as chat models ship it
    model.config.eos_token_id = 9
    d = save_model(model, TOK, tmp_path / "m")
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == [1, 7]
    assert eos_token_ids(TOK, d) == (1, 7, 9)
    assert eos_token_ids(TOK) == (1,)
    s = _setup(d)
    assert s.stop_token_ids == (1, 7, 9) and s.sampling().stop_token_ids == (1, 7, 9)


def test_stop_string_end_and_cut_by_hand():
    decode = lambda ids: "".join(chr(i) for i in ids)  # one character a token
    ids = [ord(c) for c in "ab</s>cd"]
    assert stop_string_end(ids, decode, ("</s>",)) == 6  # the token that completes it is kept
    assert stop_string_end(ids, decode, ("zz",)) is None
    assert stop_string_end(ids, decode, ("cd", "b<")) == 3  # the first occurrence of any
    ro = Rollouts(
        [[1], [1]],
        torch.tensor([ids, [ord(c) for c in "xxxxxxxx"]]),
        torch.full((2, 8), -0.5),
        torch.ones(2, 8, dtype=torch.bool),
        torch.tensor([8, 8]),
        torch.tensor([False, False]),
    )
    cut = cut_at_stop_strings(ro, lambda prompt, part: decode(part), ("</s>",), pad_token_id=0)
    assert cut.lengths.tolist() == [6, 8] and cut.finished.tolist() == [True, False]
    assert (
        cut.mask.sum(1).tolist() == [6, 8] and cut.logprobs[0, 6:].eq(0).all() and cut.response_ids[0, 6:].eq(0).all()
    )


def test_response_text_keeps_the_leading_space_a_tokenizer_drops_on_its_own():
    from unison.rollout.base import response_text

    class SentencePieceLike:  # decoding a sequence on its own drops its leading space
        def decode(self, ids, skip_special_tokens=False):
            return "".join(map(chr, ids)).lstrip(" ")

    tok = SentencePieceLike()
    prompt, response = [ord(c) for c in "Q:"], [ord(c) for c in " Answer 4"]
    assert tok.decode(response) == "Answer 4" and response_text(tok, prompt, response) == " Answer 4"
    assert stop_string_end(response, lambda part: response_text(tok, prompt, part), (" Answer",)) == 7


def test_native_engine_stops_at_stop_strings(tiny_dir):
    from unison.rollout.native import NativeEngine

    engine = NativeEngine.from_pretrained(tiny_dir, torch.float32, "cpu", seed=0)
    prompts = [TOK("47-9:").input_ids] * 16
    free = engine.generate(prompts, SamplingParams(40))
    stops = ("a", "e", "3")
    cut = NativeEngine.from_pretrained(tiny_dir, torch.float32, "cpu", seed=0).generate(
        prompts, SamplingParams(40, stop_strings=stops)
    )
    texts = [TOK.decode(r, skip_special_tokens=True) for r in cut.responses()]
    assert any(cut.finished) and cut.lengths.float().mean() < free.lengths.float().mean()
    for i, (text, fin, n) in enumerate(zip(texts, cut.finished.tolist(), cut.lengths.tolist())):
        if fin and cut.response_ids[i, n - 1] != 1:  # ended by a stop string, not EOS
            assert any(text.endswith(x) for x in stops) and not any(x in text[:-1] for x in stops), text
    # the log-probs are still the sampler's: the learner recomputes them
    from unison.learner import Learner
    from unison.mismatch import mismatch_metrics
    from unison.precision import PrecisionPolicy

    lr = Learner.from_pretrained(tiny_dir, PrecisionPolicy(torch.float32, torch.float32), "cpu")
    assert mismatch_metrics(lr.recompute(cut), cut.logprobs, cut.mask)["abs_log_ratio_mean"] < 1e-5


# ---- the model's context, attention, decode path -------------------------------------------------------------
def test_context_limit_error_or_clamp(tmp_path):
    from unison.archs import save_tiny
    from unison.tasks.base import Example

    d = save_tiny("gpt2", tmp_path / "gpt2")  # learned positions: 256
    long = [Example("1" * 200, "0", id="long")]
    s = _setup(d, max_new_tokens=100)
    with pytest.raises(UserError, match=r"prompt 'long' has 200 tokens.*context of 256.*max_new_tokens to 56"):
        s.encode(long)
    s = _setup(d, max_new_tokens=100, context_limit="clamp")
    with pytest.warns(UserWarning, match="lowered from 100 to 56"):
        s.encode(long)
    assert s.max_new_tokens == 56 and s.sampling().max_new_tokens == 56
    with pytest.raises(UserError, match="no room"):
        _setup(d, context_limit="clamp").encode([Example("1" * 256, "0", id="full")])


def test_attention_implementation(tmp_path):
    from unison.archs import save_tiny

    d = save_tiny("gemma2", tmp_path / "gemma2")
    assert _setup(d).attn_implementation == "eager"  # Gemma2: sdpa has no attention softcapping
    assert (
        build(ModelConfig(path=str(d), attn_implementation="eager"), DataConfig(), RolloutConfig()).attn_implementation
        == "eager"
    )
    with pytest.raises(
        UserError, match="cannot run model.attn_implementation=sdpa: SDPA does not apply its attention soft"
    ):
        build(ModelConfig(path=str(d), attn_implementation="sdpa"), DataConfig(), RolloutConfig())
    assert _setup(save_tiny("qwen2", tmp_path / "qwen2")).attn_implementation == "sdpa"


def test_the_first_line_says_which_decode_path_the_engine_runs(tmp_path, capsys):
    from unison.archs import save_tiny
    from unison.config import TrainConfig, load_config
    from unison.trainer import train

    for name, path in (
        ("qwen2", "fast path"),
        ("mistral-window", "fast path"),
        ("gpt2", "fallback to the model's own forward (gpt2 is not a fast-path family"),
    ):
        d = save_tiny(name, tmp_path / name)
        cfg = load_config(
            TrainConfig,
            None,
            {
                "model.path": str(d),
                "run.out": str(tmp_path / f"run-{name}"),
                "run.steps": 1,
                "run.eval_every": 0,
                "run.eval_prompts": 2,
                "run.progress": False,
                "run.loggers": ["jsonl"],
                "rollout.prompts_per_step": 2,
                "rollout.group_size": 2,
                "rollout.max_new_tokens": 4,
                "optim.train_batch_size": 4,
                "precision.rollout": "fp32",
                "precision.train": "fp32",
            },
        )
        train(cfg)
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("unison train: ") and path in first and "float32" in first, first


# ---- checkpoints a user can load anywhere ----------------------------------------------------------------------
def _run(tmp_path, model_dir, **extra):
    from unison.config import TrainConfig, load_config
    from unison.trainer import train

    overrides = {
        "model.path": str(model_dir),
        "run.out": str(tmp_path / "run"),
        "run.steps": 2,
        "run.eval_every": 0,
        "run.eval_prompts": 2,
        "run.save_every": 1,
        "run.progress": False,
        "run.loggers": ["jsonl"],
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 4,
        "rollout.max_new_tokens": 12,
        "optim.train_batch_size": 8,
        "optim.lr": 1e-3,
        "precision.rollout": "fp16",
        "precision.train": "fp16",
        **extra,
    }
    return load_config(TrainConfig, None, overrides), train


def test_checkpoint_config_states_the_stored_dtype_and_loads_as_fp32(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from unison.checkpoint import latest_checkpoint

    cfg, train = _run(tmp_path, tiny_dir, **{"run.steps": 1})
    ck = latest_checkpoint(train(cfg, quiet=True))
    assert json.loads((ck / "config.json").read_text())["dtype"] == "float32"
    plain = AutoModelForCausalLM.from_pretrained(str(ck))  # no dtype given: config.json's
    assert next(plain.parameters()).dtype == torch.float32


def test_sharded_checkpoints_save_load_and_resume_bit_exactly(tiny_dir, tmp_path):
    from unison.checkpoint import INDEX, latest_checkpoint, load_master, read_weights

    cfg, train = _run(tmp_path, tiny_dir, **{"run.shard_size": "300KB"})
    whole = train(cfg, quiet=True)
    ck = latest_checkpoint(whole)
    shards = sorted(p.name for p in ck.glob("model-*.safetensors"))
    assert (ck / INDEX).is_file() and len(shards) >= 2 and not (ck / "model.safetensors").exists()
    assert set(read_weights(ck)) == set(json.loads((ck / INDEX).read_text())["weight_map"])
    cfg1, _ = _run(tmp_path / "b", tiny_dir, **{"run.shard_size": "300KB", "run.steps": 1})
    train(cfg1, quiet=True)
    cfg2, _ = _run(tmp_path / "b", tiny_dir, **{"run.shard_size": "300KB"})
    resumed = train(cfg2, resume=True, quiet=True)
    a, b = load_master(latest_checkpoint(whole)), load_master(latest_checkpoint(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a sharded checkpoint is a model folder like any other: it trains
    cfg3, _ = _run(tmp_path / "c", ck, **{"run.steps": 1})
    train(cfg3, quiet=True)


def test_export_writes_a_plain_model_folder_in_the_asked_dtype(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from unison.checkpoint import latest_checkpoint, load_master
    from unison.cli import main

    cfg, train = _run(tmp_path, tiny_dir, **{"run.steps": 1})
    run = train(cfg, quiet=True)
    assert main(["export", str(run), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    out = tmp_path / "bf16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out / "trainer_state.pt").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    master = load_master(latest_checkpoint(run))
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, master[name].to(torch.bfloat16)), name
    assert main(["export", str(run), "--out", str(tmp_path / "bf16")]) == 2  # not empty now: refused
    weights = latest_checkpoint(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))  # damaged after it was written: never exported
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 2
    assert main(["export", str(latest_checkpoint(run)), "--out", str(tmp_path / "again")]) == 2
    assert not (tmp_path / "again").exists()


# ---- one config shape, flags and overrides anywhere ------------------------------------------------------------
def test_overrides_stand_anywhere_among_the_flags():
    from unison.cli import _overrides, parse

    args = parse(["train", "rollout.group_size=4", "--steps", "1", "optim.lr=0.5", "--seed", "3"])
    assert dict(_overrides(args, "train")) == {"run.steps": 1, "run.seed": 3, "rollout.group_size": 4, "optim.lr": 0.5}
    with pytest.raises(UserError, match="'stray' is not key=value"):
        _overrides(parse(["train", "--steps", "1", "stray"]), "train")
    with pytest.raises(SystemExit):
        parse(["train", "optim.lr=0.5", "--bogus"])


def test_every_command_takes_the_same_keys():
    from unison.commands import EvalConfig, FilterConfig
    from unison.config import TrainConfig, describe, load_config
    from unison.probe import ProbeConfig

    shared = {"model.path=m", "data.prompt_key=question", "rollout.temperature=0.7", "rollout.max_new_tokens=9"}
    for cls in (TrainConfig, ProbeConfig, EvalConfig, FilterConfig):
        cfg = load_config(cls, None, [*shared, "run.seed=5"])
        assert cfg.data.prompt_key == "question" and cfg.rollout.temperature == 0.7 and cfg.run.seed == 5
        keys = {line.split()[0] for line in describe(cls)}
        assert {"model.path", "model.attn_implementation", "data.prompt_key", "rollout.stop", "run.out"} <= keys
    with pytest.raises(UserError, match="unknown config key 'prompt_key'"):
        load_config(EvalConfig, None, ["prompt_key=question"])


def test_precision_names_are_case_insensitive():
    from unison.config import TrainConfig, load_config
    from unison.probe import ProbeConfig

    cfg = load_config(TrainConfig, None, ["precision.rollout=BF16", "precision.train=FP16"])
    assert (cfg.precision.rollout, cfg.precision.train) == ("bf16", "fp16")
    assert load_config(ProbeConfig, None, ["probe.precisions=[FP32, BF16/FP16]"]).settings_names() == [
        ("fp32", "fp32"),
        ("bf16", "fp16"),
    ]


def test_valid_choices_come_from_the_tables_that_define_them():
    from unison.algorithms import CORRECTIONS, PRESETS
    from unison.config import TrainConfig, describe, load_config
    from unison.rollout import ENGINES

    lines = {line.split()[0]: line for line in describe(TrainConfig)}
    assert all(name in lines["algorithm.preset"] for name in PRESETS)
    assert all(name in lines["algorithm.correction"] for name in CORRECTIONS)
    assert f"one of: {', '.join(sorted(ENGINES))}" in lines["rollout.engine"]
    with pytest.raises(UserError, match=f"unknown engine 'sglang'; choose one of: {', '.join(sorted(ENGINES))}"):
        load_config(TrainConfig, None, ["rollout.engine=sglang"])
