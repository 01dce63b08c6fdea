"""Run folders that nothing can lose by mistake: a marker that says unison made the folder, a lock held by the one
process that writes it, an `--overwrite` that deletes only a folder unison made and only after every check has
passed, a `--resume` that keeps the saved config and refuses a changed setting that changes what the run computes
(`RESUME_KEYS`) unless the user allows it, checkpoint manifests, and run logs read back whole.

    check_run_dir      every check on the folder, writing nothing (run first, before models load)
    prepare_run_dir    the same checks, then the lock, the overwrite and the marker (run last, just before writing)
    RunLock            an exclusive `flock` on `<run>/.unison.lock`, naming its holder's pid and host
    resume_changes     the settings a resumed run would change against the saved config.yaml
    is_complete, damaged_file   a checkpoint's files against its manifest: sizes, then SHA-256 hashes
    read_jsonl         a run log's rows; a last line cut short by a kill or a full disk is left out, with a notice
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import yaml

from unison import __version__
from unison.errors import WRITE_ERRNOS, UserError  # noqa: F401 - WRITE_ERRNOS: where it was

MARKER = "unison-run.json"  # written into every run folder unison makes
LOCK = ".unison.lock"
# What a resumed run may not change without --allow-changes: each changes what the run computes (the model and its
# tokenizer, the data, the sampling, the objective, the optimizer, the numerics, the adapters, the held-out
# evaluation), so that the run would no longer continue the one that was saved. docs/reliability.md gives the
# reason for each key, here and in RESUME_FREE.
RESUME_KEYS = (
    "model.path",
    "model.matmul",
    "model.gemm",
    "precision.rollout",
    "precision.train",
    "precision.loss_scaling",
    "precision.growth_interval",
    "precision.lm_head",
    "precision.bitwise",
    "data.source",
    "data.prompt_key",
    "data.answer_key",
    "data.reward",
    "data.template",
    "data.test_source",
    "data.subset",
    "data.system_prompt",
    "data.max_prompts",
    "rollout.engine",
    "rollout.prompts_per_step",
    "rollout.group_size",
    "rollout.max_new_tokens",
    "rollout.temperature",
    "rollout.top_p",
    "rollout.top_k",
    "rollout.stop",
    "rollout.context_limit",
    "rollout.max_staleness",
    "algorithm.preset",
    "algorithm.advantage",
    "algorithm.objective",
    "algorithm.correction",
    "algorithm.aggregation",
    "algorithm.clip_low",
    "algorithm.clip_high",
    "algorithm.cap",
    "algorithm.icepop_alpha",
    "algorithm.icepop_beta",
    "algorithm.kl_coef",
    "algorithm.staleness_correction",
    "algorithm.kl_estimator",
    "algorithm.kl_in",
    "optim.lr",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "optim.weight_decay",
    "optim.beta1",
    "optim.beta2",
    "optim.max_grad_norm",
    "optim.train_batch_size",
    "optim.epochs",
    "run.seed",
    "run.eval_prompts",
    "run.eval_samples",
    "moe.routing_replay",
    "lora.enabled",
    "lora.rank",
    "lora.alpha",
    "lora.target_modules",
    "lora.dropout",
)
# What a resumed run may change freely: where and how fast it runs (device, kernels, memory, threads, ranks), how
# long and how often it saves, evaluates and reports, and the thresholds that stop it (raised to go on after a stop).
RESUME_FREE = (
    "model.device",
    "model.attn_implementation",
    "model.gradient_checkpointing",
    "precision.init_scale",
    "precision.min_scale",
    "precision.on_activation_overflow",
    "rollout.tensor_parallel_size",
    "rollout.engine_threads",
    "rollout.split_share",
    "optim.micro_batch_size",
    "optim.micro_batch_tokens",
    "optim.share_prompts",
    "run.out",
    "run.progress",
    "run.threads",
    "run.steps",
    "run.eval_every",
    "run.save_every",
    "run.keep_checkpoints",
    "run.shard_size",
    "run.loggers",
    "run.log_samples",
    "run.self_test",
    "metrics.exact_divergence",
    "metrics.routing",
    "guard.seq_kl_warn",
    "guard.seq_kl_stop",
    "guard.k3_warn",
    "guard.k3_stop",
    "guard.masked_warn",
    "guard.masked_stop",
    "guard.patience",
)


def is_run_folder(path: Path) -> bool:
    """Whether unison made this folder: its marker, or the layout of a run from before the marker existed
    (config.yaml beside metrics.jsonl or checkpoints/)."""
    if (path / MARKER).is_file():
        return True
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir())


def nearest_existing(path: Path) -> Path:
    """The folder a path would be made in: the path itself where it is a folder, else its nearest existing
    ancestor."""
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_run_dir(out: str | Path, resume: bool, overwrite: bool) -> Path:
    """Every check on the run folder, with nothing written: a file in the way, an existing folder without --resume
    or --overwrite, --overwrite of a folder unison did not make, a folder that cannot be written, a folder another
    process is running in. (--resume of a folder without a complete checkpoint starts the run over, as a fresh run
    would.)"""
    run_dir = check_name_length(out, "run.out")
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {str(run_dir)!r} is a file; choose another run.out")
    exists = run_dir.is_dir() and any(p.name != LOCK for p in run_dir.iterdir())
    if exists and not (resume or overwrite):
        raise UserError(
            f"run folder {str(run_dir)!r} already exists; pass --resume to continue it, --overwrite to start over "
            "(deletes it), or choose another run.out"
        )
    if exists and overwrite and not is_run_folder(run_dir):
        raise UserError(
            f"--overwrite refused: {str(run_dir)!r} holds files but is not a unison run folder (no "
            f"{MARKER}); choose another run.out, or empty it yourself"
        )
    parent = nearest_existing(run_dir)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {str(parent)!r} (Permission denied); choose a writable run.out")
    probe = parent / f".unison-write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write into {str(parent)!r} ({exc.strerror}); choose a writable run.out") from None
    holder = RunLock(run_dir).holder()
    if holder is not None:
        raise UserError(holder)
    return run_dir


def prepare_run_dir(out: str | Path, resume: bool, overwrite: bool) -> tuple[Path, RunLock]:
    """`check_run_dir`, then take the folder's lock, clear it for --overwrite and write the marker. The caller has
    built everything that could still fail on the inputs (model, learner, engine) before calling this."""
    run_dir = check_run_dir(out, resume, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire()
    if overwrite:
        for p in run_dir.iterdir():
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    marker = run_dir / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"unison": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    return run_dir, lock


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder, held (through an open file) for as long as the process runs it; the
    operating system drops it when the process ends, however it ends. The file names the holder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.file = None

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def holder(self) -> str | None:
        """One line naming the process that holds the lock now, or None where nobody does."""
        if not self.path.is_file():
            return None
        try:
            with open(self.path, "r+") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    info = self._read()
                    return (
                        f"run folder {str(self.path.parent)!r} is in use by pid {info.get('pid', '?')} on "
                        f"{info.get('host', '?')} (since {info.get('since', '?')}); wait for it to finish, stop "
                        "it, or choose another run.out"
                    )
                fcntl.flock(f, fcntl.LOCK_UN)
        except OSError:
            return None
        return None

    def acquire(self) -> None:
        """Take the lock (UserError where another process holds it); say so where a dead process left it."""
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserError(
                self.holder() or f"run folder {str(self.path.parent)!r} is in use by another process"
            ) from None
        left = self._read()
        host = socket.gethostname()
        if left.get("pid") and not (left.get("host") == host and process_alive(int(left["pid"]))):
            print(
                f"unison: took over the lock of {self.path.parent} left by pid {left['pid']} on {left.get('host')} "
                "(no longer running)",
                file=sys.stderr,
            )
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is None:
            return
        try:
            self.file.seek(0)
            self.file.truncate()
            fcntl.flock(self.file, fcntl.LOCK_UN)
        except OSError:
            pass
        self.file.close()
        self.file = None


def load_saved_config(run_dir: str | Path) -> dict:
    """A run folder's saved config.yaml as a dict ({} where it has none, or none readable)."""
    try:
        saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return saved if isinstance(saved, dict) else {}


