"""Sampling while learning (`rollout.max_staleness` k > 0): the engine samples in a thread of its own, up to k batches
ahead of the learner.

The schedule is fixed, so that a run gives the same numbers however fast either side is: the batch of step j is
sampled with the weights of version max(0, j - k) (version v: the weights after v updates). At the start of step s
the learner, at version s, hands the engine the job of step s + k (its prompts and its weights, cast to the rollout
dtype), then waits for the batch of step s; the engine works through its jobs in order, in its own thread, while the
learner updates. Each job

    loads its weights into the engine and checks their checksum (where the engine holds another version): the
        engine never samples with weights it has not verified, and nothing it keeps between calls (its decode
        weights, packed per generate; no KV or prefix cache outlives a generate) survives the load
    samples the step's G responses per prompt and scores them, the engine's random stream used in step order
    runs the learner at those same weights (a frozen copy taken with the job) on `rollout.split_share` of the
    groups, so that the step can split its off-policy gap into engine mismatch and policy change
        (`mismatch.staleness_split`)

Evaluations go through the same queue (`on_engine`), at the learner's weights of the moment. A checkpoint waits for
the jobs in flight and saves their batches (`state`); a resumed run takes them back (`load`) and goes on as the run
would have. An error in the engine's thread ends the run with one line (`EngineThreadError`)."""

from __future__ import annotations

import contextlib
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from unison import threads
from unison.batch import Batch
from unison.errors import UserError
from unison.learner import frozen_copy, load_verified


class EngineThreadError(RuntimeError):
    """The engine's thread failed: the run stops with this one line (its newest checkpoint is whole)."""


@dataclass
class Job:
    """What the engine samples for one step: its prompts, with the weights of `version` (and the learner's frozen
    copy at them, for the split)."""

    index: int
    version: int
    prompts: list
    weights: list | None
    snapshot: object | None


