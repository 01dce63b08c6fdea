"""LoRA through peft: low-rank adapters on a frozen base, synced to the rollout engine as merged weights.

The learner wraps its model with peft's `get_peft_model` (`wrap`): the base weights are frozen and held in the
train dtype only; the adapters' A and B matrices are the only trainable parameters, so they alone get fp32 master
weights and optimizer state (`unison.precision.MasterWeights` keeps twins of what requires a gradient). The
learner's forward is peft's: the base layer, plus scale * B A x through the adapter, both in the train dtype, with
the adapter's dropout only where lora.dropout asks for it (0 by default: the policy trained is the policy that
samples).

The rollout engine holds a plain model. Every sync gives it the merged weights (`merged_weights`): for each adapted
layer W + scale * B A, computed in fp32 from the base as the learner holds it and the adapters' fp32 masters (the
same operations as peft's merge), then cast to the rollout dtype; every other weight as the learner holds it, cast.
The engine's checksum is checked against them, as for full fine-tuning.

A LoRA run's checkpoints hold the adapter in peft's format (`adapter_config.json`, whose base_model_name_or_path is
the base model's folder, and `adapter_model.safetensors`: the fp32 masters). Such a folder is a model path for every
command: `unison.models.load_merged` gives the plain model with the adapter merged (the engines, `export`),
`Setup.learner` the base with the adapter on it (`probe` measures the mismatch as LoRA training has it).
"""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unison.errors import UserError
from unison.precision import full_tensor
from unison.routing import routers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what peft's files put before the base model's parameter names


def is_adapter(path) -> bool:
    """Whether a folder holds a peft adapter (and not a whole model)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def is_peft(model) -> bool:
    """Whether `model` is peft's wrapper (a LoRA learner's `peft`), whose checkpoint is its adapter."""
    return hasattr(model, "peft_config")


def read_adapter_config(path) -> dict:
    """An adapter folder's adapter_config.json; a LoRA adapter with a readable base path, or a UserError."""
    path = Path(path)
    try:
        data = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path / ADAPTER_CONFIG} cannot be read ({exc}); re-save the adapter") from None
    if not isinstance(data, dict) or str(data.get("peft_type", "")).upper() != "LORA":
        raise UserError(
            f"{path} holds a {data.get('peft_type') if isinstance(data, dict) else 'broken'} adapter; "
            "unison trains and loads LoRA adapters only"
        )
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; re-save the adapter")
    if not data.get("base_model_name_or_path"):
        raise UserError(
            f"{path / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path); add the "
            "base model's local folder there"
        )
    return data


def adapter_base(path) -> Path:
    """The local folder of the base model an adapter was trained on."""
    data = read_adapter_config(path)
    base = Path(data["base_model_name_or_path"]).expanduser()
    if not base.is_absolute():
        base = (Path(path) / base).resolve() if (Path(path) / base).exists() else base
    if not (base / "config.json").is_file():
        raise UserError(
            f"the adapter in {str(path)!r} was trained on the base model {str(base)!r}, which is not a "
            f"local model folder here; copy the base model there, or set base_model_name_or_path in "
            f"{Path(path) / ADAPTER_CONFIG} to its folder"
        )
    return base


def adapter_shape(data: dict) -> dict:
    """What makes two LoRA adapters interchangeable: rank, alpha and the modules adapted."""
    targets = data.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    return {
        "rank": int(data.get("r", 0)),
        "alpha": float(data.get("lora_alpha", 0)),
        "target_modules": ",".join(sorted(targets)),
    }


