"""Models: a local Hugging Face causal-LM checkpoint with its tokenizer (offline), or the built-in tiny one.

The built-in model is a small Qwen2-architecture network with a character-level tokenizer, both created locally
(`build_tokenizer`, `random_model`); the warm-started checkpoint shipped in `unison/assets/countdown-tiny` was
trained from them by `unison.warmstart` on the built-in task.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from unison import gguf
from unison.architecture import causal_lm_class
from unison.errors import UserError
from unison.lora import adapter_base, is_adapter
from unison.precision import cast_module
from unison.runfolder import MANIFEST, damaged_file, is_complete

BUILTIN = "builtin"
ASSETS = Path(__file__).parent / "assets"
BUILTIN_DIR = ASSETS / "countdown-tiny"
# the shipped warm starts by name (`model.path`), with the command that rebuilds each: the built-in model; its
# mixture-of-experts variant (a Qwen3-MoE of the same size, 4 experts, 2 per token); and the built-in model taken on
# to the long-response task (`countdown-long`, a context of 2048 positions)
BUILTINS = {
    BUILTIN: (BUILTIN_DIR, "python -m unison.warmstart"),
    "builtin-moe": (
        ASSETS / "countdown-tiny-moe",
        "python -m unison.warmstart --arch qwen3-moe --out src/unison/assets/countdown-tiny-moe",
    ),
    "builtin-long": (
        ASSETS / "countdown-tiny-long",
        "python -m unison.warmstart --long --batch-size 8 --lr 1e-3 "
        "--phase2-lr 5e-4 --target 0.25 --phase2-steps 200 --out src/unison/assets/countdown-tiny-long",
    ),
}

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, EOS, UNK, "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 272  # 5 special tokens + 256 byte tokens, rounded up to a multiple of 16

BUILTIN_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def build_tokenizer():
    """The built-in byte-level tokenizer: one token per byte (no merges) plus special tokens.

    Byte-level BPE without merges is what Qwen2's tokenizer class expects, so every loader (transformers 4 and 5,
    vLLM) reads it the same way; each character of the built-in task is one token.
    """

    byte_chars = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [byte_chars[b] for b in range(256)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=1024
    )


def random_model(seed: int = 0, **overrides):
    """A random-initialised Qwen2 causal LM (fp32), of the built-in tokenizer's vocabulary unless `vocab_size` says."""

    cfg = {"vocab_size": VOCAB_SIZE, **BUILTIN_CONFIG, **overrides}
    config = Qwen2Config(bos_token_id=None, eos_token_id=1, pad_token_id=0, **cfg)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save a model (safetensors) and tokenizer as a Hugging Face checkpoint directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def resolve_model_dir(name: str | Path) -> Path:
    """A shipped model's name (`BUILTINS`; empty: `builtin`) or a fetched one's (`gguf.FETCHABLE`) to its folder; a
    GGUF file (or a folder holding one) to its converted folder (`gguf.converted`); otherwise a local checkpoint
    directory (or a LoRA adapter's), checked."""
    if name in (None, ""):
        name = BUILTIN
    if isinstance(name, str) and name in BUILTINS:
        folder, command = BUILTINS[name]
        if not (folder / "config.json").exists():
            raise UserError(f"the shipped model {name!r} is missing from {folder}; rebuild it with: {command}")
        return folder
    if isinstance(name, str) and name in gguf.FETCHABLE:
        return gguf.fetched(name)
    path = Path(name).expanduser()
    if not path.exists():
        names = ", ".join(gguf.FETCHABLE)
        how = f"give a local Hugging Face checkpoint directory, a .gguf file, 'builtin' or a fetched model ({names})"
        raise UserError(f"model directory {str(path)!r} does not exist; {how}")
    source = gguf.source_file(path)
    if source is not None:
        return gguf.converted(source)
    if not path.is_dir():
        how = "give the checkpoint's directory (with config.json) or a .gguf file"
        raise UserError(f"model path {str(path)!r} is a file, not a GGUF one; {how}")
    check_intact(path)
    if is_adapter(path):  # a LoRA adapter (a LoRA run's checkpoint): checked, with its base model
        adapter_base(path)
        return path
    if not (path / "config.json").exists():
        raise UserError(
            f"{str(path)!r} has no config.json, so it is not a Hugging Face checkpoint; give the checkpoint's directory"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({exc}); re-save the checkpoint") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{path / 'config.json'} has no model_type; re-save the checkpoint with save_pretrained")
    return path


def check_intact(path: Path) -> None:
    """A run's checkpoint (a folder with a manifest) given as a model: complete, and every file matching the hash
    its manifest recorded, or a UserError naming the file."""
    if not (path / MANIFEST).is_file():
        return
    how = "give another checkpoint of the run (its checkpoints/ folder), or restore the file"
    if not is_complete(path):
        raise UserError(f"checkpoint {str(path)!r} is incomplete (its files disagree with {MANIFEST}); {how}")
    bad = damaged_file(path)
    if bad is not None:
        raise UserError(f"checkpoint {str(path)!r} is damaged ({bad} does not match its hash in {MANIFEST}); {how}")


