"""Typed configs: one per command, read from a YAML file plus dotted `key=value` overrides, validated.

Each field is documented once, in its `doc` metadata; `unison <command> --help-config` prints them. Errors name
the field and say how to fix it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from unison.algorithms import PRESETS, get_preset
from unison.errors import UserError
from unison.matmul import GEMMS, MATMUL_MODES
from unison.models import ATTN_IMPLEMENTATIONS
from unison.overflow import MODES
from unison.precision import PRECISIONS
from unison.rollout import ENGINES, check_capability
from unison.tasks.templates import TEMPLATES


def doc(default, text: str, **kw):
    """A dataclass field with its one-line documentation; `choices` (a table, or a function returning one) are the
    valid values, checked when a config is built and listed by `describe`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text, **kw})
    return field(default=default, metadata={"doc": text, **kw})


# ---- sections: every command's config is made of these, with the same dotted keys ------------------------------
def _precisions():

    return PRECISIONS


def _matmul_modes():

    return MATMUL_MODES


def _gemms():

    return GEMMS


def _attn_implementations():

    return ATTN_IMPLEMENTATIONS


def _engines():

    return ENGINES


def _templates():

    return TEMPLATES


def _overflow_modes():

    return MODES


def _presets():

    return PRESETS


def _table(name: str, module: str = "unison.algorithms"):
    def get():

        return getattr(importlib.import_module(module), name)

    return get


CONTEXT_LIMITS = ("error", "clamp")


@dataclass
class ModelConfig:
    path: str = doc(
        "builtin",
        "a local Hugging Face checkpoint directory (a run's checkpoints/step-N works), a .gguf "
        "file (converted once into the cache), a model fetched by `unison fetch NAME` (its "
        "NAME), or 'builtin' for the built-in tiny model, 'builtin-moe' for its "
        "mixture-of-experts variant, 'builtin-long' for its warm start on countdown-long",
    )
    device: str = doc("auto", "auto (cuda where a GPU is visible), cpu, cuda or cuda:N")
    matmul: str = doc(
        "auto",
        "fp16/bf16 matrix products: native kernels, or fp32-accumulate (auto: native where fast)",
        choices=_matmul_modes,
        what="matmul mode",
    )
    gemm: str = doc(
        "auto",
        "which library computes the fp32 matrix products of linear layers on a CPU (fp32 models, and fp16/bf16 "
        "in fp32-accumulate): torch (PyTorch's BLAS), or onednn (oneDNN; auto: where it is the faster, on CPUs "
        "with AVX-512 not made by Intel)",
        choices=_gemms,
        what="gemm kernel",
    )
    attn_implementation: str = doc(
        "auto",
        "attention kernels of the Hugging Face model (learner, and the native "
        "engine's fallback); auto: sdpa where the model supports it, else eager",
        choices=_attn_implementations,
        what="attention implementation",
    )
    gradient_checkpointing: bool = doc(
        False,
        "recompute each decoder layer's activations in the backward pass instead "
        "of keeping them (less memory, about one more forward of time)",
    )

    def validate(self) -> None:
        d = self.device
        check(
            d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()),
            "model.device",
            f"unknown device {d!r}; choose one of: auto, cpu, cuda, cuda:N",
        )


@dataclass
class PrecisionConfig:
    rollout: str = doc(
        "fp16", "dtype of the rollout engine's weights and compute", choices=_precisions, what="precision", lower=True
    )
    train: str = doc(
        "fp16",
        "dtype of the learner's forward and backward (master weights stay fp32)",
        choices=_precisions,
        what="precision",
        lower=True,
    )
    init_scale: float = doc(65536.0, "fp16 dynamic loss scale at the start")
    growth_interval: int = doc(400, "finite steps in a row after which the loss scale doubles")
    min_scale: float = doc(1.0, "the run stops if the loss scale falls below this")
    loss_scaling: str = doc(
        "auto", "auto (dynamic scaling for fp16 training), on, or off", choices=("auto", "on", "off"), what="choice"
    )
    lm_head: str = doc(
        "same",
        "the LM head's dtype in both engines: same (the rollout and train dtypes), or fp32 "
        "(fp32 weights and logits; native engine, one rank)",
        choices=("same", "fp32"),
        what="choice",
        lower=True,
    )
    on_activation_overflow: str = doc(
        "stop",
        "an fp16 activation beyond 65504 in either engine (checked where that "
        "engine runs in fp16): stop (naming the layer), fp32_layers (run that "
        "layer's MLP in fp32 from then on), or off (no checks)",
        choices=_overflow_modes,
        what="action",
    )
    bitwise: bool = doc(
        False,
        "the rollout engine's and the learner's log-probs of every sampled token equal to the bit, in any precision "
        "(unison.exact: every product, attention and log-softmax with one reduction layout; the native engine "
        "decodes with the model's own forward, a group of prompts at a time; docs/exact.md has what it costs)",
    )

    def validate(self) -> None:
        check(
            math.isfinite(self.init_scale) and self.init_scale >= self.min_scale > 0,
            "precision.init_scale",
            "must be finite and >= precision.min_scale > 0",
        )
        check(self.growth_interval >= 1, "precision.growth_interval", "must be at least 1")


