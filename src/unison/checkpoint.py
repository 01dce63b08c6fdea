"""Crash-safe checkpoints in Hugging Face format.

A checkpoint is a folder `checkpoints/step-000040/` holding the fp32 master weights as `model.safetensors` (or, for
a model bigger than run.shard_size, shards with a `model.safetensors.index.json`) with `config.json` (whose dtype
says float32, the dtype the weights are stored in) and the tokenizer, loadable by any Hugging Face tool, and
`trainer_state.pt` (optimizer, loss scaler, RNG states, data position, step). It is written into a temporary
folder, every file fsynced, then renamed into place, and `manifest.json` (the files with their sizes and SHA-256
hashes) is written last: a folder without a manifest, or whose files' sizes disagree with it, is incomplete and
ignored by `--resume`, and one whose files no longer match their hashes is damaged: `--resume` names it and takes
the newest intact one (`latest_intact_checkpoint`). A kill at any moment leaves the previous checkpoint intact.
Leftovers of a killed save (a `.tmp-step-*` folder, a step folder without manifest) are removed by the next save;
`truncate_jsonl` drops the run log's rows after the step a run resumes from (and a line torn by a kill).
`check_compatible` refuses to resume a run folder whose checkpoint was written for another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unison import gguf
from unison.config import parse_size
from unison.errors import UserError, write_error
from unison.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    is_adapter,
    is_peft,
    load_adapter_weights,
    read_adapter_config,
    save_adapter,
)
from unison.models import load_model, load_tokenizer, resolve_model_dir
from unison.precision import parse_precision
from unison.runfolder import (  # noqa: F401 - the manifest's helpers are the checkpoint's
    MANIFEST,
    check_output_folder,
    damaged_file,
    file_hash,
    fsync_dir,
    fsync_tree,
    is_complete,
    notice_torn,
)


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Make the `dtype` that `config.json` states (and its text_config's) the dtype its weights are stored in:
    `save_pretrained` writes the dtype of the model it is called on, which for the learner's compute copy is the
    train dtype, not that of the fp32 master weights saved with it."""
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    name = str(dtype).rsplit(".", 1)[-1]
    for node in (data, data.get("text_config")):
        if isinstance(node, dict):
            for key in ("dtype", "torch_dtype"):
                if key in node or (key == "dtype" and node is data):
                    node[key] = name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    master_state: dict,
    trainer_state: dict,
    keep: int = 2,
    shard_size: int | str = "5GB",
    rank_states: list | None = None,
) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep` complete ones. `rank_states` are the
    states of ranks 1, 2, ... of a run on several ranks (`rank-001.pt`, ...; rank 0's is `trainer_state.pt`)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    remove_leftovers(run_dir)
    tmp.mkdir()
    try:
        state_dict = {name: t.detach().float().cpu().contiguous() for name, t in master_state.items()}
        if is_peft(model):  # LoRA: the adapter in peft's format (its fp32 masters)
            save_adapter(tmp, model.peft_config["default"], state_dict)
        else:
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size=shard_size)
            set_config_dtype(tmp, torch.float32)
        tokenizer.save_pretrained(tmp)
        save_state(trainer_state, tmp / "trainer_state.pt")
        for rank, state in enumerate(rank_states or [], start=1):
            save_state(state, tmp / rank_file(rank))
        fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (disk full) leaves the previous checkpoints as they were
        plain = write_error(exc)
        if plain is None or plain is exc:
            raise
        raise plain from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    files = {p.name: p.stat().st_size for p in final.iterdir() if p.is_file()}
    hashes = {name: file_hash(final / name) for name in files}
    write_json_atomic(final / MANIFEST, {"step": step, "files": files, "sha256": hashes})
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_state(obj, path: Path) -> None:
    """`torch.save` through a Python file, so that a failed write raises its OSError (disk full: ENOSPC), or a
    RuntimeError raised while handling it (`write_error` finds it there); saving to a path, torch's own writer
    reports a full disk as a RuntimeError without the cause ("unexpected pos ...")."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete what a killed save left behind: `.tmp-step-*` folders and step folders without a valid manifest."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    gone = [
        p
        for p in root.iterdir()
        if p.is_dir() and (p.name.startswith(".tmp-") or (p.name.startswith("step-") and not is_complete(p)))
    ]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def latest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files match their hashes; each newer damaged one is reported by name
    (stderr). None where the run has no complete checkpoint; a UserError where every one is damaged."""

    found = list_checkpoints(run_dir)
    damaged = []
    for path in reversed(found):
        bad = damaged_file(path)
        if bad is None:
            for name, file in damaged:
                print(
                    f"unison: checkpoint {name} is damaged ({file} does not match its hash); resuming from {path.name}",
                    file=sys.stderr,
                )
            return path
        damaged.append((path.name, bad))
    if damaged:
        raise UserError(
            f"every checkpoint of {str(run_dir)!r} is damaged "
            f"({', '.join(f'{n}: {f}' for n, f in damaged)} "
            "do not match their hashes); start over with --overwrite, or restore the files"
        )
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and is_complete(p))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(path: Path) -> dict:
    return torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)


def rank_file(rank: int) -> str:
    return f"rank-{rank:03d}.pt"


def load_rank_state(path: Path, rank: int) -> dict:
    """Rank `rank`'s own state (its optimizer shard, RNG states, overflow counts) in a checkpoint of several ranks."""
    return torch.load(Path(path) / rank_file(rank), map_location="cpu", weights_only=False)


def checkpoint_world_size(path: Path) -> int:
    """The number of ranks that saved a checkpoint: 1 plus its `rank-*.pt` files."""
    return 1 + sum(1 for p in Path(path).glob("rank-*.pt"))


INDEX = "model.safetensors.index.json"


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: its shards (from the index; a missing one is a UserError) or
    model.safetensors."""

    path = Path(path)
    if (path / INDEX).is_file():
        try:
            names = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise UserError(f"{path / INDEX} is not a valid safetensors index; re-save the checkpoint") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(
                f"{str(path)!r} is a sharded checkpoint missing {missing[0]}{more} of the shards its "
                f"{INDEX} lists; copy the missing shards there"
            )
        return [path / n for n in names]
    return [path / "model.safetensors"]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's weights files (one file or its shards), under the names stored there."""

    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        state.update(load_file(str(file)))
    return state


def load_master(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's fp32 weights under the names of the model's parameters in memory.

    These can differ from the names stored in the file: transformers maps some on load (a mixture of experts'
    per-expert weights to one fused tensor per layer, GPT-NeoX's `embed_out` to `lm_head`), so the weights are read
    through the model's own loader (which refuses a weight missing, misshapen or not finite)."""

    model = load_model(path, dtype=torch.float32)
    return {name: p.detach() for name, p in model.named_parameters()}


# ---- resuming into the right model ------------------------------------------------------------------------------
ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


def check_compatible(path: Path, model) -> dict[str, torch.Tensor]:
    """Refuse (UserError) a checkpoint written for another architecture or vocabulary than `model`'s; return its
    master weights (`load_master`)."""

    how = (
        "resume with the model the run was started from (model.path), or start a new run with --overwrite or "
        "another run.out"
    )
    try:
        saved = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"checkpoint {str(path)!r} has no readable config.json; {how}") from None
    ours = model.config.to_dict()
    for key in ARCH_KEYS:
        if key in saved and key in ours and saved[key] != ours[key]:
            raise UserError(
                f"checkpoint {str(path)!r} is for another model ({key} {saved[key]!r} there, "
                f"{ours[key]!r} in "
                f"{getattr(model.config, '_name_or_path', '') or 'the configured model'}); "
                f"{how}"
            )
    try:
        master = load_master(path)
    except UserError as exc:
        raise UserError(f"checkpoint {str(path)!r} cannot be read ({exc}); {how}") from None
    for name, p in model.named_parameters():
        if name not in master:
            raise UserError(f"checkpoint {str(path)!r} is for another model (it has no {name}); {how}")
        if tuple(master[name].shape) != tuple(p.shape):
            raise UserError(
                f"checkpoint {str(path)!r} is for another model ({name} has shape "
                f"{tuple(master[name].shape)} there, {tuple(p.shape)} here); {how}"
            )
    return master


# ---- run logs that survive a kill ---------------------------------------------------------------------------------
def truncate_jsonl(path: Path, after_step: int) -> None:
    """Keep the rows of a JSONL run log with step <= `after_step`; drop later ones and lines torn by a kill (the
    last one said on stderr)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    lines = path.read_text(errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and line.strip():
                notice_torn(path, n)
            continue
        if isinstance(row, dict) and row.get("step", 0) <= after_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rollout_digest(rollouts) -> dict:
    """Short hashes of a step's sampled responses and their log-probs: equal digests, the same samples bit for bit."""

    def h(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]

    return {
        "responses": h(rollouts.response_ids),
        "lengths": h(rollouts.lengths),
        "logprobs": h(rollouts.logprobs),
        "num": len(rollouts),
    }


# ---- export -------------------------------------------------------------------------------------------------------
def resolve_checkpoint(source: str | Path) -> Path:
    """A run folder (its newest complete checkpoint), a complete checkpoint folder, or a GGUF model (a .gguf file, a
    folder holding one, a fetched model's name: its converted folder); anything else is refused."""

    path = Path(source).expanduser()
    if str(source) in gguf.FETCHABLE or (path.exists() and gguf.source_file(path) is not None):
        return resolve_model_dir(source if str(source) in gguf.FETCHABLE else path)
    if not path.is_dir():
        raise UserError(f"{str(path)!r} is not a folder; give a run folder (runs/NAME) or one of its checkpoints")
    if (path / "checkpoints").is_dir():
        latest = latest_intact_checkpoint(path)
        if latest is None:
            raise UserError(f"run folder {str(path)!r} has no complete checkpoint; train until one is saved")
        return latest
    if (path / MANIFEST).is_file():
        if not is_complete(path):
            raise UserError(
                f"checkpoint {str(path)!r} is incomplete (its files disagree with {MANIFEST}); export another one"
            )
        bad = damaged_file(path)
        if bad is not None:
            raise UserError(f"checkpoint {str(path)!r} is damaged ({bad} does not match its hash); export another one")
        return path
    raise UserError(
        f"{str(path)!r} is neither a run folder (with checkpoints/), a checkpoint (with {MANIFEST}) nor "
        "a .gguf file; give one of those"
    )


def export_model(
    source: str | Path, out: str | Path, dtype: str = "fp32", shard_size: str = "5GB", adapter: bool = False
) -> Path:
    """Write a checkpoint's weights cast to `dtype`, with its config (stating that dtype), generation config and
    tokenizer, as a plain Hugging Face model folder `out` (a LoRA run's checkpoint: its base with the adapter
    merged in; a GGUF model: its dequantized weights); with `adapter`, a LoRA checkpoint's adapter alone, in peft's
    format, with the tokenizer. Everything is checked before anything is written (but a GGUF model's conversion
    into the cache); the folder is written beside `out` and renamed into place."""
    target = parse_precision(dtype)
    size = parse_size(shard_size, "--shard-size")
    out = check_output_folder(Path(out).expanduser().absolute(), "--out")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{str(out)!r} already exists and is not empty; choose a new --out folder")
    ckpt = resolve_checkpoint(source)

    if adapter and not is_adapter(ckpt):
        raise UserError(
            f"--adapter writes a LoRA run's adapter, and {str(ckpt)!r} holds whole weights (a full "
            "fine-tuning run); export it without --adapter"
        )
    model = None if adapter else load_model(ckpt, dtype=torch.float32)
    if adapter:
        read_adapter_config(ckpt)
        weights = load_adapter_weights(ckpt)
    tokenizer = load_tokenizer(ckpt)
    converted = gguf.note(ckpt)
    if converted:
        print(f"unison: {converted}; written in {dtype}", file=sys.stderr, flush=True)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-export-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if adapter:
            tmp.mkdir()
            shutil.copyfile(ckpt / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
            save_file(
                {k: v.to(target).contiguous() for k, v in weights.items()},
                str(tmp / ADAPTER_WEIGHTS),
                metadata={"format": "pt"},
            )
        else:
            model.to(target).save_pretrained(tmp, safe_serialization=True, max_shard_size=size)
            set_config_dtype(tmp, target)
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
