"""Crash-safe checkpoints in Hugging Face format.

A checkpoint is a folder `checkpoints/step-000040/` holding the fp32 master weights as `model.safetensors` with
`config.json` and the tokenizer (loadable by any Hugging Face tool), and `trainer_state.pt` (optimizer, loss scaler,
RNG states, data position, step). It is written into a temporary folder, every file fsynced, then renamed into
place, and `manifest.json` (the list of files with their sizes) is written last: a folder without a manifest, or
whose files disagree with it, is incomplete and ignored by `--resume`. A kill at any moment leaves the previous
checkpoint intact. Leftovers of a killed save (a `.tmp-step-*` folder, a step folder without manifest) are removed
by the next save; `truncate_jsonl` drops the run log's rows after the step a run resumes from (and a line torn by
a kill). `check_compatible` refuses to resume a run folder whose checkpoint was written for another model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, master_state: dict, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep` complete ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    remove_leftovers(run_dir)
    tmp.mkdir()
    try:
        state_dict = {name: t.detach().float().cpu().contiguous() for name, t in master_state.items()}
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save (disk full) leaves the previous checkpoints as they were
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    files = {p.name: p.stat().st_size for p in final.iterdir() if p.is_file()}
    write_json_atomic(final / MANIFEST, {"step": step, "files": files})
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete what a killed save left behind: `.tmp-step-*` folders and step folders without a valid manifest."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    gone = [p for p in root.iterdir() if p.is_dir() and (p.name.startswith(".tmp-") or
                                                         (p.name.startswith("step-") and not is_complete(p)))]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def is_complete(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, OSError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


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


def load_master(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


# ---- resuming into the right model ------------------------------------------------------------------------------
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")  # fmt: skip


def check_compatible(path: Path, model) -> None:
    """Refuse (UserError) a checkpoint written for another architecture or vocabulary than `model`'s."""
    from unison.errors import UserError

    how = ("resume with the model the run was started from (model.path), or start a new run with --overwrite or "
           "another run.out")  # fmt: skip
    try:
        saved = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"checkpoint {str(path)!r} has no readable config.json; {how}") from None
    ours = model.config.to_dict()
    for key in ARCH_KEYS:
        if key in saved and key in ours and saved[key] != ours[key]:
            raise UserError(f"checkpoint {str(path)!r} is for another model ({key} {saved[key]!r} there, "
                            f"{ours[key]!r} in {getattr(model.config, '_name_or_path', '') or 'the configured model'}); {how}")  # fmt: skip
    from safetensors import safe_open

    try:
        with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"checkpoint {str(path)!r} has an unreadable model.safetensors; {how}") from None
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, shape in params.items():
        if name in shapes and shapes[name] != shape:
            raise UserError(f"checkpoint {str(path)!r} is for another model ({name} has shape {shapes[name]} there, "
                            f"{shape} here); {how}")  # fmt: skip
    missing = [n for n in params if n not in shapes]
    if missing:
        raise UserError(f"checkpoint {str(path)!r} is for another model (it has no {missing[0]}); {how}")


# ---- run logs that survive a kill ---------------------------------------------------------------------------------
def truncate_jsonl(path: Path, after_step: int) -> None:
    """Keep the rows of a JSONL run log with step <= `after_step`; drop later ones and lines torn by a kill."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
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
    import hashlib

    def h(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]

    return {"responses": h(rollouts.response_ids), "lengths": h(rollouts.lengths), "logprobs": h(rollouts.logprobs),
            "num": len(rollouts)}  # fmt: skip