@dataclass
class DataConfig:
    source: str = doc(
        "builtin",
        "'builtin' (the countdown task), 'countdown-long' (its variant with responses of "
        "300 to 1,300 tokens), 'word-problems' (grade-school arithmetic, with a test split) "
        "or a JSONL/Parquet prompt file",
    )
    prompt_key: str = doc("prompt", "column holding the prompt (a string or a list of chat messages)")
    answer_key: str = doc("answer", "column holding the reference answer")
    reward: str = doc(
        "", "reward: math, exact, countdown, last-number, or a dotted path module:function (empty: the task's own)"
    )
    template: str = doc(
        "auto",
        "prompt template: plain, chat, or auto (chat when the tokenizer has a chat template)",
        choices=_templates,
    )
    test_source: str = doc(
        "", "a held-out prompt file for evaluation (the built-in task and the word problems have their own test split)"
    )
    subset: str = doc(
        "",
        "a JSONL file of prompt ids to use (from `unison filter`); 'builtin': the shipped "
        "perfectible set of the built-in task; empty: all prompts",
    )
    system_prompt: str = doc(
        "",
        "a system message put before every prompt (the chat template's system turn; with the "
        "plain template, a paragraph before the prompt); a prompt file's own system turn wins",
    )
    max_prompts: int = doc(0, "use at most this many prompts (0: all)")

    def validate(self) -> None:
        check(self.max_prompts >= 0, "data.max_prompts", "must be >= 0 (0: all prompts)")