def base_model_dir(path: Path) -> Path:
    """The folder of the whole model: `path` itself, or, for a LoRA adapter, its base model's."""
    return adapter_base(path) if is_adapter(path) else path


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved in a checkpoint directory (offline); a missing one is a user error."""

    path = resolve_model_dir(model_dir)
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).exists() for n in names):
        path = base_model_dir(path)  # an adapter saved without one: its base model's
    if not any((path / n).exists() for n in names):
        raise UserError(
            f"{str(path)!r} has no tokenizer (tokenizer.json or tokenizer_config.json); "
            "save it beside the model with tokenizer.save_pretrained"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise UserError(f"cannot load the tokenizer in {str(path)!r}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# attention kernels a Hugging Face model can be loaded with (model.attn_implementation)
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


def resolve_attn_implementation(config, requested: str = "auto", device: torch.device | str = "cpu") -> str:
    """The attention implementation to load `config`'s model with: `auto` is sdpa where the model class supports it
    and the model does not soft-cap its attention scores (Gemma2: SDPA has no soft-capping, and transformers before
    5.2x runs Gemma2 on SDPA without it), else eager. A choice the model or the machine cannot run is a user error."""
    cls = causal_lm_class(config)
    kind = config.model_type
    softcap = getattr(config, "attn_logit_softcapping", None)
    sdpa_ok = bool(getattr(cls, "_supports_sdpa", True)) and not softcap
    if requested == "auto":
        return "sdpa" if sdpa_ok else "eager"
    if requested == "sdpa" and not sdpa_ok:
        why = (
            f"SDPA does not apply its attention soft-capping ({softcap})"
            if softcap
            else "this transformers has no SDPA for it"
        )
        raise UserError(f"{kind} models cannot run model.attn_implementation=sdpa: {why}; use auto or eager")
    if requested == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError(
                "model.attn_implementation=flash_attention_2 needs the flash-attn package, which is not "
                "installed (pip install flash-attn on a CUDA machine); use auto"
            )
        if torch.device(device).type != "cuda":
            raise UserError(
                "model.attn_implementation=flash_attention_2 runs on CUDA GPUs only; use auto on this device"
            )
        if not getattr(cls, "_supports_flash_attn", getattr(cls, "_supports_flash_attn_2", False)):
            raise UserError(f"{kind} models do not support flash_attention_2; use auto")
    if requested not in ATTN_IMPLEMENTATIONS:
        raise UserError(
            f"unknown attention implementation {requested!r}; choose one of: {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    return requested


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
):
    """A causal LM from a local checkpoint directory (offline), on `device`, in `dtype`, in eval mode.

    The weights are loaded as fp32, whatever `config.json`'s dtype says, then cast once to `dtype`. A weight the files
    lack or hold in another shape (which transformers would initialise at random), and a weight holding NaN or inf,
    are UserErrors naming the weight."""

    path = resolve_model_dir(model_dir)
    if is_adapter(path):  # the base model with the adapter merged in
        return load_merged(path, device=device, dtype=dtype, attn_implementation=attn_implementation)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        attn = resolve_attn_implementation(config, attn_implementation, device)
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            local_files_only=True,
            dtype=torch.float32,
            attn_implementation=attn,
            output_loading_info=True,
        )
    except ValueError as exc:
        raise UserError(f"cannot load {str(path)!r} as a causal LM: {str(exc).splitlines()[0]}") from None
    except (OSError, RuntimeError, KeyError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load the checkpoint in {str(path)!r}: {first}; re-save or re-copy it") from None
    model, info = model
    for kind, what in (("missing_keys", "has no weight"), ("mismatched_keys", "holds in another shape the weight")):
        found = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise UserError(
                f"{str(path)!r} {what} {found[0]}{more} that its config.json calls for; re-save the "
                "checkpoint, or fix config.json to match its weights"
            )
    return finish_loading(model, path, device, dtype)


def finish_loading(model, path, device, dtype: torch.dtype):
    """A loaded fp32 model checked for NaN/inf weights (a UserError naming the first), cast to `dtype`, on `device`,
    in eval mode."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(
                f"{str(path)!r}: weight {name} holds NaN or inf values; use another checkpoint (a run's "
                "earlier one) or re-save it"
            )
    cast_module(model, dtype)
    return model.to(device).eval()


def _ids(value) -> set[int]:
    if isinstance(value, bool) or value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)}
    return set()


def eos_token_ids(tokenizer, model_dir: str | Path | None = None) -> tuple[int, ...]:
    """The ids that end a response: the union of the tokenizer's EOS, `eos_token_id` of the checkpoint's
    generation_config.json (an int or a list) and of its config.json (and its text_config, for multimodal configs)."""
    ids = _ids(tokenizer.eos_token_id)
    if model_dir is not None:
        path = base_model_dir(resolve_model_dir(model_dir))
        for name in ("generation_config.json", "config.json"):
            try:
                data = json.loads((path / name).read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict):
                ids |= _ids(data.get("eos_token_id"))
                if isinstance(data.get("text_config"), dict):
                    ids |= _ids(data["text_config"].get("eos_token_id"))
    return tuple(sorted(ids))


def load_merged(path, device="cpu", dtype: torch.dtype = torch.float32, attn_implementation: str = "auto"):
    """The base model of an adapter folder with the adapter merged in (peft's merge, in fp32), cast to `dtype`: a
    plain model."""
    from peft import PeftModel

    base = load_model(adapter_base(path), dtype=torch.float32, attn_implementation=attn_implementation)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            merged = PeftModel.from_pretrained(base, str(path), is_trainable=False).merge_and_unload()
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as exc:
        raise UserError(
            f"cannot load the adapter in {str(path)!r} onto its base model: "
            f"{str(exc).splitlines()[0]}; re-save the adapter"
        ) from None
    return finish_loading(merged, path, device, dtype)
