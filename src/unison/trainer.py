"""The RL loop, top to bottom:

    prompts -> rollout (G samples per prompt, rollout dtype) -> rewards -> advantages
    -> recompute log pi_old (train dtype) -> mismatch metrics (pi_old vs mu)
    -> for each epoch, for each mini-batch: log pi_theta -> policy loss with the rollout correction -> aggregate
       -> the precision module's scale/backward/unscale/clip/step-or-skip
    -> weight sync to the rollout engine, verified by checksum -> metrics, evaluation, checkpoint

The paper's sanity setting is 64 prompts x 8 samples per step and train batch 128 (4 optimizer steps per rollout
batch); the built-in default is smaller so that it runs on a laptop CPU (configs/ has both).
"""

from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from unison import checkpoint as ckpt
from unison import distributed, threads
from unison.algorithms import ADVANTAGES, AGGREGATIONS, aggregation_counts, kl_penalty, policy_loss
from unison.config import TrainConfig, parse_size, to_dict
from unison.conformance import self_test
from unison.distributed import SINGLE, World
from unison.errors import SIGINT_CODE, SIGTERM_CODE, WRITE_FAILED, RunFault, UserError
from unison.evaluation import evaluate, score
from unison.guard import Guard, MismatchGuardStop, advice_for
from unison.learner import Learner, MicroBatch, lr_factor
from unison.lora import describe as describe_lora
from unison.lora import is_adapter, read_adapter
from unison.mismatch import ExactAccumulator, mismatch_metrics
from unison.overflow import OverflowGuard
from unison.precision import PrecisionPolicy, precision_name
from unison.report import MetricsLog, console_line, resolve_loggers
from unison.rollout.base import Rollouts, SamplingParams
from unison.routing import RoutingAccumulator
from unison.runfolder import WRITE_ERRNOS, check_run_dir, prepare_run_dir, resume_changes
from unison.setup import Setup, build


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
    test_examples = s.task.examples("test", n=cfg.run.eval_prompts, seed=cfg.run.seed)
    s.encode(train_examples + test_examples)
    return RunInputs(s, policy, train_examples, test_examples, s.sampling())


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


def readable_samples(n: int, examples: list, rollouts, texts: list[str], rewards: torch.Tensor, logp_old: torch.Tensor,
                     run: RunInputs) -> list[dict]:
    """`n` rows of a step spread over its groups: the prompt as the model saw it, the response, its reward, length,
    whether it ended on a stop, and its mean |log pi_old - log mu| (the mismatch on its tokens)."""
    B = len(examples)
    if n <= 0 or B == 0:
        return []
    picks = sorted({round(j * (B - 1) / max(n - 1, 1)) for j in range(min(n, B))})
    tok = run.setup.tokenizer
    rows = []
    for i in picks:
        length = int(rollouts.lengths[i])
        gap = (logp_old[i, :length] - rollouts.logprobs[i, :length]).abs().mean().item() if length else 0.0
        rows.append({"id": examples[i].id, "prompt": tok.decode(rollouts.prompt_ids[i]), "response": texts[i],
                     "reward": float(rewards[i]), "length": length, "finished": bool(rollouts.finished[i]),
                     "mismatch": gap})  # fmt: skip
    return rows


def needs_recompute(optim, rollout_batch: int) -> bool:
    """Whether log pi_old needs its own forward pass: only when a rollout batch gives more than one update."""
    return optim.epochs > 1 or optim.train_batch_size < rollout_batch


