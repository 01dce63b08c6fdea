"""Bad input, one case per test: one line on stderr saying what is wrong and how to fix it, exit code 2, no
traceback, and every file that existed before left as it was.

The cases live in `CASES` so that `bench/bad_input_table.py` can run them and write the table of exact messages in
docs/reliability.md. Each case prepares its inputs under a fresh folder and returns the command line; a few also
inject a fault in-process (a read-only folder, a full disk). Every case runs with the model cache (UNISON_CACHE, where
GGUF files are converted and models fetched) in its folder, empty.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REWARD = f"{Path(__file__).parent / 'reward_fixture.py'}:even_length"
TINY_RUN = [
    "run.steps=2",
    "run.eval_every=0",
    "run.eval_prompts=4",
    "run.progress=false",
    "run.loggers=[jsonl]",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=8",
    "optim.train_batch_size=4",
    "data.max_prompts=8",
]


@dataclass
class Case:
    id: str
    area: str  # config, data, model, run folder, ranks
    what: str  # the bad input, in words
    make: Callable  # (folder, tiny model dir) -> argv; writes the case's inputs into folder
    expect: str  # a piece of the message
    fault: Callable | None = None  # (folder) -> context manager injecting a fault while the command runs
    check: Callable | None = None  # (folder) -> None, extra assertions after the command
    tags: list = field(default_factory=list)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def prompts(d: Path, rows: list[dict] | None = None, name="prompts.jsonl") -> Path:
    rows = rows if rows is not None else [{"prompt": f"{i}-3:", "answer": "0"} for i in range(10, 20)]
    return write(d / name, "".join(json.dumps(r) + "\n" for r in rows))


def model_copy(
    d: Path, tiny: Path, name: str, config: dict | None = None, files=("tokenizer.json", "tokenizer_config.json")
) -> Path:
    out = d / name
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        (out / f).write_bytes((tiny / f).read_bytes())
    if config is not None:
        (out / "config.json").write_text(json.dumps(config))
    return out


def train(tiny, *extra):
    """`unison train` on the tiny model, with the tiny run's settings and `extra` flags and overrides."""
    return ["train", "--model", str(tiny), *TINY_RUN, *extra]


def adapter_copy(d: Path, tiny: Path, rank: int, base: Path | None = None) -> Path:
    """A peft LoRA adapter (q_proj, v_proj) of the tiny model, saved as peft saves one, with the tokenizer."""
    from peft import LoraConfig, get_peft_model

    from unison.models import load_model

    out = d / "adapter"
    wrapped = get_peft_model(
        load_model(tiny), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    )
    wrapped.peft_config["default"].base_model_name_or_path = str(base or tiny)
    wrapped.save_pretrained(out)
    model_copy(d, tiny, "adapter")
    return out


def with_config(d: Path, tiny: Path, name: str, **changes) -> Path:
    """A copy of the tiny checkpoint's config and tokenizer (no weights) with `changes` in its config.json."""
    config = {**json.loads((tiny / "config.json").read_text()), **changes}
    return model_copy(d, tiny, name, config)


def sharded_missing_one(d: Path) -> Path:
    """A tiny checkpoint saved in shards with one of its shards deleted."""
    from unison.models import build_tokenizer, random_model

    out = d / "sharded"
    random_model(seed=0).save_pretrained(out, max_shard_size="300KB")
    build_tokenizer().save_pretrained(out)
    sorted(out.glob("model-*.safetensors"))[-1].unlink()
    return out


def damaged_checkpoint(d: Path, tiny: Path, how: str) -> Path:
    """A run folder whose one checkpoint (of the tiny model) lost a weight, or had its weights file's header
    overwritten, with a manifest that still agrees on the sizes (as after a bad copy)."""
    from safetensors.torch import load_file, save_file

    from unison import checkpoint as ckpt
    from unison.models import build_tokenizer, load_model

    model = load_model(tiny)
    run = d / "run"
    path = ckpt.save_checkpoint(run, 1, model, build_tokenizer(), dict(model.named_parameters()), {"step": 1})
    weights = path / "model.safetensors"
    if how == "missing":
        state = load_file(str(weights))
        state.pop("model.layers.0.mlp.down_proj.weight")
        save_file(state, str(weights), metadata={"format": "pt"})
    else:
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\x00" * 32  # the JSON header's start
        weights.write_bytes(bytes(data))
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = weights.stat().st_size
    if how == "missing":  # a checkpoint written without the weight: its manifest agrees with what is there
        manifest["sha256"]["model.safetensors"] = ckpt.file_hash(weights)
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    return run


