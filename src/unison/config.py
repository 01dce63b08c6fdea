"""Typed configs: one per command, read from a YAML file plus dotted `key=value` overrides, validated.

Each field is documented once, in its `doc` metadata; `unison <command> --help-config` prints them. Errors name
the field and say how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from unison.errors import UserError


def doc(default, text: str, **kw):
    """A dataclass field with its one-line documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text, **kw})
    return field(default=default, metadata={"doc": text, **kw})


# ---- sections --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    path: str = doc("builtin", "a local Hugging Face checkpoint directory, or 'builtin' for the built-in tiny model")
    device: str = doc("auto", "auto, cpu or cuda")
    matmul: str = doc("auto", "fp16/bf16 matrix products: native kernels, or fp32-accumulate (auto: native where fast)")


@dataclass
class PrecisionConfig:
    rollout: str = doc("fp16", "dtype of the rollout engine's weights and compute: fp32, bf16 or fp16")
    train: str = doc("fp16", "dtype of the learner's forward and backward (master weights stay fp32)")
    init_scale: float = doc(65536.0, "fp16 dynamic loss scale at the start")
    growth_interval: int = doc(400, "finite steps in a row after which the loss scale doubles")
    min_scale: float = doc(1.0, "the run stops if the loss scale falls below this")
    loss_scaling: str = doc("auto", "auto (dynamic scaling for fp16 training), on, or off")
    on_activation_overflow: str = doc("stop", "an fp16 activation beyond 65504 in either engine (checked where that engine runs in fp16): stop (naming the layer), fp32_layers (run that layer's MLP in fp32 from then on), or off (no checks)")


@dataclass
class DataConfig:
    source: str = doc("builtin", "'builtin' (the countdown task) or a JSONL/Parquet prompt file")
    prompt_key: str = doc("prompt", "column holding the prompt (a string or a list of chat messages)")
    answer_key: str = doc("answer", "column holding the reference answer")
    reward: str = doc("", "reward: math, exact, countdown, or a dotted path module:function (empty: the task's own)")
    template: str = doc("auto", "prompt template: plain, chat, or auto (chat when the tokenizer has a chat template)")
    test_source: str = doc("", "a held-out prompt file for evaluation (the built-in task has its own test split)")
    subset: str = doc("", "a JSONL file of prompt ids to train on (from `unison filter`); 'builtin': the shipped perfectible set of the built-in task; empty: all prompts")
    max_prompts: int = doc(0, "use at most this many training prompts (0: all)")


@dataclass
class RolloutConfig:
    engine: str = doc("native", "rollout engine: native or vllm")
    prompts_per_step: int = doc(16, "prompts sampled per RL step")
    group_size: int = doc(8, "responses sampled per prompt (G)")
    max_new_tokens: int = doc(256, "longest response; a response cut here gets reward 0")
    temperature: float = doc(1.0, "sampling temperature")
    top_p: float = doc(1.0, "nucleus sampling threshold (1: off)")
    top_k: int = doc(0, "top-k truncation (0: off)")


@dataclass
class AlgorithmConfig:
    preset: str = doc("grpo", "grpo, dr-grpo, grpo-token-tis, grpo-seq-mis, gspo, pg-seq-is, pg-seq-mis, pg-token-is")
    advantage: str = doc("", "override the preset's advantage estimator: grpo, drgrpo, rloo")
    objective: str = doc("", "override the preset's objective: ppo_clip, gspo, pg")
    correction: str = doc("", "override the preset's rollout correction: none, token_tis, token_mis, seq_tis, seq_mis, icepop")
    aggregation: str = doc("", "override the preset's aggregation: token_mean, seq_mean_token_mean, seq_mean_token_sum_norm")
    clip_low: float = doc(-1.0, "override the lower clip range (negative: the preset's)")
    clip_high: float = doc(-1.0, "override the upper clip range (negative: the preset's)")
    cap: float = doc(-1.0, "override the correction's cap C (negative: the preset's)")
    icepop_alpha: float = doc(0.5, "IcePop: tokens with pi_old/mu below this are masked")
    icepop_beta: float = doc(5.0, "IcePop: tokens with pi_old/mu above this are masked")