def rl_step(cfg: TrainConfig, run: RunInputs, learner: Learner, engine, stream: PromptStream, preset,
            shuffle: torch.Generator, samples: list | None = None, step: int = 0, world: World = SINGLE) -> dict:
    """RL step `step` (0-based): sample -> rewards and advantages -> log pi_old -> updates -> sync -> metrics.

    With several ranks every rank takes the same prompts from the stream and samples its own share of the groups;
    the updates see the whole batch through the global token and sequence counts, and the metrics are the whole
    batch's. Returns the metrics (and appends a digest of the sampled responses, and `run.log_samples` decoded rows,
    to `samples` when given)."""
    r, o, a = cfg.rollout, cfg.optim, cfg.algorithm
    threads.adapt()  # the cores the machine's other processes leave free
    lr = o.lr * lr_factor(o.schedule, step, cfg.run.steps, o.warmup_steps, o.min_lr_ratio)
    learner.set_lr(lr)
    t_start = time.perf_counter()
    prompts = stream.take(r.prompts_per_step)  # the same on every rank
    share = r.prompts_per_step // world.size
    examples = [e for e in prompts[world.rank * share : (world.rank + 1) * share] for _ in range(r.group_size)]
    exact = cfg.metrics.exact_divergence
    moe = (cfg.metrics.routing or cfg.moe.routing_replay) and cfg.rollout.engine == "native" and learner.moe
    asked = {**({"keep_distributions": True} if exact else {}), **({"keep_routing": True} if moe else {})}
    rollouts = engine.generate([run.setup.prompt_ids[id(e)] for e in examples], run.sampling,
                               **asked)  # groups contiguous  # fmt: skip
    t_rollout = time.perf_counter() - t_start
    rewards, texts = score(run.setup.task, run.setup.tokenizer, rollouts, examples)

    t0 = time.perf_counter()
    # With one update per rollout batch, pi_old is the policy of that update's own forward: its log-probs (detached)
    # are log pi_old, and a separate recompute pass would repeat the same forward. With several updates (or a KL
    # penalty in the reward, which needs log pi_old before the advantages), pi_old is recomputed once first.
    kl_reward = a.kl_coef > 0 and a.kl_in == "reward"
    single_update = not needs_recompute(o, r.prompts_per_step * r.group_size) and not kl_reward
    sampling = (r.temperature, r.top_k, r.top_p)
    if single_update:
        logp_old, entropy = torch.zeros(rollouts.response_ids.shape), torch.zeros(rollouts.response_ids.shape)
    else:
        logp_old, entropy = learner.recompute(rollouts, o.micro_batch_size, *sampling, with_entropy=True)
    t_recompute = time.perf_counter() - t0
    kl_metrics = {}
    shaped = rewards
    if kl_reward:  # r_i - beta * sum_t KL_t(pi_old || ref)
        logp_ref = learner.recompute(rollouts, o.micro_batch_size, *sampling, reference=True)
        kl = kl_penalty(a.kl_estimator, logp_old, logp_ref, rollouts.mask)  # [B, T]
        kl_metrics = {"kl/ref": kl.sum() / rollouts.mask.sum().clamp(min=1), "kl/ref_seq": kl.sum(1).mean()}
        shaped = rewards - a.kl_coef * kl.sum(1)
    advantages = ADVANTAGES[preset.advantage](shaped, r.group_size)  # [B], per group: whole groups on each rank

    exact_acc, t_exact = None, 0.0
    if exact:  # pi_old's whole distributions, before the update changes it
        t0 = time.perf_counter()
        exact_acc = ExactAccumulator()
        exact_acc.add(learner.distributions(rollouts, o.micro_batch_size, *sampling), rollouts.distributions,
                      rollouts.mask)  # fmt: skip
        rollouts.distributions = None  # (not gathered nor kept)
        exact_acc.merge(world.gather_others(exact_acc))
        t_exact = time.perf_counter() - t0
    routing_acc = None
    if cfg.metrics.routing and moe and rollouts.routing is not None:  # pi_old's router decisions against the engine's
        routing_acc = RoutingAccumulator()
        routing_acc.add(*rollouts.routing, *learner.routing(rollouts, o.micro_batch_size), rollouts.mask)
        rollouts.routing = None  # (the experts to replay stay in rollouts.replay)
        routing_acc.merge(world.gather_others(routing_acc))
    t0 = time.perf_counter()
    updates = update_policy(cfg, learner, rollouts, advantages, logp_old, entropy, preset, shuffle, single_update,
                            run.sampling.max_new_tokens, world)  # fmt: skip
    t_learn = time.perf_counter() - t0
    m = learner.sync(engine)  # with its time, perf/sync_seconds
    if world.distributed:  # the whole batch, on every rank
        parts = world.gather((rollouts, rewards, logp_old, entropy, advantages, texts, [e.id for e in examples],
                              {k: float(v) for k, v in kl_metrics.items()}))  # fmt: skip
        rollouts = Rollouts.concat([p[0] for p in parts], run.setup.tokenizer.pad_token_id or 0)
        T = rollouts.response_ids.shape[1]
        rewards, advantages = torch.cat([p[1] for p in parts]), torch.cat([p[4] for p in parts])
        logp_old, entropy = (torch.cat([torch.nn.functional.pad(p[i], (0, T - p[i].shape[1])) for p in parts])
                             for i in (2, 3))  # fmt: skip
        texts = [t for p in parts for t in p[5]]
        examples = [e for e in prompts for _ in range(r.group_size)]
        kl_metrics = {k: sum(p[7][k] for p in parts) / world.size for k in kl_metrics}
    mu, mask = rollouts.logprobs, rollouts.mask
    estimated = mismatch_metrics(logp_old, mu, mask)
    m.update({f"mismatch/{k}": v for k, v in estimated.items()})
    if exact_acc is not None:
        m.update({f"mismatch/{k}": v for k, v in exact_acc.result(estimated).items()})
        m["perf/exact_divergence_seconds"] = t_exact
    if routing_acc is not None:
        m.update({f"routing/{k}": v for k, v in routing_acc.result().items()})
    m.update({k: float(v) for k, v in kl_metrics.items()})
    m["learner/lr"] = lr
    if samples is not None:
        samples.append(ckpt.rollout_digest(rollouts))
        samples.append(readable_samples(cfg.run.log_samples, examples, rollouts, texts, rewards, logp_old, run))
    tokens = int(rollouts.lengths.sum())
    m.update({
        "rollout/reward_mean": rewards.mean().item(),
        "rollout/accuracy": (rewards > 0.5).float().mean().item(),
        "rollout/response_length_mean": rollouts.lengths.float().mean().item(),
        "rollout/response_length_max": int(rollouts.lengths.max()),
        "rollout/truncated_frac": (~rollouts.finished).float().mean().item(),
        "rollout/entropy": (entropy * mask).sum().item() / max(int(mask.sum()), 1),
        "rollout/advantage_abs_mean": advantages.abs().mean().item(),
        **updates,
        "precision/loss_scale": learner.scaler.scale,
        "precision/skipped_steps": learner.scaler.skipped_steps,
        "perf/rollout_tokens_per_s": tokens / max(t_rollout, 1e-9),
        **({} if single_update else {"perf/recompute_tokens_per_s": tokens / max(t_recompute, 1e-9),
                                     "perf/recompute_seconds": t_recompute}),
        "perf/learner_tokens_per_s": tokens * o.epochs / max(t_learn, 1e-9),
        "perf/rollout_seconds": t_rollout, "perf/learn_seconds": t_learn,
        "perf/step_seconds": time.perf_counter() - t_start, "perf/threads": torch.get_num_threads(),
    })  # fmt: skip
    peak, now = zip(*world.gather((peak_rss_mib(), rss_mib())))
    m["perf/peak_rss_mib"], m["perf/rss_mib"] = max(peak), max(now)  # the largest rank's
    if world.distributed:
        m["perf/ranks"] = world.size
    return m


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def update_policy(cfg: TrainConfig, learner: Learner, rollouts, advantages: torch.Tensor, logp_old: torch.Tensor,
                  entropy: torch.Tensor, preset, shuffle: torch.Generator, single_update: bool, max_new_tokens: int,
                  world: World = SINGLE) -> dict:  # fmt: skip
    """The optimizer steps of one rollout batch: `optim.epochs` passes over its groups in a seeded order, one
    `Learner.update` per `optim.train_batch_size` samples (each rank takes its share of them). With
    `single_update`, the update's own forward gives log pi_old and the entropy, written into `logp_old` and
    `entropy`. Returns the update metrics (the policy loss and its terms, averaged over updates and ranks)."""
    r, o, a = cfg.rollout, cfg.optim, cfg.algorithm
    kl_loss = a.kl_coef > 0 and a.kl_in == "loss"
    groups = len(rollouts) // r.group_size
    per_update = o.train_batch_size // r.group_size // world.size  # groups of this rank in each update
    sampling = (r.temperature, r.top_k, r.top_p)
    sums: dict[str, torch.Tensor] = {}
    losses, skipped, norms = [], 0, []
    for _ in range(o.epochs):
        group_order = torch.randperm(groups, generator=shuffle)
        for g0 in range(0, groups, per_update):
            rows = torch.cat([torch.arange(g * r.group_size, (g + 1) * r.group_size)
                              for g in group_order[g0: g0 + per_update].tolist()])  # fmt: skip
            counts = world.all_reduce_sum(torch.tensor(aggregation_counts(rollouts.mask[rows]), dtype=torch.long))
            total_tokens, total_seqs = (int(c) for c in counts)
            step_loss = []

            def loss_fn(mb: MicroBatch, total_tokens=total_tokens, total_seqs=total_seqs, rows=rows,
                        step_loss=step_loss):
                logp, T = mb.logp, mb.logp.shape[1]
                if single_update:
                    logp_old[mb.rows, :T], entropy[mb.rows, :T] = logp.detach().float().cpu(), mb.entropy.float().cpu()
                dev = logp.device
                mask = mb.rollouts.mask.to(dev)
                loss, lm = policy_loss(preset, logp, logp_old[mb.rows, :T].to(dev), mb.rollouts.logprobs.to(dev),
                                       advantages[mb.rows].to(dev), mask, max_new_tokens, total_tokens=total_tokens,
                                       total_seqs=total_seqs)  # fmt: skip
                if kl_loss:  # + beta * aggregate_t KL_t(pi_theta || ref), aggregated as the policy loss is
                    ref = learner.logprobs(mb.batch, *sampling, reference=True)
                    kl = kl_penalty(a.kl_estimator, logp, ref, mask)  # [b, T]
                    loss = loss + a.kl_coef * AGGREGATIONS[preset.aggregation](
                        kl, mask, max_new_tokens, total_tokens=total_tokens, total_seqs=total_seqs)
                    lm = {**lm, "kl/ref": kl.detach().sum() / mask.sum().clamp(min=1)}
                weight = len(mb.rows) / (len(rows) * world.size)
                for k, v in lm.items():
                    sums[k] = sums.get(k, 0.0) + weight * float(v)
                step_loss.append(float(loss.detach()))
                return loss

            result = learner.update(rollouts, rows, loss_fn, o.micro_batch_size, *sampling, with_entropy=single_update)
            losses.append(sum(step_loss))
            skipped += int(result.skipped)
            norms.append(result.grad_norm)
    n = len(losses)
    keys = sorted(sums)
    totals = world.all_reduce_sum(torch.tensor([sum(losses)] + [sums[k] for k in keys], dtype=torch.float64))
    finite = [x for x in norms if math.isfinite(x)]
    return {"policy/loss": float(totals[0]) / n, **{k: float(v) / n for k, v in zip(keys, totals[1:])},
            "learner/grad_norm": sum(finite) / len(finite) if finite else float("nan"),
            "learner/updates": n, "precision/skipped_this_step": skipped}  # fmt: skip


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False,
          allow_changes: bool = False, backend: str = "auto") -> Path:
    """Run RL fine-tuning as configured; returns the run folder.

    Everything that can fail on the inputs (the run folder, the config, the model, the checkpoint to resume, the
    learner's optimizer, the engine) is built and checked before the run folder is locked, cleared (--overwrite)
    or written. A fault after that (a write that fails, SIGTERM, SIGINT) ends with `RunFault`: one line naming the
    newest complete checkpoint and the command that resumes.

    Started by torchrun (or `unison train --nproc N`), each process is one rank (`unison.distributed`): the learner
    is sharded with FSDP2, each rank samples its share of the groups, rank 0 alone writes the run folder."""
    if allow_changes and not resume:
        raise UserError("--allow-changes goes with --resume; pass both, or neither")
    check_run_dir(cfg.run.out, resume, overwrite)
    run = build_run(cfg)
    s = run.setup
    world, s.device = distributed.init(s.device, backend)
    check_world_settings(cfg, world.size, s.device)
    threads.configure(cfg.run.threads)
    seed = cfg.run.seed
    torch.manual_seed(seed)
    random.seed(seed)
    lora = cfg.lora.enabled
    model = s.load_model(base=lora)  # LoRA: the base, adapted by the learner
    out = Path(cfg.run.out)
    latest = ckpt.latest_intact_checkpoint(out) if resume else None
    if latest is not None:
        check_resume_world(latest, world.size)
        check_resume_kind(latest, lora)
    master = ckpt.check_compatible(latest, model) if latest is not None and not lora else None
    changes = resume_changes(out, to_dict(cfg)) if latest is not None else {}
    if changes and not allow_changes:
        k, (was, now) = next(iter(changes.items()))
        raise UserError(f"--resume would change {k} from {was!r} to {now!r} (the run saved in {out / 'config.yaml'}); "
                        "resume with the same settings, or pass --allow-changes to continue with the new "
                        "ones")  # fmt: skip
    loggers = resolve_loggers(cfg.run.loggers)
    learner = make_learner(cfg, run, model, world)
    if latest is not None and lora:  # the saved adapter's fp32 masters
        master = read_adapter(latest, dict(zip(learner.weights.names, learner.weights.params)))
    # each rank samples with its own stream
    with s.engine(run.policy.rollout, seed=seed + world.rank, lm_head=cfg.precision.lm_head) as engine:
        return _train(cfg, run, learner, engine, world, out, resume, overwrite, latest, master, changes, quiet,
                      loggers)  # fmt: skip