def model_with(d: Path, tiny: Path, name: str, how: str) -> Path:
    """A full copy of the tiny checkpoint (`copy`), or one then damaged: truncated weights, a config with more
    layers than its weights, or a NaN weight."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out = d / name
    shutil.copytree(tiny, out)
    weights = out / "model.safetensors"
    if how == "copy":
        return out
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "layers":
        config = json.loads((out / "config.json").read_text())
        config["num_hidden_layers"] += 2
        config.pop("layer_types", None)
        (out / "config.json").write_text(json.dumps(config))
    else:
        state = load_file(str(weights))
        state["model.norm.weight"][3] = torch.nan
        save_file(state, str(weights), metadata={"format": "pt"})
    return out


def raising_reward(d: Path, tiny: Path, fn: str) -> list:
    """A run whose custom reward misbehaves; responses end at a lowercase letter, so that they finish and the
    reward is called."""
    return train(
        tiny,
        "--data",
        prompts(d),
        f"data.reward={REWARD.rsplit(':', 1)[0]}:{fn}",
        "rollout.stop=[a, e, i, o, u, t, n, s]",
    )


@contextlib.contextmanager
def not_installed(module: str):
    """`module` looks absent to unison (importlib finds no spec for it)."""
    import importlib.util

    real = importlib.util.find_spec
    importlib.util.find_spec = lambda name, *a: None if name == module else real(name, *a)
    try:
        yield
    finally:
        importlib.util.find_spec = real


def gemma2(d: Path) -> Path:
    from unison.archs import save_tiny

    return save_tiny("gemma2", d / "gemma2")


def checkpoint_of(d: Path, run: Path, **overrides) -> Path:
    """A run folder holding one complete checkpoint of a different model."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from unison import checkpoint as ckpt
    from unison.models import BUILTIN_CONFIG, build_tokenizer

    cfg = {**BUILTIN_CONFIG, "vocab_size": 272, **overrides}
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    ckpt.save_checkpoint(run, 1, model, build_tokenizer(), dict(model.named_parameters()), {"step": 1})
    return run


def tiny_gguf(d: Path, name: str = "m.gguf", cut: bool = False, **kwargs) -> Path:
    """A tiny GGUF file (tests/gguf_fixture.py), or its first half with `cut`."""
    from gguf_fixture import write_tiny_gguf

    write_tiny_gguf(d / name, **kwargs)
    if cut:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
    return d / name


@contextlib.contextmanager
def transformers_says(version: str):
    """transformers says it is `version` (to unison's GGUF reader)."""
    from unison import gguf

    real = gguf.transformers_version
    gguf.transformers_version = lambda: version
    try:
        yield
    finally:
        gguf.transformers_version = real


@contextlib.contextmanager
def cache_in(folder: Path):
    """The model cache of GGUF conversions and fetched models (UNISON_CACHE) in a case's folder, empty."""
    before = os.environ.get("UNISON_CACHE")
    os.environ["UNISON_CACHE"] = str(folder / "cache")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("UNISON_CACHE")
        else:
            os.environ["UNISON_CACHE"] = before


def no_cache(d: Path) -> None:
    assert not (d / "cache").exists(), "the model cache was written"


@contextlib.contextmanager
def read_only(folder: Path):
    """Writing anywhere under `folder` fails with EACCES, as on a read-only mount (tests run as root, so chmod
    cannot simulate it)."""
    import pathlib

    real = pathlib.Path.write_text

    def guarded(self, *a, **k):
        if str(self).startswith(str(folder)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    pathlib.Path.write_text = guarded
    try:
        yield
    finally:
        pathlib.Path.write_text = real


@contextlib.contextmanager
def env(**values):
    """Environment variables set (a value None: unset) while the command runs."""
    before = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, str(v))
    try:
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@contextlib.contextmanager
def broken_import(module: str):
    """`module` is installed but fails to import, as a broken install does (a dependency built for another
    version)."""
    import importlib

    real = importlib.import_module

    def fails(name, *a, **k):
        if name == module:
            raise ImportError(f"cannot import name 'Mapping' from 'collections' ({module}'s dependency)")
        return real(name, *a, **k)

    importlib.import_module = fails
    try:
        yield
    finally:
        importlib.import_module = real


def saved_run(d: Path, tiny: Path, *saved: str, lora: bool = False, base: Path | None = None) -> Path:
    """A run folder as `unison train` leaves it after one step: its config.yaml (the tiny run's settings and
    `saved`) and one complete checkpoint, of a LoRA adapter (q_proj, v_proj, rank 4, its base `base` or the tiny
    model) with `lora`, else of whole weights."""
    import yaml

    from unison import checkpoint as ckpt
    from unison.cli import _config, parse
    from unison.config import TrainConfig, to_dict
    from unison.lora import wrap
    from unison.models import build_tokenizer, load_model

    run = d / "run"
    argv = [str(a) for a in train(tiny, "--out", run, *saved)]
    cfg = _config(TrainConfig, parse(argv), "train")
    model = load_model(base or tiny)
    saved_model = wrap(model, cfg.lora.rank, cfg.lora.alpha, ["q_proj", "v_proj"]) if lora else model
    masters = {n: p for n, p in model.named_parameters() if p.requires_grad}  # by their names in the adapted model
    ckpt.save_checkpoint(run, 1, saved_model, build_tokenizer(), masters, {"step": 1})
    write(run / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write(run / "unison-run.json", "{}\n")
    return run


LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.target_modules=q_proj,v_proj"]


def damaged(folder: Path, name: str) -> Path:
    """`folder` with the last 64 bytes of its file `name` flipped: the same size, other bytes (a bad copy)."""
    file = folder / name
    data = bytearray(file.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])  # (a LoRA adapter's last bytes are zeros: B starts at 0)
    file.write_bytes(bytes(data))
    return folder


def exported_adapter_cut(d: Path, tiny: Path) -> Path:
    """An adapter in peft's format (as `unison export --adapter` writes one), its weights cut off half-way."""
    out = adapter_copy(d, tiny, rank=4)
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out