# ---- targets ------------------------------------------------------------------------------------------------------
def _adaptable(module) -> bool:
    """A layer peft's LoRA wraps: a linear layer (or GPT-2's Conv1D, a transposed one)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _dims(module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, torch.nn.Linear) else (w.shape[0], w.shape[1])


def decoder_linears(model) -> dict[str, list[tuple[str, tuple[int, int]]]]:
    """The linear layers of the decoder blocks (not the embeddings, the LM head or an MoE router) by their last name:
    [(full name, (in, out)), ...]. The blocks are found as the repeated layer list (model.layers, h, ...)."""
    skip = {id(r) for r in routers(model)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: dict[str, list] = {}
    for name, module in model.named_modules():
        if not _adaptable(module) or id(module) in skip or module is head:
            continue
        parts = name.split(".")
        if not any(p.isdigit() for p in parts):  # outside the decoder blocks
            continue
        out.setdefault(parts[-1], []).append((name, _dims(module)))
    return out


def resolve_targets(model, requested: str) -> list[str]:
    """The module names (last part of the name, as peft matches them) to adapt: `auto` is every linear layer of the
    decoder blocks (attention and MLP projections; not an MoE router, whose experts' choice would then be trained);
    or a comma-separated list, each of which must name such a layer."""
    found = decoder_linears(model)
    kind = getattr(getattr(model, "config", None), "model_type", "this")
    if not found:
        raise UserError(
            f"this {kind} model has no linear layers in its decoder blocks for LoRA to adapt; train it "
            "without LoRA (lora.enabled=false)"
        )
    if requested.strip().lower() in ("auto", "all-linear", ""):
        return sorted(found)
    names = [n.strip() for n in requested.split(",") if n.strip()]
    for n in names:
        if n not in found:
            raise UserError(
                f"lora.target_modules: {n!r} matches no linear layer of this {kind} model's decoder "
                f"blocks; choose among {', '.join(sorted(found))} (or auto)"
            )
    return sorted(set(names))


def check_rank(model, targets: list[str], rank: int) -> None:
    found = decoder_linears(model)
    if rank < 1:
        raise UserError(f"lora.rank must be at least 1 (got {rank}); 8 to 64 are usual")
    for t in targets:
        for name, (fan_in, fan_out) in found[t]:
            if rank > min(fan_in, fan_out):
                raise UserError(
                    f"lora.rank={rank} is larger than the layer {name} ({fan_in} -> {fan_out}): a "
                    f"rank-{rank} update of it is no low-rank update; use lora.rank <= "
                    f"{min(fan_in, fan_out)}"
                )


def wrap(model, rank: int, alpha: float, targets: list[str], dropout: float = 0.0):
    """peft's LoRA model around `model`, whose `targets` layers it replaces in place by adapted ones: base frozen,
    A and B trainable (A random, B zero: the model computes what the base did until the first step). `model`
    itself (`get_base_model()`) then runs the adapters: the learner calls it as it calls any model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question about checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = get_peft_model(model, config, autocast_adapter_dtype=False)
    base = getattr(model.config, "_name_or_path", "") or ""
    if base:
        wrapped.peft_config["default"].base_model_name_or_path = str(Path(base).absolute())
    return wrapped


def adapt(model, lora, adapter=None):
    """peft's LoRA wrapper around `model` as `lora` (a LoraConfig section) asks, checked first: targets that match
    layers, a rank each layer can take, and, going on from a saved adapter (`adapter`, a folder), one of that shape,
    whose fp32 weights the adapters start from."""
    targets = resolve_targets(model, lora.target_modules)
    check_rank(model, targets, lora.rank)
    if adapter is not None:
        check_same_shape(adapter, lora.rank, lora.alpha, targets)
    wrapped = wrap(model, lora.rank, lora.alpha, targets, lora.dropout)
    if adapter is not None:
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        saved = read_adapter(adapter, trainable)
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(saved[n])
    return wrapped


def set_dropout(model, on: bool) -> None:
    """The adapters' dropout modules in train mode (on) while everything else stays in eval mode."""
    for name, module in model.named_modules():
        if name.split(".")[-2:-1] == ["lora_dropout"]:
            module.train(on)


def describe(wrapped) -> str:
    """LoRA's rank, targets and share of the parameters trained, in a few words."""
    c = wrapped.peft_config["default"]
    trained = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    return (
        f"LoRA rank {c.r}, alpha {c.lora_alpha:g} on {','.join(sorted(c.target_modules))} "
        f"({trained:,} of {total:,} parameters trained)"
    )


# ---- weights ------------------------------------------------------------------------------------------------------
def plain_name(name: str) -> str:
    """A parameter's name in the adapted model as the plain model names it."""
    return name.replace(".base_layer.", ".")


def lora_delta(layer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """scale * B A of a peft LoRA layer, in fp32 from its A [r, in] and B [out, r] (any float dtype), laid out as
    the base layer's weight. The one formula of the merged weight, for the export to the engine and for the
    learner's merged forward in exact mode (`merged_forward`), so that both round alike."""
    from peft.utils.other import transpose

    return transpose(b.float() @ a.float(), layer.fan_in_fan_out) * layer.scaling["default"]


class _WithWeight:
    """A module seen with another weight (every other attribute its own)."""

    def __init__(self, module, weight: torch.Tensor):
        self.module, self.weight = module, weight

    def __getattr__(self, name: str):
        return getattr(self.module, name)


def merged_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A peft LoRA layer's forward as one product with the merged weight (W + scale * B A, rounded to W's dtype):
    what the engine, which holds the merged weights, computes, so that precision.bitwise holds with LoRA. The
    gradient reaches A and B through the merge. The base layer's own forward runs (its matmul mode, its exact
    products) with the merged weight in place of W."""
    if self.merged:
        raise RuntimeError("merged_forward on a LoRA layer whose adapter is already merged into its base weight")
    base = self.base_layer
    a, b = self.lora_A["default"].weight, self.lora_B["default"].weight
    weight = (base.weight.float() + lora_delta(self, a, b)).to(base.weight.dtype)
    forward = getattr(base.forward, "__func__", None) or type(base).forward  # its own (matmul mode, exact)
    return forward(_WithWeight(base, weight), x)


def merge_in_forward(model) -> None:
    """Every LoRA layer of `model` computes with its merged weight (`merged_forward`)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.forward = types.MethodType(merged_forward, module)