def _train(cfg: TrainConfig, run: RunInputs, learner: Learner, engine, world: World, out: Path, resume: bool,
           overwrite: bool, latest, master, changes: dict, quiet: bool, loggers: list[str]) -> Path:
    """The run folder locked and prepared, then the run, with its faults (SIGTERM, SIGINT, a failed write) turned
    into `RunFault`."""
    run_dir, lock = _prepare(world, out, resume, overwrite)
    previous = (signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread()
                else None)
    step = [latest_step(latest)]  # the step being run, for the message of a fault
    try:
        return _run(cfg, run, learner, engine, run_dir, latest, master, changes, quiet or not world.main, step,
                    loggers, world)  # fmt: skip
    except KeyboardInterrupt:
        raise _stop(run_dir, "interrupted (SIGINT)", step[0], SIGINT_CODE) from None
    except Terminated:
        raise _stop(run_dir, "terminated (SIGTERM)", step[0], SIGTERM_CODE) from None
    except MismatchGuardStop as exc:
        latest_saved = ckpt.latest_checkpoint(run_dir)
        where = (f"the newest complete checkpoint is {latest_saved}" if latest_saved is not None
                 else "no checkpoint was saved yet (start over with the changes)")  # fmt: skip
        raise RunFault(f"{exc}; {where}", 1) from None
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise _stop(run_dir, f"cannot write into {run_dir} ({exc.strerror})", step[0], WRITE_FAILED) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.release()


