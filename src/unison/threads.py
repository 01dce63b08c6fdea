"""PyTorch's CPU thread count, fitted to what the machine's other processes leave free.

PyTorch starts one OpenMP thread per core, and its threads spin while they wait for work. Where another process
is busy on one of the cores, every parallel region waits for the thread that shares its core, so two threads on a
2-core machine with one busy neighbour are several times slower than one. OpenMP's passive wait policy fixes the
busy case but slows a quiet machine (its threads sleep between the many small regions of a decode), so unison
changes the thread count instead (docs/reliability.md, "Speed on a shared machine"): `adapt()` reads how much CPU
the other processes used since its last call (`/proc/stat` less this process's own time) and sets
`torch.set_num_threads` to the cores they leave free, at least one. The trainer calls it once a step and the
sampling commands once a batch; a library user can call it too. A thread count the user chose (`OMP_NUM_THREADS`,
or `run.threads` a number) is kept.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch


def _busy_seconds() -> float | None:
    """CPU seconds all processes have used (every core summed), from the first line of /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ThreadPolicy:
    """Sets PyTorch's thread count from the cores the other processes leave free (`setting` "auto"), or to a fixed
    number."""

    def __init__(self, setting: str | int = "auto"):
        self.cores = cores()
        user = os.environ.get("OMP_NUM_THREADS")
        self.fixed = int(setting) if str(setting) != "auto" else (int(user) if user and user.isdigit() else None)
        self.last = (time.monotonic(), _busy_seconds(), _own_seconds())
        if self.fixed is not None:
            torch.set_num_threads(max(1, self.fixed))
        elif self.cores > 1 and hasattr(os, "getloadavg"):
            # before any step has run: the last minute's load average, which is mostly the other processes'
            self._set(self.cores - os.getloadavg()[0])

    def _set(self, free: float) -> int:
        threads = max(1, min(self.cores, int(free + 0.5)))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def adapt(self) -> int:
        """Fit the thread count to the other processes' CPU use since the last call; returns it."""
        if self.fixed is not None or self.cores == 1:
            return torch.get_num_threads()
        now = (time.monotonic(), _busy_seconds(), _own_seconds())
        (t0, busy0, own0), (t1, busy1, own1) = self.last, now
        if busy0 is None or busy1 is None or t1 - t0 < 0.05:
            return torch.get_num_threads()
        self.last = now
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)  # cores the other processes used
        return self._set(self.cores - others)


_policy: ThreadPolicy | None = None
_lender: tuple[int, Callable[[], int]] | None = None  # (the thread it applies to, its thread count now)


def configure(setting: str | int = "auto") -> ThreadPolicy:
    """Start (or restart) the process-wide policy with `setting`: "auto" or a thread count."""
    global _policy
    _policy = ThreadPolicy(setting)
    return _policy


def adapt() -> int:
    """The process-wide policy's `adapt` (started as "auto" on first use)."""
    return (_policy or configure()).adapt()


def lend(count: Callable[[], int] | None) -> None:
    """From now on (None: no longer), `rebalance()` in the calling thread sets its thread count to `count()`: the
    learner's, while the engine samples ahead in a thread of its own (`unison.ahead`), is the cores the engine's
    thread leaves while it samples and every core while it waits."""
    global _lender
    _lender = (threading.get_ident(), count) if count is not None else None


def rebalance() -> None:
    """Where a count was lent to this thread (`lend`), set it; elsewhere nothing. Called between the learner's
    micro-batches."""
    lender = _lender
    if lender is None or lender[0] != threading.get_ident():
        return
    n = lender[1]()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