def engine_threads(setting: str) -> int:
    """The engine thread's CPU threads: `rollout.engine_threads`, or half the cores (at least one)."""
    return int(setting) if setting != "auto" else max(1, threads.cores() // 2)


class AheadSampler:
    """The engine sampling up to k batches ahead of `step` (an `RLStep`) in a thread of its own (`next`)."""

    def __init__(self, step, k: int):
        self.step, self.k = step, k
        r = step.cfg.rollout
        self.engine_threads = engine_threads(r.engine_threads)
        self.split_share = r.split_share
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="unison-engine")
        self.jobs: deque[tuple[int, Future]] = deque()  # (step index, its batch), in step order
        self.next_index = 0  # the step whose job is handed over next
        self.engine_version: int | None = None  # the weights the engine holds (None: not known)
        self.evaluations = 0
        device = step.engine.device
        # on a GPU the engine's kernels go into a stream of their own, beside the learner's
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.busy = 0  # jobs the engine's thread is on (0 or 1)
        cores = threads.cores()
        if str(step.cfg.run.threads) == "auto":
            # the learner takes the cores the engine's thread leaves while it samples, and every core while it waits
            # (a thread count that changes with timing: a run.threads number keeps runs repeatable to the bit)
            threads.configure(max(1, cores - self.engine_threads))
            threads.lend(lambda: cores if not self.busy else max(1, cores - self.engine_threads))

    # ---- the learner's side ------------------------------------------------------------------------------------
    def next(self, index: int, stream):
        """The batch of step `index` (waiting for it), after handing over the jobs up to step index + k with the
        learner's weights now (version `index`). -> (Batch, the step's prompts)"""
        if self.next_index < index:  # a run resumed without batches in flight: its next steps start here
            self.next_index = index
        weights = snapshot = None
        while self.next_index <= index + self.k:
            if weights is None:
                weights, snapshot = self.export(), self.snapshot()
            prompts = stream.take(self.step.cfg.rollout.prompts_per_step)
            self.submit(Job(self.next_index, index, prompts, weights, snapshot))
        j, future = self.jobs.popleft()
        assert j == index, f"the engine's queue is at step {j}, the learner at {index}"
        return self.result(future, f"sampling the batch of step {index + 1}")

    def export(self) -> list:
        """The learner's weights now, cast for the engine (new tensors: the learner goes on updating its own)."""
        weights = self.step.learner.export_weights(self.step.engine.dtype)
        if self.stream is not None:  # the copies made before the engine's stream reads them
            torch.cuda.current_stream().synchronize()
        return weights

    def snapshot(self):
        """The learner's frozen copy now, for the split (None where none is measured; MoE models route by the
        engine's choices, which a copy does not replay)."""
        learner, m = self.step.learner, self.step.cfg.model
        if self.split_share == 0 or learner.moe:
            return None
        return frozen_copy(learner.model, learner.policy, m.matmul, m.gemm)

    def submit(self, job: Job) -> None:
        self.jobs.append((job.index, self.pool.submit(self.sample, job)))
        self.next_index = job.index + 1

    def result(self, future: Future, what: str):
        """The job's result; its error as one line (`EngineThreadError`), a bad input's as it is."""
        try:
            return future.result()
        except (UserError, EngineThreadError):
            raise
        except Exception as exc:
            raise EngineThreadError(f"the rollout engine's thread failed {what}: {type(exc).__name__}: {exc}") from exc

    def on_engine(self, fn):
        """fn(engine) in the engine's thread after the jobs before it, with the learner's weights of now."""
        weights = self.export()
        self.evaluations += 1
        version = -self.evaluations  # a version of its own: the next job loads its weights again

        def run():
            with self.engine_stream():
                self.load(version, weights)
                return fn(self.step.engine)

        return self.result(self.pool.submit(run), "evaluating the held-out prompts")

    # ---- the engine's thread ---------------------------------------------------------------------------------
    def load(self, version: int, weights: list) -> dict:
        """The weights of `version` into the engine, verified (nothing when it holds them already)."""
        torch.set_num_threads(self.engine_threads)
        if self.engine_version == version:
            return {"sync/checksum_ok": 1.0}
        self.engine_version = None  # until verified
        metrics = load_verified(self.step.engine, weights)
        self.engine_version = version
        return metrics

    def sample(self, job: Job):
        """One job, in the engine's thread (and stream): the weights, the step's batch, and the learner at those
        weights on the split's rows."""
        self.busy += 1
        try:
            with self.engine_stream():
                return self._sample(job)
        finally:
            self.busy -= 1

    def engine_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _sample(self, job: Job):
        sync = self.load(job.version, job.weights)
        job.weights = None  # the engine holds them now
        batch = self.step.generate(job.prompts)
        batch.version, batch.sync = job.version, {**batch.sync, **sync}
        if job.snapshot is not None:
            batch.split_rows = split_rows(len(batch.rollouts), self.step.cfg.rollout.group_size, self.split_share)
            batch.logp_sampled = self.step.learner.recompute(
                batch.rollouts.select(batch.split_rows),
                self.step.cfg.optim.micro_batch_size,
                *self.step.sampling,
                policy=job.snapshot,
            )
            job.snapshot = None
        return batch, job.prompts

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state(self, examples: list) -> list[dict]:
        """The batches in flight (waiting for the engine to finish them), for a checkpoint; `examples` are the
        run's training examples (each batch's are saved as positions in it). A batch the engine failed on, and those
        after it, are left out: the checkpoint is saved, the step that needs that batch says what failed, and a
        resumed run samples them again (with the weights it then has)."""
        where = {id(e): i for i, e in enumerate(examples)}
        out = []
        for j, future in self.jobs:
            if future.exception() is not None:  # the batches before it are saved; the step that needs it fails
                break
            batch, prompts = future.result()
            out.append(
                {
                    "index": j,
                    "prompts": [where[id(e)] for e in prompts],
                    "batch": batch.state(where),
                }
            )
        return out

    def restore(self, saved: list[dict], examples: list) -> None:
        """Take back the batches a checkpoint saved in flight (`state`)."""
        for item in saved:
            future: Future = Future()
            batch = Batch.from_state(item["batch"], examples)
            future.set_result((batch, [examples[i] for i in item["prompts"]]))
            self.jobs.append((item["index"], future))
            self.next_index = item["index"] + 1

    def close(self) -> None:
        threads.lend(None)
        self.pool.shutdown(wait=True, cancel_futures=True)


def split_rows(rows: int, group_size: int, share: float) -> torch.Tensor:
    """The rows of the first ceil(share x groups) groups (at least one)."""
    groups = rows // group_size
    n = min(groups, max(1, math.ceil(share * groups)))
    return torch.arange(n * group_size)