def check_world_settings(cfg: TrainConfig, size: int, device: torch.device) -> None:
    """The settings a run of `size` ranks needs (`distributed.check_world`), and what it cannot do yet."""
    distributed.check_world(size, cfg.rollout.prompts_per_step, cfg.optim.train_batch_size // cfg.rollout.group_size,
                            distributed.devices_for(device))  # fmt: skip
    if size > 1 and cfg.precision.lm_head != "same":
        raise UserError("precision.lm_head=fp32 with several ranks is not supported yet; train on one rank or leave "
                        "precision.lm_head=same")  # fmt: skip
    if size > 1 and cfg.rollout.engine != "native":
        raise UserError(f"rollout.engine={cfg.rollout.engine} with {size} ranks is not supported yet; use "
                        "rollout.engine=native with several ranks, or one rank with vLLM (rollout.tensor_parallel_size "
                        "spreads vLLM over several GPUs)")  # fmt: skip


def check_resume_kind(latest: Path, lora: bool) -> None:
    """A LoRA run resumes from an adapter, a full fine-tuning run from whole weights."""
    if is_adapter(latest) != lora:
        saved = "a LoRA adapter" if is_adapter(latest) else "whole weights (full fine-tuning)"
        raise UserError(f"{latest} holds {saved}, and this run has lora.enabled={str(lora).lower()}; resume with "
                        f"lora.enabled={str(not lora).lower()} (or start a new run with --overwrite or another "
                        "run.out)")  # fmt: skip


