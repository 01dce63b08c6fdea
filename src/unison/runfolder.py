"""Run folders that nothing can lose by mistake: a marker that says unison made the folder, a lock held by the one
process that writes it, an `--overwrite` that deletes only a folder unison made and only after every check has
passed, and a `--resume` that keeps the saved config and refuses a changed preset, seed, data source or precision
unless the user allows it.

    check_run_dir      every check on the folder, writing nothing (run first, before models load)
    prepare_run_dir    the same checks, then the lock, the overwrite and the marker (run last, just before writing)
    RunLock            an exclusive `flock` on `<run>/.unison.lock`, naming its holder's pid and host
    resume_changes     the settings a resumed run would change against the saved config.yaml
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import yaml

from unison import __version__
from unison.errors import UserError

MARKER = "unison-run.json"  # written into every run folder unison makes
LOCK = ".unison.lock"
# what a resumed run may not change without --allow-changes: it would no longer continue the same run
RESUME_KEYS = ("algorithm.preset", "run.seed", "data.source", "precision.rollout", "precision.train")


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
    run_dir = Path(out)
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


def _alive(pid: int) -> bool:
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
        if left.get("pid") and not (left.get("host") == host and _alive(int(left["pid"]))):
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


def resume_changes(run_dir: Path, cfg_dict: dict) -> dict[str, tuple]:
    """{key: (saved, now)} for the RESUME_KEYS whose value differs from the run's saved config.yaml."""

    try:
        saved = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}

    def get(d, key):
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    return {
        k: (get(saved, k), get(cfg_dict, k))
        for k in RESUME_KEYS
        if get(saved, k) is not None and get(saved, k) != get(cfg_dict, k)
    }


WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}


def check_output_file(path: str | Path, name: str) -> Path:
    """An output file's path, refused (one line) where it is a folder or its folder cannot be written."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{name} {str(p)!r} is a folder; give a file path there, e.g. {str(p / 'out')!r}")
    parent = nearest_existing(p)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{name} {str(p)!r}: cannot write into {str(parent)!r}; choose a writable path")
    return p


def check_output_folder(path: str | Path, name: str) -> Path:
    """An output folder's path, refused where it is a file or cannot be created."""
    p = Path(path).expanduser()
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
