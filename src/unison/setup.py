"""What every command stands on, built once from the config sections they share (`unison.config`): the device, the
model folder and its config, the attention implementation, the tokenizer, the stop ids and strings, the task and
its prompts (checked against the model's context), and the rollout engines and learners made on them.

`build` checks every input before a command writes anything: a bad path, an architecture or feature that cannot be
run exactly, a missing attention implementation, a prompt file without its column and a prompt that does not fit
the model's context are each one `UserError`.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from unison import distributed, gguf
from unison.architecture import LENGTH_DEPENDENT_ROPE_TYPES, rope_types
from unison.checkpoint import weight_files
from unison.config import DataConfig, LoraConfig, ModelConfig, RolloutConfig
from unison.errors import UserError
from unison.evaluation import encode_all
from unison.learner import Learner
from unison.lora import adapt, adapter_base, adapter_shape, is_adapter, read_adapter_config
from unison.models import (
    ASSETS,
    base_model_dir,
    eos_token_ids,
    load_model,
    load_tokenizer,
    resolve_attn_implementation,
    resolve_model_dir,
)
from unison.precision import PrecisionPolicy, check_dtype_supported, precision_name, resolve_device
from unison.rollout import capable, make_engine
from unison.rollout.base import SamplingParams
from unison.routing import routers
from unison.tasks import load_task
from unison.tasks.base import Example

HOW_DECODER = "give a decoder-only causal LM checkpoint (e.g. Qwen2, Qwen3, Llama, Mistral)"


def load_model_config(model_dir):
    """The checkpoint's transformers config; a model that is not a decoder-only causal LM is refused."""

    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (ValueError, KeyError, OSError):  # an unknown model_type, a broken config.json
        raise UserError(f"{str(model_dir)!r} holds a model of unknown type; {HOW_DECODER}") from None
    kind = config.model_type
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{str(model_dir)!r} holds a {kind!r} model, which is not a causal LM; {HOW_DECODER}")
    if getattr(config, "is_encoder_decoder", False) or (
        kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder
    ):
        raise UserError(
            f"{str(model_dir)!r} holds a {kind!r} model, an encoder, not a decoder-only causal LM; {HOW_DECODER}"
        )
    return config


def refuse_inexact(config, model_dir) -> None:
    """Refuse (one line, naming the feature) a checkpoint that no engine and learner of unison can run exactly."""
    where = str(model_dir)
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "quantized") if isinstance(quant, dict) else type(quant).__name__
        raise UserError(
            f"{where!r} holds {method} quantized weights, which the learner cannot train with fp32 master "
            "weights; give the checkpoint in fp32, bf16 or fp16"
        )
    varying = sorted(rope_types(config) & LENGTH_DEPENDENT_ROPE_TYPES)
    if varying:
        rope = varying[0]
        raise UserError(
            f"{where!r} uses {rope!r} rotary scaling, whose angles change with the sequence length, so a "
            "decode with a cache and the learner's full-sequence forward cannot agree; use a checkpoint "
            "with static rotary scaling (default, linear, llama3 or yarn)"
        )