@dataclass
class OptimConfig:
    lr: float = doc(2e-5, "AdamW learning rate (constant)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.999, "AdamW beta2")
    max_grad_norm: float = doc(1.0, "clip the gradient norm to this (0: no clipping)")
    train_batch_size: int = doc(32, "sequences per optimizer step (prompts_per_step x group_size must be a multiple)")
    micro_batch_size: int = doc(32, "sequences per forward/backward (memory only; the step is the same)")
    micro_batch_tokens: int = doc(0, "padded tokens per forward/backward at most (speed only; 0: on a CPU 2^18 / "
                                     "hidden size, 2048 for the built-in model, so activations stay in cache; no "
                                     "limit on a GPU)")
    share_prompts: bool = doc(True, "run each distinct prompt of a micro-batch once and the responses sampled from it on "
                                    "its keys and values, where that costs fewer tokens (Qwen2, Qwen3, Llama; speed "
                                    "only: the same step up to rounding)")
    epochs: int = doc(1, "passes over each rollout batch")


@dataclass
class RunConfig:
    out: str = doc("runs/unison", "run folder: metrics.jsonl, checkpoints, figures")
    steps: int = doc(40, "RL steps (one rollout batch each)")
    seed: int = doc(0, "seed for prompts, sampling and initialisation")
    eval_every: int = doc(10, "held-out evaluation every N steps (0: only at the end)")
    eval_prompts: int = doc(64, "held-out prompts per evaluation")
    save_every: int = doc(10, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = doc(2, "complete checkpoints kept")
    tensorboard: bool = doc(True, "also write TensorBoard logs when tensorboard is installed")
    progress: bool = doc(True, "show progress bars")


@dataclass
class TrainConfig:
    """`unison train`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "TrainConfig":
        from unison.algorithms import PRESETS
        from unison.precision import PRECISIONS

        r, o = self.rollout, self.optim
        check(self.precision.rollout.lower() in PRECISIONS, "precision.rollout", f"must be fp32, bf16 or fp16, not {self.precision.rollout!r}")
        check(self.precision.train.lower() in PRECISIONS, "precision.train", f"must be fp32, bf16 or fp16, not {self.precision.train!r}")
        check(self.precision.loss_scaling in ("auto", "on", "off"), "precision.loss_scaling", "must be auto, on or off")
        check(self.precision.init_scale >= self.precision.min_scale > 0, "precision.init_scale", "must be >= precision.min_scale > 0")
        check(self.precision.on_activation_overflow in ("stop", "fp32_layers", "off"), "precision.on_activation_overflow",
              f"must be stop, fp32_layers or off, not {self.precision.on_activation_overflow!r}")
        check(self.precision.growth_interval >= 1, "precision.growth_interval", "must be at least 1")
        check(self.model.device in ("auto", "cpu", "cuda") or self.model.device.startswith("cuda:"), "model.device", "must be auto, cpu or cuda")
        check(self.model.matmul in ("auto", "native", "fp32-accumulate"), "model.matmul", "must be auto, native or fp32-accumulate")
        check(r.engine in ("native", "vllm"), "rollout.engine", f"must be native or vllm, not {r.engine!r}")
        check(r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be at least 1")
        check(r.group_size >= 2, "rollout.group_size", "must be at least 2 (advantages compare responses within a group)")
        check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be at least 1")
        check(r.temperature > 0, "rollout.temperature", "must be > 0 for RL sampling")
        check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        check(r.top_k >= 0, "rollout.top_k", "must be >= 0")
        check(self.algorithm.preset in PRESETS, "algorithm.preset", f"unknown preset {self.algorithm.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
        check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be a positive number")
        check(o.train_batch_size >= 1, "optim.train_batch_size", "must be at least 1")
        check(o.micro_batch_size >= 1, "optim.micro_batch_size", "must be at least 1")
        check(o.micro_batch_tokens >= 0, "optim.micro_batch_tokens", "must be >= 0 (0: automatic)")
        check(o.epochs >= 1, "optim.epochs", "must be at least 1")
        check(o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0")
        batch = r.prompts_per_step * r.group_size
        check(
            batch % o.train_batch_size == 0,
            "optim.train_batch_size",
            f"{o.train_batch_size} does not divide the rollout batch {batch} (rollout.prompts_per_step x rollout.group_size); "
            f"pick a divisor of {batch}",
        )
        check(o.train_batch_size % r.group_size == 0, "optim.train_batch_size", f"must be a multiple of rollout.group_size ({r.group_size}) so mini-batches hold whole groups")
        check(self.run.steps >= 1, "run.steps", "must be at least 1")
        check(self.run.eval_every >= 0 and self.run.save_every >= 0, "run.eval_every", "must be >= 0")
        check(self.run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be at least 1")
        check(self.data.template in ("auto", "plain", "chat"), "data.template", "must be auto, plain or chat")
        self.algorithm_fields()  # unknown algorithm names fail here, with the valid names
        return self

    def algorithm_fields(self):
        """The preset with this config's overrides applied."""
        from unison.algorithms import get_preset

        a = self.algorithm
        preset = get_preset(a.preset)
        changes = {k: getattr(a, k) for k in ("advantage", "objective", "correction", "aggregation") if getattr(a, k)}
        for k in ("clip_low", "clip_high"):
            if getattr(a, k) >= 0:
                changes[k] = getattr(a, k)
        params = dict(preset.correction_params)
        correction = changes.get("correction", preset.correction)
        if correction != preset.correction:
            params = {}
        if a.cap >= 0:
            params["cap"] = a.cap if a.cap > 0 else math.inf
        if correction == "icepop":
            params = {"alpha": a.icepop_alpha, "beta": a.icepop_beta}
        changes["correction_params"] = params
        try:
            return dataclasses.replace(preset, **changes)
        except UserError as exc:
            raise UserError(f"algorithm: {exc}") from None


def check(ok: bool, name: str, how: str) -> None:
    if not ok:
        raise UserError(f"config field {name}: {how}")


# ---- loading ---------------------------------------------------------------------------------------------------
def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, typ, name: str):
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise UserError(f"config field {name}: expected a section (mapping), got {value!r}")
        return _build(typ, value, name + ".")
    if origin in (typing.Union, types.UnionType):
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"config field {name}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UserError(f"config field {name}: expected an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise UserError(f"config field {name}: expected a number, got {value!r}") from None
        return float(value)
    if typ is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config field {name}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise UserError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(types_)}"
        )
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if dataclasses.is_dataclass(types_[f.name]) and isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            # a section given in part keeps this config's own defaults for the rest (e.g. `unison demo` run.out)
            default = dataclasses.asdict(f.default_factory())
            value = {**{k: v for k, v in default.items() if k not in value}, **value}
        values[f.name] = _coerce(value, types_[f.name], prefix + f.name)
    return cls(**values)