@dataclass
class RolloutConfig:
    engine: str = doc("native", "rollout engine", choices=_engines)
    prompts_per_step: int = doc(16, "prompts sampled per RL step")
    group_size: int = doc(8, "responses sampled per prompt (G; eval and filter: k, probe: samples)")
    max_new_tokens: int = doc(256, "longest response; a response cut here gets reward 0")
    temperature: float = doc(1.0, "sampling temperature")
    top_p: float = doc(1.0, "nucleus sampling threshold (1: off)")
    top_k: int = doc(0, "top-k truncation (0: off)")
    stop: list = doc(
        [],
        "extra stop strings: a response ends with the token that completes one (besides the EOS "
        "ids of the tokenizer, generation_config.json and config.json)",
    )
    context_limit: str = doc(
        "error",
        "a prompt + max_new_tokens beyond the model's context: error (say which "
        "prompt), or clamp (lower max_new_tokens to fit, with a warning)",
        choices=CONTEXT_LIMITS,
        what="choice",
    )
    tensor_parallel_size: int = doc(1, "GPUs one vLLM engine spreads its model over (vLLM on CUDA only)")
    max_staleness: int = doc(
        0,
        "sampling while learning: the engine samples the next batches while the learner updates, each with weights "
        "at most this many updates old (0: sample, then learn; > 0 needs algorithm.staleness_correction)",
    )
    engine_threads: str = doc(
        "auto",
        "CPU threads of the engine's thread when max_staleness > 0 (auto: half the cores; the learner keeps the rest)",
    )
    split_share: float = doc(
        0.25,
        "max_staleness > 0: the share of each batch's groups on which the learner is also run at the sampling "
        "weights, to split the off-policy gap into engine mismatch and policy change (0: off)",
    )

    def validate(self) -> None:
        check(self.max_staleness >= 0, "rollout.max_staleness", "must be >= 0 (0: sample, then learn)")
        check(0 <= self.split_share <= 1, "rollout.split_share", "must be in [0, 1] (0: no split)")
        check(
            self.engine_threads == "auto" or (self.engine_threads.isdigit() and int(self.engine_threads) >= 1),
            "rollout.engine_threads",
            f"must be auto or a positive number, not {self.engine_threads!r}",
        )
        if self.max_staleness > 0:
            check_capability(self.engine, "ahead", f"rollout.max_staleness={self.max_staleness}")
        check(self.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", "must be at least 1")
        if self.tensor_parallel_size > 1:
            size = self.tensor_parallel_size
            check_capability(self.engine, "tensor_parallel", f"rollout.tensor_parallel_size={size}")
        check(self.prompts_per_step >= 1, "rollout.prompts_per_step", "must be at least 1")
        check(self.group_size >= 1, "rollout.group_size", "must be at least 1")
        check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be at least 1")
        check(math.isfinite(self.temperature) and self.temperature >= 0, "rollout.temperature", "must be >= 0")
        check(0 < self.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        check(self.top_k >= 0, "rollout.top_k", "must be >= 0")
        check(
            all(isinstance(x, str) and x for x in self.stop),
            "rollout.stop",
            "must be a list of non-empty strings, e.g. rollout.stop=['</answer>']",
        )


@dataclass
class AlgorithmConfig:
    preset: str = doc("grpo", "algorithm preset", choices=_presets)
    advantage: str = doc("", "override the preset's advantage estimator", choices=_table("ADVANTAGES"))
    objective: str = doc("", "override the preset's objective", choices=_table("OBJECTIVES"))
    correction: str = doc("", "override the preset's rollout correction", choices=_table("CORRECTIONS"))
    aggregation: str = doc("", "override the preset's aggregation", choices=_table("AGGREGATIONS"))
    clip_low: float = doc(-1.0, "override the lower clip range (negative: the preset's)")
    clip_high: float = doc(-1.0, "override the upper clip range (negative: the preset's)")
    cap: float = doc(-1.0, "override the correction's cap C (negative: the preset's)")
    icepop_alpha: float = doc(0.5, "IcePop: tokens with pi_old/mu below this are masked")
    icepop_beta: float = doc(5.0, "IcePop: tokens with pi_old/mu above this are masked")
    kl_coef: float = doc(0.0, "weight of a KL penalty to the frozen starting policy (0: none, as in the paper)")
    kl_estimator: str = doc(
        "k3", "the KL estimator on the sampled tokens", choices=_table("KL_ESTIMATORS"), what="estimator"
    )
    staleness_correction: str = doc(
        "",
        "what the update takes as pi_old when batches may be stale (needed with rollout.max_staleness > 0): "
        "decoupled (pi_old recomputed at the current weights, the clip around it, pi_old / mu weighted by the "
        "preset's correction) or rollout (the engine's log mu is pi_old: the clip of pi_theta / mu corrects; pg "
        "presets weight by pi_theta / mu as they are)",
        choices=("", "decoupled", "rollout"),
        what="correction",
    )
    kl_in: str = doc(
        "loss",
        "where the penalty goes: loss (added to the policy loss, aggregated like it) or reward "
        "(subtracted from each response's reward, summed over its tokens)",
        choices=("loss", "reward"),
        what="place",
    )


@dataclass
class OptimConfig:
    lr: float = doc(2e-5, "AdamW learning rate (the peak, under a schedule)")
    schedule: str = doc(
        "constant",
        "learning-rate schedule over the run's steps, after optim.warmup_steps of "
        "linear warm-up: constant, linear (to optim.min_lr_ratio x lr at the last step) or "
        "cosine (likewise)",
        choices=_table("LR_SCHEDULES", "unison.schedules"),
    )
    warmup_steps: int = doc(0, "RL steps of linear warm-up from 0 to optim.lr")
    min_lr_ratio: float = doc(
        0.0, "the learning rate at the last step of a linear or cosine schedule, as a share of optim.lr"
    )
    weight_decay: float = doc(0.0, "AdamW weight decay")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.999, "AdamW beta2")
    max_grad_norm: float = doc(1.0, "clip the gradient norm to this (0: no clipping)")
    train_batch_size: int = doc(32, "sequences per optimizer step (prompts_per_step x group_size must be a multiple)")
    micro_batch_size: int = doc(32, "sequences per forward/backward (memory only; the step is the same)")
    micro_batch_tokens: int = doc(
        0,
        "padded tokens per forward/backward at most (speed only; 0: on a CPU 2^18 / "
        "hidden size, 2048 for the built-in model, so activations stay in cache; no "
        "limit on a GPU)",
    )
    share_prompts: bool = doc(
        True,
        "run each distinct prompt of a micro-batch once and the responses sampled from it "
        "on its keys and values, where that costs fewer tokens (Qwen2, Qwen3, Llama; speed "
        "only: the same step up to rounding)",
    )
    epochs: int = doc(1, "passes over each rollout batch")


@dataclass
class RunBase:
    """What every command's run has: where its output goes, its seed, its progress bars."""

    out: str = doc(
        "runs/unison", "output: the run folder (train, demo), the probe's folder, the eval JSON, the filter's JSONL"
    )
    seed: int = doc(0, "seed for prompt choice, sampling and initialisation")
    progress: bool = doc(True, "show progress bars")
    threads: str = doc(
        "auto",
        "PyTorch CPU threads: auto (the cores other processes leave free, re-read every step; "
        "OMP_NUM_THREADS, where set, wins) or a number",
    )

    def validate(self) -> None:
        check(self.seed < 2**63, "run.seed", f"must be below 2**63 = {2**63} (a 64-bit seed), not {self.seed}")
        check(
            self.threads == "auto" or (self.threads.isdigit() and int(self.threads) >= 1),
            "run.threads",
            f"must be auto or a positive number, not {self.threads!r}",
        )


@dataclass
class RunConfig(RunBase):
    steps: int = doc(40, "RL steps (one rollout batch each)")
    eval_every: int = doc(10, "held-out evaluation every N steps (0: only at the end)")
    eval_prompts: int = doc(64, "held-out prompts per evaluation (0: no held-out evaluation)")
    eval_samples: int = doc(
        1, "responses per held-out prompt at each evaluation (avg@n, and pass@1 and pass@n from them)"
    )
    save_every: int = doc(10, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = doc(2, "complete checkpoints kept")
    shard_size: str = doc(
        "5GB",
        "largest weights file of a checkpoint (bigger models are saved in shards with a "
        "safetensors index), e.g. 5GB or 500MB",
    )
    loggers: list = doc(
        [],
        "metric sinks: jsonl (metrics.jsonl, always written), tensorboard, wandb (offline unless "
        "WANDB_MODE says otherwise), mlflow (a file store in the run folder unless "
        "MLFLOW_TRACKING_URI is set); empty: jsonl, and tensorboard where it is installed",
        choices=_table("LOGGERS", "unison.report"),
        what="logger",
        separator=",",
    )
    log_samples: int = doc(
        4,
        "decoded samples per step in samples.jsonl (prompt, response, reward, length, mismatch) "
        "and in the trackers; `unison samples RUN` prints them",
    )
    self_test: bool = doc(
        True,
        "before the first step, sample a few tokens and recompute them with the learner; "
        "stop if the mismatch is far outside the band its precisions allow",
    )


@dataclass
class MetricsConfig:
    exact_divergence: bool = doc(
        False,
        "every step, the exact per-position KL(mu||pi), KL(pi||mu) and total "
        "variation from both engines' whole distributions (an extra forward; the "
        "engine keeps [samples, tokens, vocabulary] floats): native engine only",
    )
    routing: bool = doc(
        True,
        "for MoE models, every step: the share of tokens the two engines route to other "
        "experts and the router-probability gap, per layer (an extra forward; native engine)",
    )


@dataclass
class MoeConfig:
    routing_replay: bool = doc(
        False,
        "routing replay (R3): the learner routes each token with the experts the "
        "rollout engine chose for it (MoE models, native engine)",
    )


@dataclass
class LoraConfig:
    enabled: bool = doc(
        False,
        "train low-rank adapters (peft LoRA) on the frozen base instead of every weight; the "
        "engine gets the merged weights",
    )
    rank: int = doc(8, "the adapters' rank r")
    alpha: float = doc(16.0, "the adapters' alpha: the update is alpha / rank x B A")
    target_modules: str = doc(
        "auto",
        "comma-separated names of the linear layers to adapt (q_proj,v_proj, ...; a YAML list too); "
        "auto: every linear layer of the decoder blocks (not an MoE router)",
        separator=",",
    )
    dropout: float = doc(
        0.0, "dropout on the adapters' input in the learner (0: the policy trained is the one that samples)"
    )

    def validate(self) -> None:
        check(self.rank >= 1, "lora.rank", f"must be at least 1 (got {self.rank}); 8 to 64 are usual")
        check(math.isfinite(self.alpha) and self.alpha > 0, "lora.alpha", "must be a positive number")
        check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1) (0: no dropout, as RL wants)")


@dataclass
class GuardConfig:
    seq_kl_warn: float = doc(0.0, "warn when the sequence-level KL(mu||pi) (mismatch/seq_kl) exceeds this (0: off)")
    seq_kl_stop: float = doc(0.0, "stop the run when mismatch/seq_kl exceeds this for guard.patience steps (0: off)")
    k3_warn: float = doc(0.0, "warn when the per-token KL estimate mismatch/k3 exceeds this (0: off)")
    k3_stop: float = doc(0.0, "stop the run when mismatch/k3 exceeds this for guard.patience steps (0: off)")
    masked_warn: float = doc(
        0.0, "warn when the share of tokens the correction masks (is/masked_frac) exceeds this (0: off)"
    )
    masked_stop: float = doc(0.0, "stop the run when is/masked_frac exceeds this for guard.patience steps (0: off)")
    patience: int = doc(1, "steps in a row above a stop threshold before the run stops")

    def validate(self) -> None:
        for key in ("seq_kl", "k3", "masked"):
            warn, stop = getattr(self, f"{key}_warn"), getattr(self, f"{key}_stop")
            for level, v in (("warn", warn), ("stop", stop)):
                check(math.isfinite(v) and v >= 0, f"guard.{key}_{level}", "must be a number >= 0 (0: off)")
            check(
                not (warn and stop and warn > stop),
                f"guard.{key}_warn",
                f"is above guard.{key}_stop ({warn:g} > {stop:g}): warnings come before the stop; lower it or "
                "raise the stop threshold",
            )
        check(self.masked_warn <= 1 and self.masked_stop <= 1, "guard.masked_stop", "is a share of tokens: at most 1")
        check(self.patience >= 1, "guard.patience", "must be at least 1")


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
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> TrainConfig:
        validate_sections(self)
        self._check_engine_can()
        self._check_bitwise()
        self._check_staleness()
        self._check_update()
        self._check_run()
        self.algorithm_fields()  # unknown algorithm names fail here, with the valid names
        return self

    def _check_engine_can(self) -> None:
        """The rollout engine can do what the settings ask of it (`unison.rollout.CAPABILITIES`)."""
        needs = {
            "fp32_lm_head": self.precision.lm_head == "fp32",
            "routing": self.moe.routing_replay,
            "distributions": self.metrics.exact_divergence,
            "bitwise": self.precision.bitwise,
        }
        settings = {
            "fp32_lm_head": "precision.lm_head=fp32",
            "routing": "moe.routing_replay=true",
            "distributions": "metrics.exact_divergence=true",
            "bitwise": "precision.bitwise=true",
        }
        for capability, asked in needs.items():
            if asked:
                check_capability(self.rollout.engine, capability, settings[capability])

    def _check_bitwise(self) -> None:
        """precision.bitwise: one dtype in both engines and no adapters."""
        p = self.precision
        check(
            not p.bitwise or p.rollout == p.train,
            "precision.bitwise",
            f"needs one dtype in both engines (precision.rollout={p.rollout}, precision.train={p.train}); set both to "
            "the same precision",
        )
        check(
            not (self.precision.bitwise and self.lora.enabled and self.lora.dropout > 0),
            "precision.bitwise",
            f"with LoRA needs lora.dropout=0 (it is {self.lora.dropout}): in exact mode the learner computes with "
            "the merged weights W + B A, as the engine does, and the adapter's dropout has no place there",
        )

    def _check_staleness(self) -> None:
        """rollout.max_staleness > 0: a correction chosen, one that fits the preset, and no exact mode."""
        k, c = self.rollout.max_staleness, self.algorithm.staleness_correction
        check(
            k == 0 or c,
            "algorithm.staleness_correction",
            f"must be chosen with rollout.max_staleness={k} (batches sampled up to {k} update(s) ago): decoupled "
            "(pi_old recomputed now, pi_old / mu weighted by the preset's correction, e.g. preset grpo-token-tis) "
            "or rollout (the engine's log mu as pi_old)",
        )
        preset = self.algorithm_fields()
        check(
            c != "decoupled" or (preset.ratio_base == "old" and preset.correction != "none"),
            "algorithm.staleness_correction",
            f"decoupled weights pi_old / mu by the preset's correction, and preset {self.algorithm.preset} has "
            f"{'no pi_old' if preset.ratio_base != 'old' else 'none'}: choose algorithm.preset=grpo-token-tis or "
            "grpo-seq-mis (or staleness_correction=rollout)",
        )
        check(
            not (k and self.precision.bitwise),
            "rollout.max_staleness",
            "cannot go with precision.bitwise: a stale batch's log mu comes from older weights than the learner's, "
            "so they cannot agree to the bit; use rollout.max_staleness=0",
        )

    def _check_update(self) -> None:
        """The sampling, the optimizer, the algorithm's ranges and the batch sizes fit together."""
        r, o = self.rollout, self.optim
        check(
            r.group_size >= 2, "rollout.group_size", "must be at least 2 (advantages compare responses within a group)"
        )
        check(r.temperature > 0, "rollout.temperature", "must be > 0 for RL sampling")
        check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", "must be a positive number")
        check(o.train_batch_size >= 1, "optim.train_batch_size", "must be at least 1")
        check(o.micro_batch_size >= 1, "optim.micro_batch_size", "must be at least 1")
        check(o.micro_batch_tokens >= 0, "optim.micro_batch_tokens", "must be >= 0 (0: automatic)")
        check(o.epochs >= 1, "optim.epochs", "must be at least 1")
        check(o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0")
        check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "AdamW betas must be in [0, 1)")
        check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        a = self.algorithm
        check(
            a.clip_low < 1 and a.clip_high < 10,
            "algorithm.clip_low",
            "clip ranges are fractions: clip_low < 1, clip_high < 10 (negative: the preset's)",
        )
        check(0 <= a.icepop_alpha < a.icepop_beta, "algorithm.icepop_alpha", "need 0 <= icepop_alpha < icepop_beta")
        batch = r.prompts_per_step * r.group_size
        check(
            batch % o.train_batch_size == 0,
            "optim.train_batch_size",
            f"{o.train_batch_size} does not divide the rollout batch {batch} "
            "(rollout.prompts_per_step x rollout.group_size); "
            f"pick a divisor of {batch}",
        )
        check(
            o.train_batch_size % r.group_size == 0,
            "optim.train_batch_size",
            f"must be a multiple of rollout.group_size ({r.group_size}) so mini-batches hold whole groups",
        )
        check(self.algorithm.kl_coef >= 0, "algorithm.kl_coef", "must be >= 0 (0: no KL penalty)")

    def _check_run(self) -> None:
        """The run's length, schedule, evaluation and checkpoints."""
        o = self.optim
        check(self.run.steps >= 1, "run.steps", "must be at least 1")
        check(self.run.eval_every >= 0 and self.run.save_every >= 0, "run.eval_every", "must be >= 0")
        check(self.run.keep_checkpoints >= 1, "run.keep_checkpoints", "must be at least 1")
        check(self.run.eval_samples >= 1, "run.eval_samples", "must be at least 1")
        check(o.warmup_steps <= self.run.steps, "optim.warmup_steps", f"must be at most run.steps ({self.run.steps})")
        check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        parse_size(self.run.shard_size, "run.shard_size")

    def algorithm_fields(self):
        """The preset with this config's overrides applied."""

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


def parse_size(text: str, name: str) -> int:
    """'5GB', '500MB', '2KB' or a number of bytes -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = str(text).strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            value = float(t[: -len(unit)]) * mult
            break
    else:
        value = float(t) if t.replace(".", "", 1).isdigit() else -1
    check(value >= 1, name, f"must be a size such as 5GB or 500MB, not {text!r}")
    return int(value)


def validate_sections(cfg) -> None:
    """Run each section's own checks (`validate`) of a command's config; the command checks what spans sections."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
            section.validate()


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
    if typ is int:  # every integer setting is a count, a size or a seed
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UserError(f"config field {name}: expected an integer, got {value!r}")
        if value < 0:
            raise UserError(f"config field {name}: must be >= 0, not {int(value)}")
        return int(value)
    if typ is float:
        if isinstance(value, bool):
            raise UserError(f"config field {name}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise UserError(f"config field {name}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise UserError(f"config field {name}: must be a finite number, not {value!r}")
        return out
    if typ is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config field {name}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML reads on/off (and yes/no, true/false) as booleans
            return "on" if value else "off"
        return "" if value is None else str(value)
    if typ is list:
        if value is None:
            return []
        if isinstance(value, dict):
            raise UserError(f"config field {name}: expected a list, got {value!r}")
        return list(value) if isinstance(value, (list, tuple)) else [value]
    return value


def _either_form(f: dataclasses.Field, value, typ):
    """A field with a `separator` takes both forms of a list: "a,b" and [a, b] (each field keeps its own type)."""
    sep = f.metadata.get("separator")
    if sep is None:
        return value
    if typ is str and isinstance(value, (list, tuple)):
        return sep.join(str(x).strip() for x in value)
    if typ is list and isinstance(value, str):
        return [x.strip() for x in value.split(sep) if x.strip()]
    return value


def choices_of(f: dataclasses.Field) -> list[str] | None:
    """The valid values of a field, from the table that defines them (None: any value of its type)."""
    table = f.metadata.get("choices")
    if table is None:
        return None
    return sorted(table() if callable(table) else table)


def _check_choice(f: dataclasses.Field, value, name: str) -> None:
    valid = choices_of(f)
    if valid is None or (value == "" and f.default == ""):  # empty: "the preset's own"
        return
    for item in value if isinstance(value, list) else [value]:
        if item not in valid:
            what = f.metadata.get("what") or name.rsplit(".", 1)[-1]
            raise UserError(f"config field {name}: unknown {what} {item!r}; choose one of: {', '.join(valid)}")


def _build(cls, data: dict, prefix: str = ""):
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise UserError(
            f"unknown config key {prefix + unknown[0]!r}; "
            f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(types_)}"
        )
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if (
            dataclasses.is_dataclass(types_[f.name])
            and isinstance(value, dict)
            and f.default_factory is not dataclasses.MISSING
        ):
            # a section given in part keeps this config's own defaults for the rest (e.g. `unison demo` run.out)
            default = dataclasses.asdict(f.default_factory())
            value = {**{k: v for k, v in default.items() if k not in value}, **value}
        values[f.name] = _coerce(_either_form(f, value, types_[f.name]), types_[f.name], prefix + f.name)
        if f.metadata.get("lower") and isinstance(values[f.name], str):
            values[f.name] = values[f.name].lower()
        _check_choice(f, values[f.name], prefix + f.name)
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
                raise UserError(
                    f"config key {key!r} is a section; set one of its fields, "
                    f"e.g. {key}.{next(iter(_field_types(typ)))}=..."
                )
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"config key {'.'.join(parts[: i + 1])!r} must be a section")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(
                    f"key {key!r} appears twice in one section (line {key_node.start_mark.line + 1}); keep one"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | dict | None = None):
    """A config of type `cls` from a YAML file (optional) and `key=value` overrides, validated."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {str(p)!r} not found; give the path of a YAML file (see configs/)")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except UserError as exc:
            raise UserError(f"config file {str(p)!r}: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax there") from None
        except UnicodeDecodeError:
            raise UserError(f"config file {str(p)!r} is not UTF-8 text; save it as UTF-8") from None
        if not isinstance(data, dict):
            raise UserError(
                f"config file {str(p)!r} must hold a mapping of sections (e.g. 'rollout:'), not {type(data).__name__}"
            )
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


def describe(cls, prefix: str = "", values=None) -> list[str]:
    """One line per field: dotted key, this command's default, documentation (with the valid values)."""
    values = cls() if values is None else values
    lines = []
    for f in dataclasses.fields(cls):
        typ = _field_types(cls)[f.name]
        value = getattr(values, f.name)
        if dataclasses.is_dataclass(typ):
            lines += describe(typ, prefix + f.name + ".", value)
        else:
            text = f.metadata.get("doc", "")
            valid = choices_of(f)
            if valid:
                text += f" (one of: {', '.join(valid)})"
            lines.append(f"{prefix + f.name:32s} {value!r:>14}  {text}")
    return lines