@dataclass
class Setup:
    """Everything a command runs on (see the module docstring). Built by `build`."""

    device: torch.device
    model_dir: Path
    config: object  # the transformers config
    model: ModelConfig
    rollout: RolloutConfig
    data: DataConfig
    attn_implementation: str
    tokenizer: object
    stop_token_ids: tuple[int, ...]
    task: object
    seed: int = 0
    max_new_tokens: int = 0  # rollout.max_new_tokens, lowered where rollout.context_limit=clamp asks
    prompt_ids: dict = field(default_factory=dict)  # id(example) -> token ids

    @property
    def context(self) -> int | None:
        """The model's context (max_position_embeddings), where its config states one."""
        n = getattr(self.config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    # ---- prompts ----------------------------------------------------------------------------------------
    def examples(self, split: str = "train", n: int | None = None, subset: bool = True) -> list[Example]:
        """The task's examples of `split` (seeded shuffle), restricted to data.subset (with `subset`), at most `n`."""
        found = self.task.examples(split, seed=self.seed)
        if subset and self.data.subset:
            keep = read_subset(self.data.subset)
            found = [e for e in found if e.id in keep]
            if not found:
                raise UserError(
                    f"data.subset {self.data.subset!r} matches no prompt of the task; build it with "
                    "`unison filter` on the same data"
                )
        return found[:n] if n else found

    def encode(self, examples: list[Example]) -> list[list[int]]:
        """Token ids of each example's templated prompt, checked against the model's context with max_new_tokens
        (rollout.context_limit: error, or clamp max_new_tokens with a warning); kept in `prompt_ids`."""
        ids = encode_all(self.tokenizer, examples, self.data.template, self.data.system_prompt)
        self.check_vocabulary(examples, ids)
        ctx = self.context
        if ctx is not None and ids:
            longest = max(range(len(ids)), key=lambda i: len(ids[i]))
            n, ex = len(ids[longest]), examples[longest]
            if n + self.max_new_tokens > ctx:
                name = ex.id or ex.prompt[:40]
                room = ctx - n
                if self.rollout.context_limit == "clamp" and room >= 1:
                    warnings.warn(
                        f"rollout.max_new_tokens lowered from {self.max_new_tokens} to {room}: prompt "
                        f"{name!r} has {n} tokens and the model's context is {ctx}",
                        stacklevel=2,
                    )
                    self.max_new_tokens = room
                elif room < 1:
                    raise UserError(
                        f"prompt {name!r} has {n} tokens, leaving no room for a response in the model's "
                        f"context of {ctx}; shorten it or drop it from the prompt file"
                    )
                else:
                    raise UserError(
                        f"prompt {name!r} has {n} tokens, and with rollout.max_new_tokens="
                        f"{self.max_new_tokens} a response could reach {n + self.max_new_tokens}, beyond "
                        f"the model's context of {ctx} (max_position_embeddings); lower "
                        f"rollout.max_new_tokens to {room}, shorten the prompt, or set "
                        "rollout.context_limit=clamp"
                    )
        self.prompt_ids.update({id(e): p for e, p in zip(examples, ids)})
        return ids

    def check_vocabulary(self, examples: list[Example], ids: list[list[int]]) -> None:
        """Every token id a prompt (or the padding) takes is one the model's embedding has: a tokenizer with more
        tokens than the model's vocabulary (another model's, or tokens added without resizing) is refused."""
        vocab = getattr(self.config, "vocab_size", None) or getattr(
            getattr(self.config, "text_config", None), "vocab_size", None
        )
        if not isinstance(vocab, int) or not ids:
            return
        pad = self.tokenizer.pad_token_id
        worst = max(range(len(ids)), key=lambda i: max(ids[i]))
        token, where = max(ids[worst]), f"prompt {examples[worst].id or examples[worst].prompt[:40]!r}"
        if isinstance(pad, int) and pad > token:
            token, where = pad, "the padding"
        if token >= vocab:
            raise UserError(
                f"{where} takes token id {token}, beyond the model's vocabulary of {vocab} (config.json "
                f"vocab_size; its tokenizer has {len(self.tokenizer)} tokens); give the tokenizer the model was "
                "trained with"
            )

    def sampling(
        self,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        max_new_tokens: int | None = None,
    ) -> SamplingParams:
        """The rollout section's sampling, with the stop ids and strings; arguments override its fields."""
        r = self.rollout
        return SamplingParams(
            max_new_tokens or self.max_new_tokens,
            r.temperature if temperature is None else temperature,
            r.top_p if top_p is None else top_p,
            r.top_k if top_k is None else top_k,
            stop_token_ids=self.stop_token_ids,
            stop_strings=tuple(r.stop),
        )

    # ---- engines and learners -----------------------------------------------------------------------------
    def engine(self, dtype: torch.dtype, seed: int | None = None, name: str | None = None, **kwargs):
        """A rollout engine (rollout.engine unless `name`) holding the checkpoint's weights in `dtype`; a vLLM engine
        spreads over rollout.tensor_parallel_size GPUs."""
        if self.rollout.tensor_parallel_size > 1 and capable(name or self.rollout.engine, "tensor_parallel"):
            if self.device.type != "cuda":
                raise UserError(
                    f"rollout.tensor_parallel_size={self.rollout.tensor_parallel_size} needs CUDA GPUs; "
                    "on a CPU use rollout.tensor_parallel_size=1"
                )
            kwargs.setdefault("tensor_parallel_size", self.rollout.tensor_parallel_size)
        return make_engine(
            name or self.rollout.engine,
            self.model_dir,
            dtype=dtype,
            device=self.device,
            seed=self.seed if seed is None else seed,
            matmul=self.model.matmul,
            gemm=self.model.gemm,
            attn_implementation=self.attn_implementation,
            **kwargs,
        )

    @property
    def adapter(self) -> Path | None:
        """The model folder when it holds a LoRA adapter (a LoRA run's checkpoint), else None."""
        return self.model_dir if is_adapter(self.model_dir) else None

    def load_model(self, dtype: torch.dtype = torch.float32, base: bool = False):
        """The checkpoint's model (a LoRA adapter merged into its base); with `base`, an adapter's base alone."""
        path = base_model_dir(self.model_dir) if base else self.model_dir
        return load_model(path, device=self.device, dtype=dtype, attn_implementation=self.attn_implementation)

    def policy_model(self, lora: LoraConfig | None = None):
        """The model a learner trains, prepared before the learner is built: the checkpoint in fp32 on the device;
        with LoRA (`lora` enabled, or, where `lora` is None, the adapter model.path holds), its base wrapped by peft
        (`unison.lora.adapt`), going on from the adapter model.path holds where it holds one."""
        if lora is None and self.adapter is not None:
            lora = LoraConfig(enabled=True, **adapter_shape(read_adapter_config(self.adapter)))
        if lora is None or not lora.enabled:
            return self.load_model()
        return adapt(self.load_model(base=True), lora, self.adapter)

    def learner(self, policy: PrecisionPolicy, model=None, **sections) -> Learner:
        """A learner on `model` (default: a fresh `policy_model`) with this set-up's pad id and model section;
        `sections` are the Learner's (optim, precision, moe, world). Routing replay asked of a dense model is
        refused."""
        model = self.policy_model() if model is None else model
        moe = sections.get("moe")
        if moe is not None and moe.routing_replay and not routers(model):
            raise UserError(
                "moe.routing_replay needs a mixture-of-experts model (Qwen2-MoE, Qwen3-MoE, Mixtral); "
                f"this {self.config.model_type} has no routers"
            )
        return Learner(model, policy, pad_token_id=self.tokenizer.pad_token_id or 0, model_cfg=self.model, **sections)

    def describe(self, engine=None) -> str:
        """The model, its architecture and, given an engine, the decode path it runs for this set-up's prompts."""
        text = f"{self.model.path} ({self.config.model_type}, attention {self.attn_implementation})"
        if self.adapter is not None:
            shape = adapter_shape(read_adapter_config(self.adapter))
            text += f" | LoRA adapter (rank {shape['rank']}) on {adapter_base(self.adapter)}"
        if engine is not None:
            what = engine.describe() if hasattr(engine, "describe") else type(engine).__name__
            text += f" | {what}"
        return text


def build(
    model: ModelConfig,
    data: DataConfig,
    rollout: RolloutConfig,
    *,
    dtypes=(),
    seed: int = 0,
    require_answer: bool = True,
) -> Setup:
    """Resolve and check the shared sections: device, dtypes on it, model folder and config, attention
    implementation, tokenizer, stop ids, task. Nothing is written but, on a GGUF model's first use, its converted
    folder in the cache (`unison.gguf`); for such a model the last thing done is one line to stderr saying so."""
    device = resolve_device(model.device)
    for dtype in dict.fromkeys(dtypes):
        check_dtype_supported(dtype, device)
    model_dir = resolve_model_dir(model.path)
    base = base_model_dir(model_dir)  # a LoRA adapter's base model
    config = load_model_config(base)
    refuse_inexact(config, model_dir)
    weight_files(base)  # a sharded checkpoint with a shard missing is refused before anything loads
    attn = resolve_attn_implementation(config, model.attn_implementation, device)
    tokenizer = load_tokenizer(model_dir)
    stops = eos_token_ids(tokenizer, model_dir)
    task = load_task(
        data.source,
        prompt_key=data.prompt_key,
        answer_key=data.answer_key,
        reward=data.reward or None,
        test_path=data.test_source or None,
        require_answer=require_answer,
    )
    converted = gguf.note(base)
    if converted and distributed.rank() == 0:  # every check passed: the first line the command prints
        names = " and ".join(dict.fromkeys(precision_name(d) for d in dtypes)) or "fp32"
        print(f"unison: {converted}; loaded in {names}", file=sys.stderr, flush=True)
    return Setup(
        device,
        model_dir,
        config,
        model,
        rollout,
        data,
        attn,
        tokenizer,
        stops,
        task,
        seed=seed,
        max_new_tokens=rollout.max_new_tokens,
    )


def read_subset(path: str) -> set[str]:
    """Prompt ids from a `unison filter` output file (JSONL with an `id` field per line)."""

    p = ASSETS / "countdown-perfectible.jsonl" if path == "builtin" else Path(path)
    if not p.is_file():
        raise UserError(f"data.subset file {path!r} not found; create it with `unison filter`")
    ids = set()
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f"{path}:{n} is not a JSON object with an 'id'; build the subset with `unison filter`"
                ) from None
    return ids