def merged_weights(
    model, masters: dict[str, torch.Tensor], dtype: torch.dtype, train: torch.dtype, fp32: set[str] = frozenset()
):
    """(name, weight) for every parameter of the plain model: W + scale * B A in fp32 for adapted layers (base W as
    the learner computes with it, in the `train` dtype; A and B from `masters` by name: the fp32 masters, or in
    exact mode the learner's own copies), every other weight as the learner holds it; cast to `dtype` (fp32 for the
    plain names in `fp32`). Sharded tensors are gathered first."""
    from peft.tuners.lora import LoraLayer

    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    out = []
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        plain = plain_name(name)
        w = full_tensor(p.detach())
        if plain not in fp32:
            w = w.to(train)  # (a no-op in one process, where the frozen base is held in the train dtype)
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        if owner is not None and name.endswith(".base_layer.weight") and owner in adapted:
            layer = adapted[owner]
            a = full_tensor(masters[f"{owner}.lora_A.default.weight"])
            b = full_tensor(masters[f"{owner}.lora_B.default.weight"])
            w = w.float() + lora_delta(layer, a, b)
        out.append((plain, w.to(torch.float32 if plain in fp32 else dtype)))
    return out


def saved_name(name: str) -> str:
    """An adapter parameter's name (in the adapted model) as adapter_model.safetensors stores it."""
    return PREFIX + name.replace(".default.", ".")


def read_adapter(path, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter folder's fp32 weights for the adapter parameters `params` (by their names in the adapted model);
    an adapter of another shape is a UserError."""
    names, shapes = list(params), {n: p.shape for n, p in params.items()}
    stored = load_adapter_weights(path)
    out = {}
    for n in names:
        key = saved_name(n)
        if key not in stored:
            raise UserError(f"the adapter in {str(path)!r} has no {key}: it adapts other layers than lora.* asks for")
        if tuple(stored[key].shape) != tuple(shapes[n]):
            raise UserError(
                f"the adapter in {str(path)!r} holds {key} in shape {tuple(stored[key].shape)}, not "
                f"{tuple(shapes[n])}: it was trained with another lora.rank"
            )
        out[n] = stored[key].float()
    extra = set(stored) - {saved_name(n) for n in names}
    if extra:
        raise UserError(
            f"the adapter in {str(path)!r} adapts layers lora.* does not ask for (such as "
            f"{sorted(extra)[0]}); set lora.target_modules to the adapter's"
        )
    return out


def load_adapter_weights(path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder's adapter_model.safetensors; a file that cannot be read (cut short, not
    safetensors) is a UserError."""
    file = Path(path) / ADAPTER_WEIGHTS
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{file} cannot be read ({first}); re-save or re-export the adapter") from None


def save_adapter(folder: Path, config, masters: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
    """The adapter in peft's format into `folder`: adapter_config.json (peft's LoraConfig `config`) and
    adapter_model.safetensors (`masters`, by their names in the adapted model, cast to `dtype`)."""

    folder = Path(folder)
    config.save_pretrained(str(folder))
    save_file(
        {saved_name(n): t.detach().to(dtype).cpu().contiguous() for n, t in masters.items()},
        str(folder / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )


def check_same_shape(path, rank: int, alpha: float, targets: list[str]) -> None:
    """Training goes on with the adapter in `path` only if lora.* asks for one of its shape."""
    have = adapter_shape(read_adapter_config(path))
    want = {"rank": rank, "alpha": float(alpha), "target_modules": ",".join(sorted(targets))}
    if have != want:
        key = next(k for k in want if want[k] != have[k])
        raise UserError(
            f"model.path {str(path)!r} holds a LoRA adapter with {key} {have[key]!r}, and lora.* asks "
            f"for {want[key]!r}: to go on training it, set lora.rank={have['rank']} "
            f"lora.alpha={have['alpha']:g} lora.target_modules={have['target_modules']}; to train a new "
            "adapter on it, export it merged first (unison export PATH --out DIR) and train on DIR"
        )
