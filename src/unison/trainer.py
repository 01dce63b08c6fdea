"""`unison train`: the run around the RL step (`unison.step`).

    train       every input built and checked (run folder, config, model, checkpoint to resume, learner, engine)
                before anything is written
    Run         the run from its state (fresh, or the checkpoint it resumes) to its last step: the engine self-test,
                then per step the RL step, the mismatch guard, metrics and samples, evaluation and checkpoints
    faults      SIGTERM, SIGINT and a failed write end with `RunFault`: one line naming the newest complete checkpoint
                and the command that resumes

Started by torchrun (or `unison train --nproc N`), each process is one rank (`unison.distributed`): the learner is
sharded with FSDP2, each rank samples its share of the groups, rank 0 alone writes the run folder and evaluates.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from unison import checkpoint as ckpt
from unison import distributed, threads
from unison.ahead import EngineThreadError
from unison.config import TrainConfig, parse_size, to_dict
from unison.conformance import self_test
from unison.distributed import World
from unison.errors import SIGINT_CODE, SIGTERM_CODE, WRITE_FAILED, RunFault, UserError, describe_write, write_error
from unison.evaluation import evaluate
from unison.exact import BitwiseMismatchError, first_divergence
from unison.guard import Guard, MismatchGuardStop, advice_for
from unison.learner import Learner, frozen_copy
from unison.lora import adapter_shape, is_adapter, read_adapter, read_adapter_config
from unison.lora import describe as describe_lora
from unison.measurements import measurements_for
from unison.models import base_model_dir, resolve_model_dir
from unison.overflow import OverflowGuard
from unison.precision import PrecisionPolicy, precision_name
from unison.report import MetricsLog, check_trackers, console_line, resolve_loggers
from unison.rollout import check_capability
from unison.rollout.base import SamplingParams
from unison.runfolder import check_run_dir, prepare_run_dir, resume_changes
from unison.setup import Setup, build
from unison.step import RLStep


@dataclass
class RunInputs:
    """What `unison train` adds to the shared set-up: the precision policy, its prompts and its sampling."""

    setup: Setup
    policy: PrecisionPolicy
    train_examples: list
    test_examples: list
    sampling: SamplingParams


def build_run(cfg: TrainConfig) -> RunInputs:
    """The set-up of a training run, every input checked (nothing is written)."""
    policy = PrecisionPolicy.from_names(cfg.precision.rollout, cfg.precision.train, cfg.precision.lm_head)
    s = build(cfg.model, cfg.data, cfg.rollout, dtypes=(policy.rollout, policy.train), seed=cfg.run.seed)
    train_examples = s.examples("train", cfg.data.max_prompts or None)
    # run.eval_prompts=0: no held-out evaluation (the task's examples with n=0 would be all of them)
    test_examples = s.task.examples("test", n=cfg.run.eval_prompts, seed=cfg.run.seed) if cfg.run.eval_prompts else []
    s.encode(train_examples + test_examples)
    check_adapter_model(s, cfg.lora.enabled)
    return RunInputs(s, policy, train_examples, test_examples, s.sampling())


def check_adapter_model(s: Setup, lora: bool) -> None:
    """model.path holding a LoRA adapter (a LoRA run's checkpoint) trains on as LoRA (lora.enabled, of its shape),
    and is refused without it: the merged model is trained whole only once it is exported as one."""
    if s.adapter is None or lora:
        return
    shape = adapter_shape(read_adapter_config(s.adapter))
    raise UserError(
        f"model.path {str(s.adapter)!r} holds a LoRA adapter, and lora.enabled is false; to go on training the "
        f"adapter set lora.enabled=true lora.rank={shape['rank']} lora.alpha={shape['alpha']:g} "
        f"lora.target_modules={shape['target_modules']}; to train every weight of the merged model, export it "
        f"first (unison export {s.adapter} --out DIR) and train on DIR"
    )


class PromptStream:
    """An endless stream of training prompts: a fresh seeded shuffle each pass; `position` is the data position."""

    def __init__(self, examples: list, seed: int, position: int = 0):
        self.examples, self.seed, self.position = examples, seed, position

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1000003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.examples))
            out.append(self.examples[self._order(epoch)[i]])
            self.position += 1
        return out


@dataclass
class ResumePoint:
    """Where a run starts: the checkpoint it resumes (None: fresh), its fp32 master weights, and the settings that
    changed since the run was saved (with --allow-changes)."""

    latest: Path | None = None
    master: dict | None = None
    changes: dict | None = None

    @property
    def step(self) -> int:
        return int(self.latest.name.split("-")[-1]) if self.latest is not None else 0


def find_resume(cfg: TrainConfig, world: World, resume: bool, allow_changes: bool) -> ResumePoint:
    """The newest intact checkpoint of the run folder to resume, checked: saved by as many ranks, of the same kind
    (LoRA or whole weights), with the same settings unless --allow-changes."""
    out = Path(cfg.run.out)
    latest = ckpt.latest_intact_checkpoint(out) if resume else None
    if latest is None:
        return ResumePoint(changes={})
    check_resume_world(latest, world.size)
    check_resume_kind(latest, cfg.lora.enabled)
    changes = {**lora_base_change(latest, cfg.model.path), **resume_changes(out, to_dict(cfg))}
    if changes and not allow_changes:
        k, (was, now) = next(iter(changes.items()))
        raise UserError(
            f"--resume would change {k} from {was!r} to {now!r} (the run saved in {out / 'config.yaml'}); "
            "resume with the same settings, or pass --allow-changes to continue with the new "
            "ones"
        )
    return ResumePoint(latest, None, changes)


def train(
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    allow_changes: bool = False,
    backend: str = "auto",
) -> Path:
    """Run RL fine-tuning as configured; returns the run folder. Nothing is locked, cleared (--overwrite) or written
    before every input has been built and checked."""
    if allow_changes and not resume:
        raise UserError("--allow-changes goes with --resume; pass both, or neither")
    if distributed.rank() == 0:  # the other ranks would find the lock rank 0 takes: its refusal is theirs
        check_run_dir(cfg.run.out, resume, overwrite)
    run = build_run(cfg)
    s = run.setup
    world, s.device = distributed.init(s.device, backend)
    check_world_settings(cfg, world.size, s.device)
    threads.configure(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    point = find_resume(cfg, world, resume, allow_changes)
    loggers = resolve_loggers(cfg.run.loggers)
    if world.main:
        check_trackers(loggers, cfg.run.out)
    model = s.policy_model(cfg.lora)  # LoRA: the base, adapted by peft
    if point.latest is not None and not cfg.lora.enabled:
        point.master = ckpt.check_compatible(point.latest, model)
    reference = frozen_copy(model, run.policy, cfg.model.matmul, cfg.model.gemm) if cfg.algorithm.kl_coef > 0 else None
    learner = s.learner(run.policy, model=model, optim=cfg.optim, precision=cfg.precision, moe=cfg.moe, world=world)
    if point.latest is not None and cfg.lora.enabled:  # the saved adapter's fp32 masters
        point.master = read_adapter(point.latest, dict(zip(learner.weights.names, learner.weights.params)))
    # each rank samples with its own stream
    bitwise = {"bitwise": True} if cfg.precision.bitwise else {}  # (an engine without the capability is refused)
    with s.engine(
        run.policy.rollout, seed=cfg.run.seed + world.rank, lm_head=cfg.precision.lm_head, **bitwise
    ) as engine:
        measurements = measurements_for(cfg, learner.moe, world)
        steps = RLStep(cfg, run, learner, engine, reference, measurements, world)
        try:
            return run_with_faults(Run(cfg, run, steps, quiet or not world.main), point, resume, overwrite, loggers)
        finally:
            steps.close()


def run_with_faults(run: Run, point: ResumePoint, resume: bool, overwrite: bool, loggers: list[str]) -> Path:
    """The run folder locked and prepared, then the run, with its faults (SIGTERM, SIGINT, a failed write, the
    mismatch guard's stop) turned into `RunFault`."""
    run_dir, lock = _prepare(run.world, Path(run.cfg.run.out), resume, overwrite)
    previous = (
        signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
    )
    run.current = point.step  # the step being run, for the message of a fault
    try:
        return run(run_dir, point, loggers)
    except KeyboardInterrupt:
        raise _stop(run, run_dir, "interrupted (SIGINT)", SIGINT_CODE) from None
    except Terminated:
        raise _stop(run, run_dir, "terminated (SIGTERM)", SIGTERM_CODE) from None
    except EngineThreadError as exc:
        raise _stop(run, run_dir, str(exc), 1) from None
    except MismatchGuardStop as exc:
        latest_saved = ckpt.latest_checkpoint(run_dir)
        where = (
            f"the newest complete checkpoint is {latest_saved}"
            if latest_saved is not None
            else "no checkpoint was saved yet (start over with the changes)"
        )
        raise RunFault(f"{exc}; {where}", 1) from None
    except Exception as exc:
        failed = write_error(exc)  # a write that failed (disk full, read-only folder, a tracker), however wrapped
        if failed is None:
            raise
        raise _stop(run, run_dir, describe_write(failed, f"into {run_dir}"), WRITE_FAILED) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.release()


def check_world_settings(cfg: TrainConfig, size: int, device: torch.device) -> None:
    """The settings a run of `size` ranks needs (`distributed.check_world`), and what it cannot do yet."""
    distributed.check_world(
        size,
        cfg.rollout.prompts_per_step,
        cfg.optim.train_batch_size // cfg.rollout.group_size,
        distributed.devices_for(device),
    )
    if size > 1 and cfg.precision.lm_head != "same":
        raise UserError(
            "precision.lm_head=fp32 with several ranks is not supported yet; train on one rank or leave "
            "precision.lm_head=same"
        )
    if size > 1:
        check_capability(cfg.rollout.engine, "ranks", f"--nproc {size}")
    if size > 1 and cfg.rollout.max_staleness > 0:
        raise UserError(
            f"rollout.max_staleness={cfg.rollout.max_staleness} with several ranks is not supported yet; train on one "
            "rank, or sample then learn (rollout.max_staleness=0)"
        )


def check_resume_kind(latest: Path, lora: bool) -> None:
    """A LoRA run resumes from an adapter, a full fine-tuning run from whole weights."""
    if is_adapter(latest) != lora:
        saved = "a LoRA adapter" if is_adapter(latest) else "whole weights (full fine-tuning)"
        raise UserError(
            f"{latest} holds {saved}, and this run has lora.enabled={str(lora).lower()}; resume with "
            f"lora.enabled={str(not lora).lower()} (or start a new run with --overwrite or another "
            "run.out)"
        )


def lora_base_change(latest: Path, model_path: str) -> dict[str, tuple]:
    """A LoRA run's base model as its checkpoint's adapter names it, against the one model.path gives now (the same
    model.path can name another folder: a relative path, a folder replaced). -> {"model.path": (saved, now)} or {}"""
    if not is_adapter(latest):
        return {}
    saved = Path(read_adapter_config(latest)["base_model_name_or_path"]).expanduser()
    now = base_model_dir(resolve_model_dir(model_path))
    if saved.resolve() == now.resolve():
        return {}
    return {"model.path": (f"{saved} (the LoRA base)", f"{now.absolute()} (the LoRA base)")}


def check_resume_world(latest: Path, size: int) -> None:
    """A run resumes bit-exactly on the number of ranks it was saved with, and on no other."""
    saved = ckpt.checkpoint_world_size(latest)
    if saved != size:
        raise UserError(
            f"{latest} was saved by {saved} rank(s) and this run has {size}: the optimizer state is "
            f"sharded and each rank's sampler state is its own, so resume with --nproc {saved} (or start "
            "a new run with --overwrite or another run.out)"
        )


def _prepare(world: World, out: Path, resume: bool, overwrite: bool):
    """Rank 0 locks and prepares the run folder (`prepare_run_dir`); the other ranks hold no lock. A refusal on
    rank 0 is every rank's. -> (run folder, lock or None)"""
    if not world.distributed:
        return prepare_run_dir(out, resume, overwrite)
    result, error = (None, None), None
    if world.main:
        try:
            result = prepare_run_dir(out, resume, overwrite)
        except UserError as exc:
            error = str(exc)
    error = world.broadcast(error)
    if error is not None:
        raise UserError(error)
    return (result[0] if world.main else out), result[1]


class Terminated(BaseException):
    """SIGTERM arrived; raised in the main thread so that the run unwinds (a checkpoint being written is removed).
    Not an Exception: code that catches what a reward function (or a library) raises lets it through."""


def on_sigterm(signum, frame):
    raise Terminated()


def _stop(run: Run, run_dir: Path, what: str, code: int) -> RunFault:
    latest = ckpt.latest_checkpoint(run_dir)
    where = (
        f"the newest complete checkpoint is {latest}"
        if latest is not None
        else "no checkpoint was saved yet (resuming starts over)"
    )
    ranks = f" --nproc {run.world.size}" if run.world.distributed else ""
    return RunFault(
        f"{what} during step {run.current + 1}; {where}; resume with: unison train --config "
        f"{run_dir / 'config.yaml'} --resume{ranks}",
        code,
    )


class Run:
    """A training run from its state to its last step (`__call__`); rank 0 alone writes into the run folder."""

    def __init__(self, cfg: TrainConfig, inputs: RunInputs, step: RLStep, quiet: bool):
        self.cfg, self.inputs, self.step, self.quiet = cfg, inputs, step, quiet
        self.learner, self.engine, self.world = step.learner, step.engine, step.world
        seed = cfg.run.seed
        self.stream = PromptStream(inputs.train_examples, seed)
        self.shuffle = torch.Generator().manual_seed(seed + 1)
        self.guard = Guard(cfg.guard)
        self.advice = advice_for(cfg.precision.rollout, cfg.precision.train, cfg.algorithm.preset)
        self.overflow = overflow_guards(cfg, inputs.policy, self.learner, self.engine)
        self.current = 0  # the step being run (0-based)
        self.log: MetricsLog | None = None

    def __call__(self, run_dir: Path, point: ResumePoint, loggers: list[str]) -> Path:
        self.run_dir = run_dir
        config_file = run_dir / "config.yaml"
        if self.world.main and (point.latest is None or not config_file.exists()):  # a resumed run keeps its own
            config_file.write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        start = self.restore(point) if point.latest is not None else 0
        self.note_changes(point.changes, start)
        self.learner.sync(self.engine)
        checked = {}
        if self.cfg.run.self_test:  # before the first step: do the engine and the learner agree on a few tokens?
            s, first = self.inputs.setup, self.inputs.train_examples[:8]
            checked = self_test(self.engine, self.learner, [s.prompt_ids[id(e)] for e in first])
        if self.world.main:
            for name in ("metrics.jsonl", "samples.jsonl"):  # rows after the resumed step, and lines torn by a kill
                ckpt.truncate_jsonl(run_dir / name, start)
            self.log = MetricsLog(run_dir, loggers, to_dict(self.cfg))
        if not self.quiet:
            print(self.banner(start, checked))
        try:
            self.loop(start)
        except BaseException:
            if self.log is not None:
                self.log.close(quiet=True)  # the run's own error is the one said
            raise
        if self.log is not None:
            self.log.close()
        return run_dir

    def restore(self, point: ResumePoint) -> int:
        """The state of the checkpoint `point.latest` (this rank's own optimizer shard, samplers and overflow counts
        with several ranks); a new precision starts with its own loss scale. -> the step it resumes at"""
        state = ckpt.load_trainer_state(point.latest)
        self.guard.load_state_dict(state.get("guard", {}))
        if self.world.rank:
            own = ckpt.load_rank_state(point.latest, self.world.rank)
            state = {
                **state,
                "learner": {**state["learner"], **own["learner"]},
                "rng": {**state["rng"], **own["rng"]},
                "overflow": own["overflow"],
            }
        learner_state = {**state["learner"], "master": point.master}
        policy = self.inputs.policy
        if state.get("precision") != {"rollout": precision_name(policy.rollout), "train": precision_name(policy.train)}:
            learner_state["scaler"] = self.learner.scaler.state_dict()
        self.learner.load_state_dict(learner_state)
        for name, g in self.overflow.items():
            if g is not None:
                g.load_state_dict(state.get("overflow", {}).get(name, {}))
        self.stream.position = state["data_position"]
        self.shuffle.set_state(state["rng"]["shuffle"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.engine.set_rng_state(state["rng"]["engine"])
        self.restore_ahead(state.get("ahead", []), point.latest)
        return state["step"]

    def restore_ahead(self, saved: list, latest: Path) -> None:
        """The batches a checkpoint saved in flight (sampling ahead), back into the engine's queue."""
        if not saved:
            return
        if self.step.sampler is None:
            raise UserError(
                f"{latest} holds {len(saved)} batch(es) sampled ahead (rollout.max_staleness > 0); resume it with "
                "the rollout.max_staleness it was saved with"
            )
        self.step.sampler.restore(saved, self.inputs.train_examples)

    def note_changes(self, changes: dict, start: int) -> None:
        """Settings changed on resume (--allow-changes): in resumes.jsonl and one line on stderr."""
        if not changes or not self.world.main:
            return
        ckpt.append_jsonl(
            self.run_dir / "resumes.jsonl", {"step": start, "changes": {k: list(v) for k, v in changes.items()}}
        )
        print(
            f"unison train: resumed at step {start} with changed settings (--allow-changes): "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()),
            file=sys.stderr,
        )

    def banner(self, start: int, checked: dict) -> str:
        """The run's first line: model and engine, precisions, preset, prompts, folder, LoRA, ranks, self-test."""
        s, w = self.inputs.setup, self.world
        return (
            f"unison train: {s.describe(self.engine)} | {self.inputs.policy.describe()} | preset "
            f"{self.cfg.algorithm.preset} | {len(self.inputs.train_examples)} prompts | run folder {self.run_dir}"
            + (f" | {describe_lora(self.learner.peft)}" if self.learner.peft is not None else "")
            + (f" | {w.size} ranks ({w.backend})" if w.distributed else "")
            + (f" | resumed at step {start}" if start else "")
            + (
                f" | engine self-test {checked['self_test/abs_log_ratio_mean']:.1e} "
                f"(band {checked['self_test/band']:g})"
                if checked
                else ""
            )
        )

    def loop(self, start: int) -> None:
        cfg = self.cfg
        bar = tqdm(
            range(start, cfg.run.steps),
            initial=start,
            total=cfg.run.steps,
            desc="train",
            unit="step",
            disable=self.quiet or not cfg.run.progress,
        )
        try:
            for step in bar:
                self.current = step
                samples: list = []
                metrics = self.step(step, self.stream, self.shuffle, samples)
                self.after_step(step + 1, metrics, samples, bar)
        finally:
            bar.close()

    def after_step(self, done: int, metrics: dict, samples: list, bar) -> None:
        """The mismatch guard (the same global metrics on every rank: every rank stops together), the step's
        metrics and samples (rank 0), and the checkpoint when due; a guard's stop after its metrics are written."""
        if self.cfg.precision.on_activation_overflow == "fp32_layers":
            metrics["precision/fp32_layers"] = sum(len(g.upcast) for g in self.overflow.values() if g is not None)
        stop, warnings = None, []
        try:
            warnings = self.guard.check(done, metrics, self.advice) if self.guard.active else []
        except MismatchGuardStop as exc:
            stop, warnings = exc, [str(exc)]
        if warnings:
            metrics["guard/warnings"] = len(warnings)
            if self.world.main and stop is None:
                for line in warnings:
                    tqdm.write(f"unison train: guard: step {done}: {line}", file=sys.stderr)
        if self.world.main:
            self.report(done, metrics, samples, bar)
        if stop is not None:  # the newest checkpoint is the one before
            raise stop
        if self.step.divergence is not None:
            raise BitwiseMismatchError(self.divergence_line(done))
        every = self.cfg.run.save_every
        if (every and done % every == 0) or done == self.cfg.run.steps:
            self.save(done)

    def divergence_line(self, done: int) -> str:
        """precision.bitwise's stop: where the two engines first disagreed, and the first module that differs when
        that row is run alone both ways (`unison.exact.first_divergence`)."""
        d, b = self.step.divergence, self.step.last_batch
        prompt = list(b.rollouts.prompt_ids[d.row])
        response = b.rollouts.response_ids[d.row, : int(b.rollouts.lengths[d.row])].tolist()
        module = first_divergence(self.engine.model, self.learner.model, prompt, response, d.position)
        where = (
            f"the first module whose output differs there: {module}"
            if module
            else ("every module agrees on that row alone: the rows batched with it made the difference")
        )
        return (
            f"precision.bitwise: at step {done}, row {d.row} (prompt {b.examples[d.row].id!r}), response token "
            f"{d.position}, {d.what} differ ({d.values[0]!r} and {d.values[1]!r}); {where}"
        )

    def report(self, done: int, metrics: dict, samples: list, bar) -> None:
        """After step `done` (rank 0): its samples and metrics into the run folder and the trackers, the evaluation
        when due, the progress bar or console line."""
        cfg = self.cfg
        ckpt.append_jsonl(self.run_dir / "samples.jsonl", {"step": done, **samples[0], "rows": samples[1]})
        self.log.samples(done, samples[1])
        due = (cfg.run.eval_every and done % cfg.run.eval_every == 0) or done == cfg.run.steps
        if due and self.inputs.test_examples:
            metrics.update(self.evaluate())
        self.log.write(done, metrics)
        bar.set_postfix(
            acc=f"{metrics['rollout/accuracy']:.2f}",
            k3=f"{metrics['mismatch/k3']:.1e}",
            skip=metrics["precision/skipped_steps"],
        )
        if not self.quiet and not cfg.run.progress:
            print(console_line(done, cfg.run.steps, metrics), flush=True)

    def evaluate(self) -> dict:
        """avg@n and pass@1, pass@n on the held-out prompts. The engine's random state is left as it was found, so
        the steps after an evaluation sample what they would without it: a run resumed from one that ended (and so
        evaluated) at its step N goes on as one run of more steps would."""
        s, tests, n = self.inputs.setup, self.inputs.test_examples, self.cfg.run.eval_samples

        def run(engine) -> dict:
            state = engine.rng_state()
            try:
                ids = [s.prompt_ids[id(e)] for e in tests]
                return evaluate(engine, s.task, s.tokenizer, tests, ids, self.inputs.sampling, n=n, ks=[1, n])
            finally:
                engine.set_rng_state(state)

        # sampling ahead: in the engine's thread, after the jobs before it, at the learner's weights of now
        ev = run(self.engine) if self.step.sampler is None else self.step.sampler.on_engine(run)
        return {f"eval/{k}": v for k, v in ev.items() if k.startswith(("avg@", "pass@"))}

    def save(self, step: int) -> Path | None:
        """Checkpoint `step`: the full master weights and rank 0's state in `trainer_state.pt`, and with several
        ranks each other rank's own (its optimizer shard, RNG states, overflow counts) gathered to rank 0, which
        writes the folder (`checkpoint.save_checkpoint`). Returns the folder on rank 0."""
        learner, world = self.learner, self.world
        # sampling ahead: the batches in flight, finished first (the engine's random state is then theirs)
        ahead = self.step.sampler.state(self.inputs.train_examples) if self.step.sampler is not None else []
        master = learner.master_state()  # gathered from every rank's shard
        own = {
            "learner": {"optimizer": learner.optimizer_state()},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "engine": self.engine.rng_state()},
            "overflow": {name: g.state_dict() for name, g in self.overflow.items() if g is not None},
        }
        ranks = world.gather_to_main(own)
        if not world.main:
            world.barrier()  # until rank 0 has written the checkpoint
            return None
        model = learner.peft if learner.peft is not None else learner.model  # LoRA: the adapter is saved
        try:
            return ckpt.save_checkpoint(
                self.run_dir,
                step,
                model,
                self.inputs.setup.tokenizer,
                master,
                {**self.trainer_state(step, own), "ahead": ahead},
                keep=self.cfg.run.keep_checkpoints,
                shard_size=parse_size(self.cfg.run.shard_size, "run.shard_size"),
                rank_states=ranks[1:],
            )
        finally:
            world.barrier()

    def trainer_state(self, step: int, own: dict) -> dict:
        """Rank 0's state beside the weights: data position, optimizer and loss scale, samplers, overflow, guard."""
        policy = self.learner.policy
        return {
            "step": step,
            "data_position": self.stream.position,
            "learner": {**own["learner"], "scaler": self.learner.scaler.state_dict()},
            "rng": {**own["rng"], "shuffle": self.shuffle.get_state()},
            "precision": {"rollout": precision_name(policy.rollout), "train": precision_name(policy.train)},
            "overflow": own["overflow"],
            "guard": self.guard.state_dict(),
        }


def overflow_guards(cfg: TrainConfig, policy: PrecisionPolicy, learner: Learner, engine) -> dict:
    """The fp16 activation guards of the learner's forward and the engine's decode, where each runs in fp16 (bf16
    and fp32 share fp32's range)."""

    def watch(dtype):
        return cfg.precision.on_activation_overflow if dtype == torch.float16 else "off"

    return {
        "learner": OverflowGuard.attach(learner.model, watch(policy.train), "learner (full-sequence forward)"),
        "engine": engine.overflow_guard(watch(policy.rollout), "rollout engine (decode)"),
    }