def resume_changes(run_dir: Path, cfg_dict: dict) -> dict[str, tuple]:
    """{key: (saved, now)} for the RESUME_KEYS whose value differs from the run's saved config.yaml (a key the saved
    config lacks, from an older unison, is not compared)."""
    saved = load_saved_config(run_dir)

    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    return {
        k: (get(saved, k), get(cfg_dict, k))
        for k in RESUME_KEYS
        if get(saved, k) is not None and get(saved, k) != get(cfg_dict, k)
    }


def check_name_length(path: str | Path, name: str) -> Path:
    """An output path whose every part the file system can name: a part longer than its NAME_MAX (255 bytes on
    most) or a path longer than PATH_MAX is refused (one line)."""
    p = Path(path).expanduser()
    longest = max((len(os.fsencode(part)) for part in p.parts), default=0)
    limit, whole = 255, 4096
    try:
        limit = os.pathconf(next(a for a in [p.absolute(), *p.absolute().parents] if _exists(a)), "PC_NAME_MAX")
    except (OSError, ValueError, StopIteration):
        pass
    if longest > limit or len(os.fsencode(str(p.absolute()))) >= whole:
        what = f"a part of {longest} bytes" if longest > limit else f"{len(os.fsencode(str(p.absolute())))} bytes"
        raise UserError(
            f"{name} {str(p)[:60]!r}... is longer than the file system allows ({what}; at most {limit} per part, "
            f"{whole - 1} in all); choose a shorter name"
        )
    return p


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def check_output_file(path: str | Path, name: str) -> Path:
    """An output file's path, refused (one line) where it is a folder or its folder cannot be written."""
    p = check_name_length(path, name)
    if p.is_dir():
        raise UserError(f"{name} {str(p)!r} is a folder; give a file path there, e.g. {str(p / 'out')!r}")
    parent = nearest_existing(p)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{name} {str(p)!r}: cannot write into {str(parent)!r}; choose a writable path")
    return p