def small_vocab(d: Path) -> Path:
    """A tiny model whose vocabulary (40 tokens) is smaller than its tokenizer's (261)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from unison.models import BUILTIN_CONFIG, build_tokenizer, save_model

    config = Qwen2Config(**{**BUILTIN_CONFIG, "num_hidden_layers": 1}, vocab_size=40, eos_token_id=1, pad_token_id=0)
    return save_model(Qwen2ForCausalLM(config), build_tokenizer(), d / "small-vocab")


C = Case
CASES = [
    # ---- config ----------------------------------------------------------------------------------------------
    C(
        "yaml-malformed",
        "config",
        "malformed YAML",
        lambda d, t: train(t, "--config", write(d / "c.yaml", "optim: [\n")),
        "not valid YAML",
    ),
    C(
        "yaml-not-mapping",
        "config",
        "YAML holding a list, not sections",
        lambda d, t: train(t, "--config", write(d / "c.yaml", "- 1\n- 2\n")),
        "must hold a mapping",
    ),
    C(
        "yaml-duplicate-key",
        "config",
        "a YAML section given twice",
        lambda d, t: train(t, "--config", write(d / "c.yaml", "optim:\n  lr: 1e-5\noptim:\n  lr: 2e-5\n")),
        "appears twice",
    ),
    C(
        "infinite-init-scale",
        "config",
        "an infinite loss scale",
        lambda d, t: train(t, "precision.init_scale=.inf"),
        "finite number",
    ),
    C("nan-learning-rate", "config", "NaN learning rate", lambda d, t: train(t, "optim.lr=.nan"), "finite number"),
    C("negative-count", "config", "a negative count", lambda d, t: train(t, "run.eval_prompts=-4"), "must be >= 0"),
    C(
        "beta-out-of-range",
        "config",
        "an AdamW beta of 1.5",
        lambda d, t: train(t, "optim.beta1=1.5"),
        "betas must be in [0, 1)",
    ),
    C(
        "icepop-bounds",
        "config",
        "IcePop bounds the wrong way round",
        lambda d, t: train(t, "algorithm.icepop_alpha=6"),
        "icepop_alpha < icepop_beta",
    ),
    C(
        "unknown-schedule",
        "config",
        "an unknown learning-rate schedule",
        lambda d, t: train(t, "optim.schedule=exponential"),
        "unknown schedule 'exponential'; choose one of: constant, cosine, linear",
    ),
    C(
        "negative-kl-coef",
        "config",
        "a negative KL coefficient",
        lambda d, t: train(t, "algorithm.kl_coef=-0.1"),
        "algorithm.kl_coef",
    ),
    C(
        "tracker-not-installed",
        "config",
        "a tracker that is not installed",
        lambda d, t: train(t, "run.loggers=[wandb]"),
        "pip install 'unison[wandb]'",
        fault=lambda d: not_installed("wandb"),
    ),
    C(
        "eval-k-above-n",
        "config",
        "eval pass@k with fewer samples than k",
        lambda d, t: ["eval", "--model", t, "--n", "2", "--k", "1,4"],
        "pass@4 needs at least",
    ),
    C(
        "config-missing",
        "config",
        "config file does not exist",
        lambda d, t: train(t, "--config", d / "nope.yaml"),
        "not found",
    ),
    C("unknown-key", "config", "unknown key", lambda d, t: train(t, "optim.learning_rate=1e-5"), "unknown config key"),
    C(
        "unknown-key-yaml",
        "config",
        "unknown key in a YAML section",
        lambda d, t: train(t, "--config", write(d / "c.yaml", "optim:\n  learnrate: 1\n")),
        "unknown config key",
    ),
    C("override-not-kv", "config", "override without '='", lambda d, t: train(t, "optim.lr"), "is not key=value"),
    C(
        "wrong-type-float",
        "config",
        "a word where a number goes",
        lambda d, t: train(t, "optim.lr=fast"),
        "expected a number",
    ),
    C(
        "wrong-type-int",
        "config",
        "a fraction where an integer goes",
        lambda d, t: train(t, "rollout.group_size=2.5"),
        "expected an integer",
    ),
    C(
        "wrong-type-bool",
        "config",
        "not a boolean",
        lambda d, t: train(t, "run.progress=maybe"),
        "expected true or false",
    ),
    C("out-of-range-top-p", "config", "top_p above 1", lambda d, t: train(t, "rollout.top_p=1.5"), "rollout.top_p"),
    C(
        "out-of-range-temperature",
        "config",
        "temperature 0 for RL",
        lambda d, t: train(t, "rollout.temperature=0"),
        "rollout.temperature",
    ),
    C("out-of-range-lr", "config", "negative learning rate", lambda d, t: train(t, "optim.lr=-1"), "optim.lr"),
    C(
        "batch-not-divisible",
        "config",
        "train batch does not divide the rollout batch",
        lambda d, t: train(t, "optim.train_batch_size=3"),
        "does not divide",
    ),
    C(
        "resume-and-overwrite",
        "config",
        "--resume with --overwrite",
        lambda d, t: train(t, "--out", d / "run", "--resume", "--overwrite"),
        "contradict",
    ),
    C(
        "probe-half-mixed",
        "config",
        "--rollout-precision without --train-precision",
        lambda d, t: ["probe", "--model", t, "--rollout-precision", "fp16"],
        "give both",
    ),
    C(
        "filter-lo-above-hi",
        "config",
        "filter lo above hi",
        lambda d, t: ["filter", "--model", t, "--lo", "0.9", "--hi", "0.1"],
        "lo",
    ),
    C("unknown-precision", "config", "unknown precision", lambda d, t: train(t, "--precision", "fp8"), "precision"),
    C(
        "unknown-preset",
        "config",
        "unknown algorithm preset",
        lambda d, t: train(t, "--preset", "ppo"),
        "choose one of",
    ),
    C(
        "unknown-overflow-mode",
        "config",
        "unknown activation-overflow action",
        lambda d, t: train(t, "precision.on_activation_overflow=ignore"),
        "on_activation_overflow",
    ),
    C(
        "cuda-without-gpu",
        "config",
        "--device cuda on a machine without a GPU",
        lambda d, t: train(t, "--device", "cuda"),
        "no CUDA GPU",
        tags=["cpu-only"],
    ),
    # ---- data ------------------------------------------------------------------------------------------------
    C(
        "data-missing",
        "data",
        "prompt file does not exist",
        lambda d, t: train(t, "--data", d / "missing.jsonl"),
        "does not exist",
    ),
    C("data-directory", "data", "prompt path is a folder", lambda d, t: train(t, "--data", d), "is a directory"),
    C(
        "data-empty",
        "data",
        "empty prompt file",
        lambda d, t: train(t, "--data", write(d / "e.jsonl", "")),
        "has no rows",
    ),
    C(
        "data-no-prompt-column",
        "data",
        "prompt column missing",
        lambda d, t: train(t, "--data", prompts(d, [{"question": "1+1", "answer": "2"}])),
        "prompt",
    ),
    C(
        "data-no-answer-column",
        "data",
        "answer column missing",
        lambda d, t: train(t, "--data", prompts(d, [{"prompt": "1+1"}])),
        "answer",
    ),
    C(
        "data-empty-answer",
        "data",
        "empty answer",
        lambda d, t: train(t, "--data", prompts(d, [{"prompt": "1+1", "answer": ""}])),
        "answer",
    ),
    C(
        "data-empty-prompt",
        "data",
        "empty prompt",
        lambda d, t: train(t, "--data", prompts(d, [{"prompt": "", "answer": "2"}])),
        "empty prompt",
    ),
    C(
        "data-not-utf8",
        "data",
        "a line that is not UTF-8",
        lambda d, t: train(
            t,
            "--data",
            write(d / "p.jsonl", b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "\xff\xfe", "answer": "2"}\n'),
        ),
        "not UTF-8",
    ),
    C(
        "data-bad-json",
        "data",
        "a line that is not JSON",
        lambda d, t: train(t, "--data", write(d / "p.jsonl", '{"prompt": "1+1", "answer": "2"}\n{"prompt": \n')),
        "not valid JSON",
    ),
    C(
        "data-prompt-too-long",
        "data",
        "a prompt longer than the model's context",
        lambda d, t: train(t, "--data", prompts(d, [{"prompt": "1" * 1100, "answer": "2"}]), "data.template=plain"),
        "context",
    ),
    C(
        "reward-raises",
        "data",
        "a reward function that raises",
        lambda d, t: raising_reward(d, t, "raises"),
        "reward function '",
    ),
    C(
        "reward-not-finite-fp32",
        "data",
        "a reward beyond fp32's range (1e300)",
        lambda d, t: raising_reward(d, t, "huge"),
        "fp32's range",
    ),
    C(
        "reward-wrong-type",
        "data",
        "a reward that returns a string",
        lambda d, t: raising_reward(d, t, "not_a_number"),
        "make it return a float",
    ),
    C(
        "data-reward-missing",
        "data",
        "custom reward that does not import",
        lambda d, t: train(t, "--data", prompts(d), "data.reward=nosuchmodule:fn"),
        "nosuchmodule",
    ),
    # ---- model -----------------------------------------------------------------------------------------------
    C("model-missing", "model", "model directory does not exist", lambda d, t: train(d / "nope"), "does not exist"),
    C(
        "model-no-config",
        "model",
        "directory without config.json",
        lambda d, t: train(model_copy(d, t, "m")),
        "no config.json",
    ),
    C(
        "model-bad-config",
        "model",
        "config.json that is not JSON",
        lambda d, t: train(write(d / "m" / "config.json", "{not json").parent),
        "not valid JSON",
    ),
    C(
        "model-no-tokenizer",
        "model",
        "checkpoint without a tokenizer",
        lambda d, t: train(model_copy(d, t, "m", json.loads((t / "config.json").read_text()), files=())),
        "no tokenizer",
    ),
    C(
        "model-encoder",
        "model",
        "unsupported architecture: BERT (an encoder)",
        lambda d, t: train(model_copy(d, t, "m", {"model_type": "bert", "vocab_size": 272})),
        "encoder",
    ),
    C(
        "model-unknown-type",
        "model",
        "unknown model_type",
        lambda d, t: train(model_copy(d, t, "m", {"model_type": "mystery-lm"})),
        "unknown type",
    ),
    C(
        "model-not-causal",
        "model",
        "a model type that is not a causal LM (ViT)",
        lambda d, t: train(model_copy(d, t, "m", {"model_type": "vit"})),
        "not a causal LM",
    ),
    C(
        "model-truncated-weights",
        "model",
        "model.safetensors cut off half-way",
        lambda d, t: train(model_with(d, t, "m", "truncated")),
        "cannot load the checkpoint",
    ),
    C(
        "model-more-layers",
        "model",
        "config.json with more layers than the weights",
        lambda d, t: train(model_with(d, t, "m", "layers")),
        "has no weight model.layers.4",
    ),
    C(
        "model-nan-weights",
        "model",
        "a NaN in the fp32 weights",
        lambda d, t: train(model_with(d, t, "m", "nan")),
        "model.norm.weight holds NaN",
    ),
    C(
        "model-quantized",
        "model",
        "a quantized checkpoint (GPTQ)",
        lambda d, t: train(with_config(d, t, "q", quantization_config={"quant_method": "gptq", "bits": 4})),
        "quantized",
    ),
    C(
        "model-dynamic-rope",
        "model",
        "rotary scaling that changes with the sequence length",
        lambda d, t: train(with_config(d, t, "r", rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
        "rotary",
    ),
    C(
        "model-dynamic-rope-per-layer",
        "model",
        "length-dependent rotary scaling on one layer type (Gemma3-style)",
        lambda d, t: train(
            with_config(
                d,
                t,
                "r2",
                rope_parameters={
                    "full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                },
            )
        ),
        "rotary",
    ),
    C(
        "model-shard-missing",
        "model",
        "a sharded checkpoint missing a shard",
        lambda d, t: train(sharded_missing_one(d)),
        "missing",
    ),
    C(
        "gguf-not-gguf",
        "model",
        "a .gguf file that is not GGUF",
        lambda d, t: train(write(d / "m.gguf", "not a model")),
        "is not a GGUF file",
        check=no_cache,
    ),
    C(
        "gguf-truncated",
        "model",
        "a GGUF file cut off half-way",
        lambda d, t: train(tiny_gguf(d, cut=True)),
        "cut short",
        check=no_cache,
    ),
    C(
        "gguf-architecture",
        "model",
        "a GGUF file of an architecture transformers cannot read",
        lambda d, t: train(tiny_gguf(d, arch="mystery")),
        "holds a 'mystery' model, which transformers",
        check=no_cache,
    ),
    C(
        "gguf-two-files",
        "model",
        "a folder holding two .gguf files",
        lambda d, t: train(tiny_gguf(d, "a.gguf") and tiny_gguf(d, "b.gguf").parent),
        "holds 2 GGUF files",
        check=no_cache,
    ),
    C(
        "gguf-transformers-4",
        "model",
        "a GGUF file with transformers 4",
        lambda d, t: train(tiny_gguf(d)),
        "transformers >= 5",
        fault=lambda d: transformers_says("4.57.1"),
        check=no_cache,
    ),
    C(
        "model-not-fetched",
        "model",
        "a fetchable model not fetched yet",
        lambda d, t: train("smollm2-135m-instruct"),
        "fetch it once with: unison fetch smollm2-135m-instruct",
        check=no_cache,
    ),
    C(
        "fetch-unknown",
        "model",
        "unison fetch of a model it does not know",
        lambda d, t: ["fetch", "gpt-5"],
        "unknown fetchable model 'gpt-5'; choose one of: smollm2-135m-instruct",
    ),
    C(
        "attn-flash-missing",
        "model",
        "flash_attention_2 without flash-attn installed",
        lambda d, t: train(t, "model.attn_implementation=flash_attention_2"),
        "flash-attn",
    ),
    C(
        "attn-sdpa-gemma2",
        "model",
        "sdpa for Gemma2, which sdpa cannot run",
        lambda d, t: train(gemma2(d), "model.attn_implementation=sdpa"),
        "eager",
    ),
    C(
        "context-overflow",
        "data",
        "prompt + max_new_tokens beyond the model's context",
        lambda d, t: train(
            t,
            "--data",
            prompts(d, [{"prompt": "1" * 900, "answer": "2"}]),
            "data.template=plain",
            "rollout.max_new_tokens=200",
        ),
        "rollout.context_limit=clamp",
    ),
    C(
        "export-into-nonempty",
        "run folder",
        "export into a folder that holds files",
        lambda d, t: ["export", checkpoint_of(d, d / "run"), "--out", write(d / "out" / "notes.txt", "mine").parent],
        "not empty",
    ),
    C(
        "export-not-a-checkpoint",
        "run folder",
        "export a folder that is no run or checkpoint",
        lambda d, t: ["export", d, "--out", d / "out"],
        "neither a run folder",
    ),
    C(
        "resume-missing-weight",
        "model",
        "--resume from a checkpoint that lost a weight",
        lambda d, t: train(t, "--out", damaged_checkpoint(d, t, "missing"), "--resume"),
        "has no weight model.layers.0.mlp.down_proj.weight",
    ),
    C(
        "resume-corrupt-weights",
        "model",
        "--resume from a run whose only checkpoint was damaged after it was written",
        lambda d, t: train(t, "--out", damaged_checkpoint(d, t, "corrupt"), "--resume"),
        "do not match their hashes",
    ),
    C(
        "resume-other-vocab",
        "model",
        "--resume into a run whose checkpoint has another vocabulary",
        lambda d, t: train(t, "--out", checkpoint_of(d, d / "run", vocab_size=300), "--resume"),
        "another model",
    ),
    C(
        "resume-other-arch",
        "model",
        "--resume into a run whose checkpoint has another architecture",
        lambda d, t: train(t, "--out", checkpoint_of(d, d / "run", num_hidden_layers=2), "--resume"),
        "another model",
    ),
    # ---- run folder ------------------------------------------------------------------------------------------
    C(
        "run-exists",
        "run folder",
        "run folder exists, no --resume or --overwrite",
        lambda d, t: train(t, "--out", write(d / "run" / "metrics.jsonl", '{"step": 1}\n').parent),
        "--resume",
    ),
    C(
        "run-is-file",
        "run folder",
        "run.out is a file",
        lambda d, t: train(t, "--out", write(d / "run", "x")),
        "is a file",
    ),
    C(
        "run-under-file",
        "run folder",
        "run.out inside a file (cannot be created)",
        lambda d, t: train(t, "--out", write(d / "f", "x") / "run"),
        "cannot write",
    ),
    C(
        "run-read-only",
        "run folder",
        "read-only parent folder",
        lambda d, t: train(t, "--out", (d / "ro").mkdir() or d / "ro" / "run"),
        "cannot write",
        fault=lambda d: read_only(d / "ro"),
    ),
    C(
        "overwrite-foreign-folder",
        "run folder",
        "--overwrite of a folder unison did not make",
        lambda d, t: train(t, "--out", write(d / "mine" / "notes.txt", "keep me").parent, "--overwrite"),
        "not a unison run folder",
    ),
    C(
        "allow-changes-without-resume",
        "config",
        "--allow-changes without --resume",
        lambda d, t: train(t, "--allow-changes"),
        "goes with --resume",
    ),
    # ---- other commands --------------------------------------------------------------------------------------
    C(
        "eval-unknown-engine",
        "config",
        "eval with an unknown engine",
        lambda d, t: ["eval", "--model", t, "--engine", "sglang"],
        "engine",
    ),
    C(
        "plot-unknown-metric",
        "run folder",
        "plot a metric no run has",
        lambda d, t: [
            "plot",
            write(d / "run" / "metrics.jsonl", '{"step": 1, "rollout/accuracy": 0.5}\n').parent,
            "--metrics",
            "rollout/acurracy",
        ],
        "no run has the metric",
    ),
    C(
        "plot-out-is-folder",
        "run folder",
        "plot into a folder",
        lambda d, t: [
            "plot",
            write(d / "run" / "metrics.jsonl", '{"step": 1, "rollout/accuracy": 0.5}\n').parent,
            "--metrics",
            "rollout/accuracy",
            "--out",
            d,
        ],
        "is a folder",
    ),
    C(
        "filter-out-is-folder",
        "run folder",
        "filter output path that is a folder",
        lambda d, t: ["filter", "--model", t, "--out", d],
        "is a folder",
    ),
    C(
        "eval-json-is-folder",
        "run folder",
        "eval JSON path that is a folder",
        lambda d, t: ["eval", "--model", t, "--json", d],
        "is a folder",
    ),
    C(
        "probe-out-is-file",
        "run folder",
        "probe output folder that is a file",
        lambda d, t: ["probe", "--model", t, "--out", write(d / "f", "x")],
        "is a file",
    ),
    C(
        "plot-not-a-run",
        "run folder",
        "plot a folder without metrics.jsonl",
        lambda d, t: ["plot", d],
        "no metrics.jsonl",
    ),
    # ---- several ranks ---------------------------------------------------------------------------------------
    C(
        "nproc-beyond-devices",
        "ranks",
        "--nproc beyond the cores (CPU) or GPUs",
        lambda d, t: train(t, "--nproc", "64"),
        "more ranks than",
    ),
    C(
        "nccl-on-cpu",
        "ranks",
        "the NCCL backend on a CPU",
        lambda d, t: train(t, "--nproc", "2", "--backend", "nccl"),
        "NCCL backend needs CUDA",
        tags=("cpu-only",),
    ),
    C(
        "ranks-not-dividing-prompts",
        "ranks",
        "2 ranks for 3 prompts per step",
        lambda d, t: train(t, "--nproc", "2", "rollout.prompts_per_step=3", "optim.train_batch_size=12"),
        "cannot share rollout.prompts_per_step=3",
    ),
    C(
        "exact-divergence-vllm",
        "config",
        "exact divergences asked of the vLLM engine",
        lambda d, t: train(t, "rollout.engine=vllm", "metrics.exact_divergence=true"),
        "keeps the whole distribution it sampled from",
    ),
    C(
        "probe-exact-vllm",
        "config",
        "the probe's exact divergences asked of the vLLM engine",
        lambda d, t: ["probe", "--model", t, "--engine", "vllm", "probe.exact=on", "--out", d / "p"],
        "keeps the whole distribution it sampled from",
    ),
    C(
        "lm-head-fp32-vllm",
        "config",
        "an fp32 LM head asked of the vLLM engine",
        lambda d, t: train(t, "rollout.engine=vllm", "precision.lm_head=fp32"),
        "computes the LM head in fp32",
    ),
    C(
        "lm-head-fp32-ranks",
        "ranks",
        "an fp32 LM head with several ranks",
        lambda d, t: train(t, "--nproc", "2", "precision.lm_head=fp32", "optim.train_batch_size=8"),
        "lm_head=fp32 with several ranks",
    ),
    C(
        "bitwise-lora-dropout",
        "config",
        "exact mode with LoRA and adapter dropout",
        lambda d, t: train(t, "precision.bitwise=true", "lora.enabled=true", "lora.dropout=0.1"),
        "with LoRA needs lora.dropout=0",
    ),
    C(
        "attribute-vllm",
        "config",
        "component attribution asked of the vLLM engine",
        lambda d, t: ["probe", "--model", t, "--engine", "vllm", "--attribute", "--out", d / "p"],
        "computes chosen components of the model in fp32",
    ),
    C(
        "tensor-parallel-native",
        "ranks",
        "rollout.tensor_parallel_size with the native engine",
        lambda d, t: train(t, "rollout.tensor_parallel_size=2"),
        "spreads one model over several GPUs",
    ),
    C(
        "staleness-without-correction",
        "config",
        "rollout.max_staleness > 0 without a staleness correction",
        lambda d, t: train(t, "rollout.max_staleness=1"),
        "algorithm.staleness_correction: must be chosen with rollout.max_staleness=1",
    ),
    C(
        "staleness-decoupled-no-correction",
        "config",
        "staleness_correction=decoupled with a preset that has no correction to weight pi_old / mu",
        lambda d, t: train(t, "rollout.max_staleness=1", "algorithm.staleness_correction=decoupled"),
        "choose algorithm.preset=grpo-token-tis or grpo-seq-mis",
    ),
    C(
        "staleness-vllm",
        "config",
        "rollout.max_staleness > 0 with the vLLM engine",
        lambda d, t: train(
            t, "rollout.engine=vllm", "rollout.max_staleness=1", "algorithm.staleness_correction=rollout"
        ),
        "samples in a thread of its own while the learner updates",
    ),
    # ---- LoRA and MoE ----------------------------------------------------------------------------------------
    C(
        "lora-targets-nothing",
        "config",
        "LoRA target modules that match no layer",
        lambda d, t: train(t, "lora.enabled=true", "lora.target_modules=q_proj,qkv"),
        "'qkv' matches no linear layer",
    ),
    C(
        "lora-rank-zero",
        "config",
        "a LoRA rank of 0",
        lambda d, t: train(t, "lora.enabled=true", "lora.rank=0"),
        "lora.rank",
    ),
    C(
        "lora-rank-above-layer",
        "config",
        "a LoRA rank larger than a layer",
        lambda d, t: train(t, "lora.enabled=true", "lora.rank=4096"),
        "is larger than the layer",
    ),
    C(
        "lora-adapter-other-shape",
        "model",
        "LoRA on a checkpoint holding an adapter of another rank",
        lambda d, t: train(adapter_copy(d, t, rank=4), "lora.enabled=true", "lora.rank=8"),
        "holds a LoRA adapter with rank 4",
    ),
    C(
        "lora-adapter-base-missing",
        "model",
        "a LoRA adapter whose base model is not here",
        lambda d, t: train(adapter_copy(d, t, rank=4, base=d / "gone"), "run.steps=1"),
        "not a local model folder",
    ),
    C(
        "replay-dense",
        "config",
        "routing replay asked for on a dense model",
        lambda d, t: train(t, "moe.routing_replay=true"),
        "has no routers",
    ),
    # ---- resume: every setting that changes what the run computes ------------------------------------------
    C(
        "resume-lora-other-base",
        "resume",
        "--resume of a LoRA run with another --model (another base)",
        lambda d, t: train(
            model_with(d, t, "other", "copy"), "--out", saved_run(d, t, *LORA, lora=True), "--resume", *LORA
        ),
        "--resume would change model.path",
    ),
    C(
        "resume-lora-base-replaced",
        "resume",
        "--resume of a LoRA run whose model.path now holds another base than its adapter names",
        lambda d, t: train(
            t, "--out", saved_run(d, t, *LORA, lora=True, base=model_with(d, t, "old", "copy")), "--resume", *LORA
        ),
        "(the LoRA base)",
    ),
    C(
        "resume-lora-alpha",
        "resume",
        "--resume of a LoRA run with another lora.alpha",
        lambda d, t: train(t, "--out", saved_run(d, t, *LORA, lora=True), "--resume", *LORA, "lora.alpha=32"),
        "would change lora.alpha from 8.0 to 32.0",
    ),
    C(
        "resume-learning-rate",
        "resume",
        "--resume with another learning rate",
        lambda d, t: train(t, "--out", saved_run(d, t), "--resume", "optim.lr=1e-3"),
        "would change optim.lr from 2e-05 to 0.001",
    ),
    C(
        "resume-max-new-tokens",
        "resume",
        "--resume with longer responses",
        lambda d, t: train(t, "--out", saved_run(d, t), "--resume", "rollout.max_new_tokens=16"),
        "would change rollout.max_new_tokens from 8 to 16",
    ),
    C(
        "resume-kl-coef",
        "resume",
        "--resume with a KL penalty the run did not have",
        lambda d, t: train(t, "--out", saved_run(d, t), "--resume", "algorithm.kl_coef=0.1"),
        "would change algorithm.kl_coef from 0.0 to 0.1",
    ),
    # ---- LoRA checkpoints and adapters as models ------------------------------------------------------------
    C(
        "lora-checkpoint-without-lora",
        "model",
        "train --model <a LoRA checkpoint> without lora.*",
        lambda d, t: train(adapter_copy(d, t, rank=4)),
        "holds a LoRA adapter, and lora.enabled is false; to go on training the adapter set lora.enabled=true",
    ),
    C(
        "eval-damaged-lora-checkpoint",
        "model",
        "eval --model <a LoRA checkpoint whose adapter was damaged, same size>",
        lambda d, t: [
            "eval",
            "--model",
            damaged(saved_run(d, t, *LORA, lora=True) / "checkpoints" / "step-000001", "adapter_model.safetensors"),
        ],
        "is damaged (adapter_model.safetensors does not match its hash",
    ),
    C(
        "probe-damaged-checkpoint",
        "model",
        "probe --model <a run's checkpoint whose weights were damaged, same size>",
        lambda d, t: [
            "probe",
            "--model",
            damaged(saved_run(d, t) / "checkpoints" / "step-000001", "model.safetensors"),
            "--out",
            d / "p",
        ],
        "is damaged (model.safetensors does not match its hash",
    ),
    C(
        "train-from-damaged-checkpoint",
        "model",
        "train --model <a run's checkpoint whose weights were damaged, same size>",
        lambda d, t: train(
            damaged(saved_run(d, t) / "checkpoints" / "step-000001", "model.safetensors"), "--out", d / "new"
        ),
        "is damaged (model.safetensors does not match its hash",
    ),
    C(
        "eval-exported-adapter-cut",
        "model",
        "eval --model <an exported adapter cut off half-way>",
        lambda d, t: ["eval", "--model", exported_adapter_cut(d, t)],
        "cannot load the adapter in",
    ),
    C(
        "model-vocab-below-tokenizer",
        "model",
        "a model whose vocabulary (40) is smaller than its tokenizer's (261 tokens)",
        lambda d, t: train(small_vocab(d)),
        "beyond the model's vocabulary of 40",
    ),
    # ---- data, settings, output names -------------------------------------------------------------------------
    C(
        "test-source-with-builtin-task",
        "data",
        "data.test_source (a missing file) with the built-in task",
        lambda d, t: train(t, f"data.test_source={d / 'missing.jsonl'}"),
        "the built-in countdown task has its own test split",
    ),
    C(
        "seed-beyond-64-bits",
        "config",
        "run.seed beyond 64 bits",
        lambda d, t: train(t, f"run.seed={2**64}"),
        "run.seed: must be below 2**63",
    ),
    C(
        "run-out-name-too-long",
        "run folder",
        "a run folder name longer than the file system allows",
        lambda d, t: train(t, "--out", d / ("r" * 300)),
        "longer than the file system allows",
    ),
    C(
        "export-out-name-too-long",
        "run folder",
        "an export folder name longer than the file system allows",
        lambda d, t: ["export", checkpoint_of(d, d / "run"), "--out", d / ("e" * 300)],
        "longer than the file system allows",
    ),
    C("unknown-command", "config", "an unknown command", lambda d, t: ["trian"], "invalid choice: 'trian'"),
    C(
        "unknown-flag",
        "config",
        "an unknown flag",
        lambda d, t: train(t, "--stepz", "3"),
        "unrecognized arguments: --stepz",
    ),
    C(
        "flag-without-value",
        "config",
        "a flag without its value",
        lambda d, t: ["train", "--steps"],
        "expected one argument",
    ),
    C(
        "samples-none-logged",
        "run folder",
        "unison samples of a run trained with run.log_samples=0",
        lambda d, t: [
            "samples",
            write(d / "run" / "config.yaml", "run:\n  log_samples: 0\n")
            and write(d / "run" / "samples.jsonl", '{"step": 1, "responses": "ab"}\n').parent,
        ],
        "trained with run.log_samples=0",
    ),
    C(
        "probe-attribute-fp32-only",
        "config",
        "probe --attribute with fp32 alone",
        lambda d, t: ["probe", "--model", t, "--attribute", "--precisions", "fp32", "--out", d / "p"],
        "add fp16 or bf16",
    ),
    # ---- trackers, checked before the run folder is made ------------------------------------------------------
    C(
        "mlflow-store-under-file",
        "trackers",
        "MLFLOW_TRACKING_URI naming a file store under a regular file",
        lambda d, t: train(t, "run.loggers=mlflow", "--out", d / "run"),
        "cannot be made or written",
        fault=lambda d: env(MLFLOW_TRACKING_URI=(write(d / "f", "x") / "mlruns").as_uri()),
        check=lambda d: None if not (d / "run").exists() else pytest.fail("the run folder was made"),
    ),
    C(
        "mlflow-server-down",
        "trackers",
        "an MLflow tracking server that is down",
        lambda d, t: train(t, "run.loggers=mlflow", "--out", d / "run"),
        "does not answer",
        fault=lambda d: env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"),
        check=lambda d: None if not (d / "run").exists() else pytest.fail("the run folder was made"),
    ),
    C(
        "wandb-online-without-key",
        "trackers",
        "W&B online without an API key",
        lambda d, t: train(t, "run.loggers=wandb", "--out", d / "run"),
        "no W&B API key is configured",
        fault=lambda d: env(WANDB_MODE="online", WANDB_API_KEY=None, NETRC=write(d / "netrc", "")),
        check=lambda d: None if not (d / "run").exists() else pytest.fail("the run folder was made"),
    ),
    C(
        "wandb-broken-install",
        "trackers",
        "a broken wandb install (it fails to import)",
        lambda d, t: train(t, "run.loggers=[wandb]", "--out", d / "run"),
        "fails to import",
        fault=lambda d: broken_import("wandb"),
        check=lambda d: None if not (d / "run").exists() else pytest.fail("the run folder was made"),
    ),
]


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def run_case(case: Case, folder: Path, tiny: Path) -> dict:
    """Run one case in-process; returns its exit code, stderr lines and whether pre-existing files survived."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from unison.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    argv = [str(a) for a in case.make(folder, tiny)]
    before = snapshot(folder)
    err, out = io.StringIO(), io.StringIO()
    fault = case.fault(folder) if case.fault else contextlib.nullcontext()
    cwd = os.getcwd()
    os.chdir(folder)  # anything written to a default path lands here
    try:
        with cache_in(folder), fault, redirect_stderr(err), redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse
                code = exc.code
    finally:
        os.chdir(cwd)
    after = snapshot(folder)
    untouched = all(after.get(p) == b for p, b in before.items())
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    return {"code": code, "lines": lines, "untouched": untouched, "argv": argv}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tiny_dir, tmp_path):
    if "cpu-only" in case.tags:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    r = run_case(case, tmp_path / "case", tiny_dir)
    assert r["code"] == 2, r
    assert len(r["lines"]) == 1, r["lines"]
    line = r["lines"][0]
    assert line.startswith((f"unison {r['argv'][0]}: error: ", "unison: error: ")), line
    assert "Traceback" not in line and case.expect in line, (case.expect, line)
    assert r["untouched"], "a file that existed before was changed"
    if case.check:
        case.check(tmp_path / "case")


def test_at_least_25_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 25