def _set_dotted(data: dict, cls, key: str, value) -> None:
    parts = key.split(".")
    node, typ = data, cls
    for i, part in enumerate(parts):
        types_ = _field_types(typ) if dataclasses.is_dataclass(typ) else {}
        if part not in types_:
            where = ".".join(parts[:i]) or "the top level"
            raise UserError(f"unknown config key {key!r}: {part!r} is not in {where} (valid: {', '.join(types_)})")
        typ = types_[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(typ):
                raise UserError(f"config key {key!r} is a section; set one of its fields, e.g. {key}.{next(iter(_field_types(typ)))}=...")
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"config key {'.'.join(parts[:i + 1])!r} must be a section")


def load_config(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """A config of type `cls` from a YAML file (optional) and `key=value` overrides, validated."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {str(p)!r} not found; give the path of a YAML file (see configs/)")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax there") from None
        except UnicodeDecodeError:
            raise UserError(f"config file {str(p)!r} is not UTF-8 text; save it as UTF-8") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {str(p)!r} must hold a mapping of sections (e.g. 'rollout:'), not {type(data).__name__}")
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(data, cls, key, value)
    cfg = _build(cls, data)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def _split_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise UserError(f"override {text!r} is not key=value; write e.g. optim.lr=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def describe(cls, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default, documentation."""
    lines = []
    for f in dataclasses.fields(cls):
        typ = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            lines += describe(typ, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix + f.name:32s} {default!r:>14}  {f.metadata.get('doc', '')}")
    return lines