def check_resume_world(latest: Path, size: int) -> None:
    """A run resumes bit-exactly on the number of ranks it was saved with, and on no other."""
    saved = ckpt.checkpoint_world_size(latest)
    if saved != size:
        raise UserError(f"{latest} was saved by {saved} rank(s) and this run has {size}: the optimizer state is "
                        f"sharded and each rank's sampler state is its own, so resume with --nproc {saved} (or start "
                        "a new run with --overwrite or another run.out)")  # fmt: skip


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


def latest_step(path: Path | None) -> int:
    return int(path.name.split("-")[-1]) if path is not None else 0


def make_learner(cfg: TrainConfig, run: RunInputs, model, world: World = SINGLE) -> Learner:
    """The learner of a run: its optimizer, loss scaler and micro-batching from the config."""
    p, o = cfg.precision, cfg.optim
    scaling = None if p.loss_scaling == "auto" else p.loss_scaling == "on"
    return Learner(
        model, run.policy, run.setup.device, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2),
        max_grad_norm=o.max_grad_norm or None, pad_token_id=run.setup.tokenizer.pad_token_id or 0,
        loss_scaling=scaling, matmul=cfg.model.matmul, micro_batch_tokens=o.micro_batch_tokens,
        share_prompts=o.share_prompts, reference=cfg.algorithm.kl_coef > 0,
        gradient_checkpointing=cfg.model.gradient_checkpointing, world=world, routing_replay=cfg.moe.routing_replay,
        lora=cfg.lora if cfg.lora.enabled else None, adapter=run.setup.adapter if cfg.lora.enabled else None,
        scaler_kwargs={"init_scale": p.init_scale, "growth_interval": p.growth_interval, "min_scale": p.min_scale},
    )  # fmt: skip


