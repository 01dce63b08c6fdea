"""Several ranks under torchrun: the process group, the few collectives the trainer needs, and FSDP2 sharding.

Nothing here is a distributed layer of its own: the process group is `torch.distributed`'s (gloo on a CPU, NCCL on
CUDA), the learner is sharded with FSDP2's `fully_shard`, and `unison train --nproc N` starts the ranks with
PyTorch's elastic launcher (what `torchrun` runs). One process without torchrun is the world of one rank, `SINGLE`,
where every collective is the identity.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from unison.errors import UserError
from unison.threads import cores

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: `size` ranks, this one `rank` (0 writes logs, progress and files)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `t` (a new tensor on `t`'s device; `t` itself with one rank)."""
        if not self.distributed:
            return t
        out = t.to(self.comm_device, copy=True)  # NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out.to(t.device)

    def all_reduce_max(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.comm_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj` (any picklable value), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_others(self, obj) -> list:
        """The other ranks' `obj`, in rank order (none with one rank)."""
        return [o for i, o in enumerate(self.gather(obj)) if i != self.rank]

    def gather_to_main(self, obj) -> list | None:
        """Every rank's `obj` in rank order on rank 0 (None on the others)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @property
    def comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


SINGLE = World()


def rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """Whether this process is one rank of several started by torchrun (or `unison train --nproc`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when the process that started it ends
LAUNCHER_PID = "UNISON_LAUNCHER_PID"  # set by `launch` for its ranks, and by `unison demo` for its arms
RANK_ENDINGS = "UNISON_RANK_ENDINGS"  # set by `launch`: the folder where each rank leaves how it ended


def report_ending(code: int, text: str) -> bool:
    """How this process ended (its exit code and the one line, or traceback, saying why), where the user will see
    it: a rank started by `launch` leaves it in the launcher's folder, with the time, and prints nothing (the launcher
    prints the first rank's: the one that caused the others' ends); a rank under torchrun also leaves it in torch's
    error file (torchrun names the first failure with it), and only rank 0 prints it; one process prints it.
    -> whether this process prints it"""
    if not launched():
        return True
    folder = os.environ.get(RANK_ENDINGS)
    if folder:
        record = {"rank": rank(), "code": code, "text": text, "time": time.time()}
        _write_json(Path(folder) / f"rank-{rank():05d}.json", record)
        return False
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and code:
        _write_json(Path(error_file), {"message": text, "timestamp": int(time.time())})
    return rank() == 0


def _write_json(path: Path, data: dict) -> None:
    try:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass  # the rank's exit code still reaches the launcher


def first_ending(folder: Path) -> dict | None:
    """The rank ending recorded first in a launcher's folder (None: no rank recorded one, e.g. all were killed)."""
    found = []
    for path in Path(folder).glob("rank-*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    failed = [r for r in found if r.get("code")]
    return min(failed, key=lambda r: (r["time"], r["rank"])) if failed else None


def end_with_launcher() -> None:
    """In a rank: be killed (SIGKILL) as soon as the launcher that started it ends, however it ends, so that a
    killed `unison train --nproc N` or torchrun leaves no rank training on its own (the launcher starts each rank in
    a process group of its own, out of reach of a signal to the launcher's group). Linux only; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = int(os.environ.get(LAUNCHER_PID, "0")) or os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != launcher:  # it ended before the request took effect
        os._exit(128 + signal.SIGKILL)


def backend_for(device: torch.device, requested: str = "auto") -> str:
    """gloo on a CPU, NCCL on CUDA; NCCL asked for on a CPU is refused."""
    if requested not in BACKENDS:
        raise UserError(f"unknown distributed backend {requested!r}; choose one of: {', '.join(BACKENDS)}")
    if requested == "nccl" and device.type != "cuda":
        raise UserError("the NCCL backend needs CUDA GPUs and this run is on the CPU; use --backend gloo (or auto)")
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device, backend: str = "auto") -> tuple[World, torch.device]:
    """Join the process group torchrun set up (its RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR); the world of
    one rank without it. On CUDA each rank takes the GPU of its local rank. -> (world, this rank's device)"""
    if not launched():
        return SINGLE, device
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    name = backend_for(device, backend)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(name, device_id=device if device.type == "cuda" else None)
    return World(rank=rank, size=size, local_rank=local, backend=name), device


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(model: torch.nn.Module, train_dtype: torch.dtype) -> torch.nn.Module:
    """FSDP2 over the ranks: each decoder layer is a unit, then the rest (embeddings, final norm, LM head). The
    parameters stay fp32 (sharded: they are the master weights); forward and backward run in `train_dtype`, and
    gradients are reduced in fp32 and summed over the ranks (the loss is normalised by the global counts)."""

    mp = MixedPrecisionPolicy(param_dtype=train_dtype, reduce_dtype=torch.float32)
    layers = getattr(getattr(model, "model", None), "layers", None)
    units = list(layers) if layers is not None else []
    for layer in units:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp, reshard_after_forward=True)  # no stale gathered copy after a forward
    for module in [*units, model]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied one)
    return model


def check_world(size: int, prompts_per_step: int, train_groups: int, devices: int | None = None) -> None:
    """The settings a world of `size` ranks needs: whole groups split evenly over the ranks in a rollout batch and
    in each update, and (on GPUs) a device for each rank."""
    if size < 1:
        raise UserError(f"--nproc must be at least 1 (got {size})")
    if devices is not None and size > devices:
        raise UserError(
            f"--nproc {size} asks for more ranks than the {devices} devices (GPUs, or CPU cores) this "
            f"machine has; use --nproc {devices} or fewer"
        )
    if prompts_per_step % size:
        raise UserError(
            f"{size} ranks cannot share rollout.prompts_per_step={prompts_per_step} prompts evenly (each "
            "rank samples whole groups); choose a number of ranks that divides it"
        )
    if train_groups % size:
        raise UserError(
            f"{size} ranks cannot share the {train_groups} groups of each update "
            "(optim.train_batch_size / rollout.group_size) evenly; choose a number of ranks that divides "
            "it"
        )


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m unison <argv>` as `nproc` ranks on this machine with PyTorch's elastic launcher (what
    `torchrun --standalone --nproc-per-node N` does); returns 0 when every rank succeeded. Where a rank fails, the
    ranks print nothing of their own: each leaves how it ended in a folder of the launcher's (`report_ending`), and
    the launcher prints the line of the rank that failed first, the cause (the others' ends follow from it: a
    collective that lost its peer, the launcher's SIGTERM), and returns its exit code. Each rank gets an equal share
    of the cores unless OMP_NUM_THREADS is set."""

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores() // nproc)))
    os.environ[LAUNCHER_PID] = str(os.getpid())
    for name in list(logging.root.manager.loggerDict):  # torch's launcher loggers, each with its own level
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)  # each rank's end is said once, in unison's words
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    with tempfile.TemporaryDirectory(prefix="unison-ranks-") as folder:
        os.environ[RANK_ENDINGS] = folder
        try:
            elastic_launch(config, entrypoint=sys.executable)("-m", "unison", *argv)
        except ChildFailedError as exc:
            rank_, failure = exc.get_first_failure()
            code = failure.exitcode
            how = f"killed by {_signal_name(-code)}" if code < 0 else f"ended with exit code {code}"
            return _said(folder, 128 - code if code < 0 else code or 1, f"rank {rank_} {how}")
        except SignalException as exc:  # SIGTERM or SIGINT to the launcher: the ranks were stopped with it
            return _said(folder, 128 + int(exc.sigval), f"the launcher got {_signal_name(int(exc.sigval))}")
        finally:
            os.environ.pop(RANK_ENDINGS, None)
    return 0


def _said(folder: str, code: int, what: str) -> int:
    """Print the first rank's ending on stderr, or, where no rank recorded one, `what` the launcher saw; -> its exit
    code."""
    first = first_ending(Path(folder))
    if first is not None:
        print(first["text"], file=sys.stderr, flush=True)
        return int(first["code"])
    print(f"unison train: stopped: {what}", file=sys.stderr, flush=True)
    return code


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def devices_for(device: torch.device) -> int | None:
    """How many ranks a device type can hold on this machine: the visible GPUs on CUDA, the cores on a CPU."""
    if device.type == "cuda":
        return torch.cuda.device_count()

    return cores()