def check_output_folder(path: str | Path, name: str) -> Path:
    """An output folder's path, refused where it is a file or cannot be created."""
    p = check_name_length(path, name)
    if p.exists() and not p.is_dir():
        raise UserError(f"{name} {str(p)!r} is a file; give a folder")
    parent = nearest_existing(p)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{name} {str(p)!r}: cannot write into {str(parent)!r}; choose a writable folder")
    return p


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under a folder, and the folder, to disk (before it is renamed into place)."""
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


# ---- checkpoint manifests: what a complete, intact checkpoint holds -------------------------------------------------
MANIFEST = "manifest.json"


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder has a readable manifest whose files are all there with their sizes."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, OSError, TypeError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes."""

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_INTACT: set[tuple] = set()  # checkpoints whose files matched their hashes, by the files' sizes and times


def damaged_file(path: Path) -> str | None:
    """The first file of a complete checkpoint whose bytes no longer match the hash its manifest recorded (None:
    all match, or a manifest from before hashes were recorded). A checkpoint found intact is not hashed again in
    this process while its files keep their sizes and modification times."""
    path = Path(path)
    hashes = json.loads((path / MANIFEST).read_text()).get("sha256") or {}
    seen = (str(path.resolve()), *((n, (path / n).stat().st_mtime_ns, (path / n).stat().st_size) for n in hashes))
    if seen in _INTACT:
        return None
    for name, digest in sorted(hashes.items()):
        if file_hash(path / name) != digest:
            return name
    _INTACT.add(seen)
    return None


# ---- run logs (metrics.jsonl, samples.jsonl): appended line by line, read back whole -------------------------------
def read_jsonl(path: Path) -> tuple[list[dict], int | None]:
    """The rows of a JSONL run log, and the number of a line that is not a JSON object (None: every line is one).
    A last line cut short (a write a kill or a full disk interrupted) is left out, with a notice on stderr; the
    caller decides about a bad line before the last."""
    rows, lines = [], Path(path).read_text(errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif n == len(lines):
            notice_torn(path, n)
        else:
            return rows, n
    return rows, None


def notice_torn(path: Path, line: int) -> None:
    print(
        f"unison: {path}: line {line}, the last, is cut short (a write interrupted by a kill or a full disk); "
        "read without it",
        file=sys.stderr,
    )