class Terminated(Exception):
    """SIGTERM arrived; raised in the main thread so that the run unwinds (a checkpoint being written is removed)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _stop(run_dir: Path, what: str, step: int, code: int) -> RunFault:
    latest = ckpt.latest_checkpoint(run_dir)
    where = (f"the newest complete checkpoint is {latest}" if latest is not None else
             "no checkpoint was saved yet (resuming starts over)")  # fmt: skip
    return RunFault(f"{what} during step {step + 1}; {where}; resume with: unison train --config "
                    f"{run_dir / 'config.yaml'} --resume", code)  # fmt: skip


def _run(cfg: TrainConfig, run: RunInputs, learner: Learner, engine, run_dir: Path, latest, master, changes: dict,
         quiet: bool, current: list, loggers: list[str], world: World = SINGLE) -> Path:
    """The run itself, from its state (fresh, or the checkpoint `latest`) to its last step; `current[0]` is kept at
    the step being run. Rank 0 alone writes into the run folder and evaluates."""
    s, p, seed = run.setup, cfg.precision, cfg.run.seed
    config_file = run_dir / "config.yaml"
    main = world.main
    if main and (latest is None or not config_file.exists()):  # a resumed run keeps the config it was started with
        config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    preset = cfg.algorithm_fields()

    def watch(dtype):  # the FP16 range is fp16's concern: bf16 and fp32 share fp32's range
        return p.on_activation_overflow if dtype == torch.float16 else "off"

    guards = {"learner": OverflowGuard.attach(learner.model, watch(run.policy.train),
                                              "learner (full-sequence forward)"),
              "engine": OverflowGuard.attach(engine.watched_module(), watch(run.policy.rollout),
                                             "rollout engine (decode)")}  # fmt: skip
    stream = PromptStream(run.train_examples, seed)
    shuffle = torch.Generator().manual_seed(seed + 1)
    guard = Guard(cfg.guard)
    advice = advice_for(p.rollout, p.train, cfg.algorithm.preset)
    start = 0
    if latest is not None:
        state = ckpt.load_trainer_state(latest)
        guard.load_state_dict(state.get("guard", {}))
        if world.rank:  # this rank's own optimizer shard, samplers and overflow counts
            own = ckpt.load_rank_state(latest, world.rank)
            state = {**state, "learner": {**state["learner"], **own["learner"]}, "rng": {**state["rng"], **own["rng"]},
                     "overflow": own["overflow"]}  # fmt: skip
        learner_state = {**state["learner"], "master": master}
        if state.get("precision") != {"rollout": precision_name(run.policy.rollout),
                                      "train": precision_name(run.policy.train)}:
            learner_state["scaler"] = learner.scaler.state_dict()  # a new precision starts with its own loss scale
        learner.load_state_dict(learner_state)
        for name, g in guards.items():
            if g is not None:
                g.load_state_dict(state.get("overflow", {}).get(name, {}))
        start, stream.position = state["step"], state["data_position"]
        shuffle.set_state(state["rng"]["shuffle"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        engine.set_rng_state(state["rng"]["engine"])
    if changes and main:
        ckpt.append_jsonl(run_dir / "resumes.jsonl",
                          {"step": start, "changes": {k: list(v) for k, v in changes.items()}})
        print(f"unison train: resumed at step {start} with changed settings (--allow-changes): "
              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), file=sys.stderr)  # fmt: skip
    learner.sync(engine)
    checked = {}
    if cfg.run.self_test:  # before the first step: do the engine and the learner agree on a few tokens?
        checked = self_test(engine, learner, [s.prompt_ids[id(e)] for e in run.train_examples[:8]])
    log = None
    if main:
        for name in ("metrics.jsonl", "samples.jsonl"):  # rows after the resumed step, and lines torn by a kill
            ckpt.truncate_jsonl(run_dir / name, start)
        log = MetricsLog(run_dir, loggers, to_dict(cfg))
    if not quiet:
        print(f"unison train: {s.describe(engine)} | {run.policy.describe()} | preset {cfg.algorithm.preset} | "
              f"{len(run.train_examples)} prompts | run folder {run_dir}"
              + (f" | {describe_lora(learner.peft)}" if learner.peft is not None else "")
              + (f" | {world.size} ranks ({world.backend})" if world.distributed else "")
              + (f" | resumed at step {start}" if start else "")
              + (f" | engine self-test {checked['self_test/abs_log_ratio_mean']:.1e} "
                 f"(band {checked['self_test/band']:g})"
                 if checked else ""))  # fmt: skip
    bar = tqdm(range(start, cfg.run.steps), initial=start, total=cfg.run.steps, desc="train", unit="step",
               disable=quiet or not cfg.run.progress)  # fmt: skip
    try:
        for step in bar:
            current[0] = step
            samples: list = []
            metrics = rl_step(cfg, run, learner, engine, stream, preset, shuffle, samples, step=step, world=world)
            done = step + 1
            if p.on_activation_overflow == "fp32_layers":
                metrics["precision/fp32_layers"] = sum(len(g.upcast) for g in guards.values() if g is not None)
            stop = None
            try:  # the same global metrics on every rank: every rank stops together
                warnings = guard.check(done, metrics, advice) if guard.active else []
            except MismatchGuardStop as exc:
                stop, warnings = exc, [str(exc)]
            if warnings:
                metrics["guard/warnings"] = len(warnings)
                if main:
                    for line in warnings if stop is None else []:
                        tqdm.write(f"unison train: guard: step {done}: {line}", file=sys.stderr)
            if main:
                report_step(cfg, run, engine, log, bar, done, metrics, samples, quiet)
            if stop is not None:  # after its metrics are written; the newest checkpoint is the one before
                raise stop
            if (cfg.run.save_every and done % cfg.run.save_every == 0) or done == cfg.run.steps:
                save(run_dir, done, learner, engine, s.tokenizer, stream, shuffle, cfg, guards, world, guard)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return run_dir


def report_step(cfg: TrainConfig, run: RunInputs, engine, log: MetricsLog, bar, done: int, metrics: dict,
                samples: list, quiet: bool) -> None:
    """After step `done` (rank 0): its samples and metrics into the run folder and the trackers, the evaluation
    when due, the progress bar or console line. The evaluation leaves the engine's random state as it found it, so
    the steps after it sample what they would without it: a run resumed from one that ended (and so evaluated) at
    its step N goes on as one run of more steps would."""
    s, run_dir = run.setup, log.path.parent
    ckpt.append_jsonl(run_dir / "samples.jsonl", {"step": done, **samples[0], "rows": samples[1]})
    log.samples(done, samples[1])
    if (cfg.run.eval_every and done % cfg.run.eval_every == 0) or done == cfg.run.steps:
        prompts = [s.prompt_ids[id(e)] for e in run.test_examples]
        n = cfg.run.eval_samples
        state = engine.rng_state()
        try:
            ev = evaluate(engine, s.task, s.tokenizer, run.test_examples, prompts, run.sampling, n=n, ks=[1, n])
        finally:
            engine.set_rng_state(state)
        metrics.update({f"eval/{k}": v for k, v in ev.items() if k.startswith(("avg@", "pass@"))})
    log.write(done, metrics)
    bar.set_postfix(acc=f"{metrics['rollout/accuracy']:.2f}", k3=f"{metrics['mismatch/k3']:.1e}",
                    skip=metrics["precision/skipped_steps"])  # fmt: skip
    if not quiet and not cfg.run.progress:
        print(console_line(done, cfg.run.steps, metrics), flush=True)


def save(run_dir: Path, step: int, learner: Learner, engine, tokenizer, stream: PromptStream, shuffle, cfg,
         guards: dict | None = None, world: World = SINGLE, guard: Guard | None = None) -> Path | None:
    """Checkpoint `step`: the full master weights and rank 0's state in `trainer_state.pt`, and with several ranks
    each other rank's own (its optimizer shard, RNG states, overflow counts) gathered to rank 0, which writes the
    folder (`checkpoint.save_checkpoint`). Returns the folder on rank 0."""
    master = learner.master_state()  # gathered from every rank's shard
    own = {
        "learner": {"optimizer": learner.optimizer_state()},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "engine": engine.rng_state()},
        "overflow": {name: g.state_dict() for name, g in (guards or {}).items() if g is not None},
    }  # fmt: skip
    ranks = world.gather_to_main(own)
    if not world.main:
        world.barrier()  # until rank 0 has written the checkpoint
        return None
    trainer_state = {
        "step": step,
        "data_position": stream.position,
        "learner": {**own["learner"], "scaler": learner.scaler.state_dict()},
        "rng": {**own["rng"], "shuffle": shuffle.get_state()},
        "precision": {"rollout": precision_name(learner.policy.rollout), "train": precision_name(learner.policy.train)},
        "overflow": own["overflow"],
        "guard": guard.state_dict() if guard is not None else {},
    }  # fmt: skip
    try:
        model = learner.peft if learner.peft is not None else learner.model  # LoRA: the adapter is saved
        return ckpt.save_checkpoint(run_dir, step, model, tokenizer, master, trainer_state,
                                    keep=cfg.run.keep_checkpoints,
                                    shard_size=parse_size(cfg.run.shard_size, "run.shard_size"),
                                    rank_states=ranks[1:])  # fmt: skip
    finally:
        world.barrier()
