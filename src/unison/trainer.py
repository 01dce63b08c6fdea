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
from unison import threads
from unison.algorithms import ADVANTAGES, AGGREGATIONS, aggregation_counts, kl_penalty, policy_loss
from unison.config import TrainConfig, parse_size, to_dict
from unison.conformance import self_test
from unison.errors import SIGINT_CODE, SIGTERM_CODE, WRITE_FAILED, RunFault, UserError
from unison.evaluation import evaluate, score
from unison.learner import Learner, lr_factor
from unison.mismatch import mismatch_metrics
from unison.overflow import OverflowGuard
from unison.precision import PrecisionPolicy, precision_name
from unison.report import MetricsLog, console_line, resolve_loggers
from unison.rollout.base import SamplingParams
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
    policy = PrecisionPolicy.from_names(cfg.precision.rollout, cfg.precision.train)
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
            shuffle: torch.Generator, samples: list | None = None, step: int = 0) -> dict:
    """RL step `step` (0-based): rollout, reward, advantage, recompute, mismatch, updates, sync. Returns its metrics
    (and appends a digest of the sampled responses, and `run.log_samples` decoded rows, to `samples` when given)."""
    r, o, a = cfg.rollout, cfg.optim, cfg.algorithm
    threads.adapt()  # the cores the machine's other processes leave free
    lr = o.lr * lr_factor(o.schedule, step, cfg.run.steps, o.warmup_steps, o.min_lr_ratio)
    learner.set_lr(lr)
    kl_loss, kl_reward = a.kl_coef > 0 and a.kl_in == "loss", a.kl_coef > 0 and a.kl_in == "reward"
    t_start = time.perf_counter()
    examples = [e for e in stream.take(r.prompts_per_step) for _ in range(r.group_size)]  # groups are contiguous
    s = run.setup
    rollouts = engine.generate([s.prompt_ids[id(e)] for e in examples], run.sampling)
    t_rollout = time.perf_counter() - t_start
    rewards, texts = score(s.task, s.tokenizer, rollouts, examples)

    B = len(rollouts)
    # With one update per rollout batch, pi_old is the policy of that update's own forward: its log-probs (detached)
    # are log pi_old, and a separate recompute pass would repeat the same forward. With several updates (or a KL
    # penalty in the reward, which needs log pi_old before the advantages), pi_old is recomputed once first.
    single_update = not needs_recompute(o, B) and not kl_reward
    t0 = time.perf_counter()
    if single_update:
        logp_old, entropy = torch.zeros(rollouts.response_ids.shape), torch.zeros(rollouts.response_ids.shape)
    else:
        logp_old, entropy = learner.recompute(rollouts, o.micro_batch_size, r.temperature, r.top_k, r.top_p,
                                              with_entropy=True)  # fmt: skip
    t_recompute = time.perf_counter() - t0
    mu, mask = rollouts.logprobs, rollouts.mask
    kl_metrics = {}
    if kl_reward:  # r_i - beta * sum_t KL_t(pi_old || ref)
        logp_ref = learner.recompute(rollouts, o.micro_batch_size, r.temperature, r.top_k, r.top_p, reference=True)
        kl = kl_penalty(a.kl_estimator, logp_old, logp_ref, mask)  # [B, T]
        kl_metrics = {"kl/ref": float(kl.sum() / mask.sum().clamp(min=1)), "kl/ref_seq": float(kl.sum(1).mean())}
        advantages = ADVANTAGES[preset.advantage](rewards - a.kl_coef * kl.sum(1), r.group_size)  # [B]
    else:
        advantages = ADVANTAGES[preset.advantage](rewards, r.group_size)  # [B]

    t0 = time.perf_counter()
    groups = B // r.group_size
    per_mb = o.train_batch_size // r.group_size
    sums: dict[str, float] = {}
    losses, skipped, norms, scales = [], 0, [], []
    for _ in range(o.epochs):
        group_order = torch.randperm(groups, generator=shuffle)
        for g0 in range(0, groups, per_mb):
            rows = torch.cat([torch.arange(g * r.group_size, (g + 1) * r.group_size)
                              for g in group_order[g0: g0 + per_mb].tolist()])
            total_tokens, total_seqs = aggregation_counts(mask[rows])
            step_loss = []

            def micro_losses(rows=rows, total_tokens=total_tokens, total_seqs=total_seqs, step_loss=step_loss):
                for idx in learner.micro_batches(rollouts, o.micro_batch_size, rows):
                    part_rows = rows[idx]
                    part = rollouts.select(part_rows)
                    T = part.response_ids.shape[1]
                    batch = learner.batch(part)
                    if single_update:
                        logp, ent = learner.logprobs(batch, r.temperature, r.top_k, r.top_p, with_entropy=True)
                        logp_old[part_rows, :T], entropy[part_rows, :T] = logp.detach().float().cpu(), ent.float().cpu()
                    else:
                        logp = learner.logprobs(batch, r.temperature, r.top_k, r.top_p)
                    part_mask = part.mask.to(logp.device)
                    loss, lm = policy_loss(
                        preset, logp, logp_old[part_rows, :T].to(logp.device), part.logprobs.to(logp.device),
                        advantages[part_rows].to(logp.device), part_mask, run.sampling.max_new_tokens,
                        total_tokens=total_tokens, total_seqs=total_seqs,
                    )  # fmt: skip
                    if kl_loss:  # + beta * aggregate_t KL_t(pi_theta || ref), aggregated as the policy loss is
                        ref = learner.logprobs(batch, r.temperature, r.top_k, r.top_p, reference=True)
                        kl = kl_penalty(a.kl_estimator, logp, ref, part_mask)  # [b, T]
                        loss = loss + a.kl_coef * AGGREGATIONS[preset.aggregation](
                            kl, part_mask, run.sampling.max_new_tokens, total_tokens=total_tokens,
                            total_seqs=total_seqs)  # fmt: skip
                        lm = {**lm, "kl/ref": float(kl.detach().sum() / part_mask.sum().clamp(min=1))}
                    weight = len(part_rows) / len(rows)
                    for k, v in lm.items():
                        sums[k] = sums.get(k, 0.0) + weight * float(v)
                    step_loss.append(float(loss.detach()))
                    yield lambda loss=loss: loss

            result = learner.step(micro_losses())
            losses.append(sum(step_loss))
            skipped += int(result.skipped)
            norms.append(result.grad_norm)
            scales.append(result.loss_scale)
    n_updates = len(losses)
    t_learn = time.perf_counter() - t0
    m = {f"mismatch/{k}": v for k, v in mismatch_metrics(logp_old, mu, mask).items()}
    m.update(learner.sync(engine))  # with its time, sync/seconds
    m.update(kl_metrics)
    m["learner/lr"] = lr
    if samples is not None:
        samples.append(ckpt.rollout_digest(rollouts))
        samples.append(readable_samples(cfg.run.log_samples, examples, rollouts, texts, rewards, logp_old, run))
    tokens = int(rollouts.lengths.sum())
    finite_norms = [x for x in norms if x == x and x != float("inf")]
    m.update({
        "rollout/reward_mean": rewards.mean().item(),
        "rollout/accuracy": (rewards > 0.5).float().mean().item(),
        "rollout/response_length_mean": rollouts.lengths.float().mean().item(),
        "rollout/response_length_max": int(rollouts.lengths.max()),
        "rollout/truncated_frac": (~rollouts.finished).float().mean().item(),
        "rollout/entropy": (entropy * mask).sum().item() / max(int(mask.sum()), 1),
        "rollout/advantage_abs_mean": advantages.abs().mean().item(),
        "policy/loss": sum(losses) / n_updates,
        **{k: v / n_updates for k, v in sums.items()},
        "learner/grad_norm": sum(finite_norms) / len(finite_norms) if finite_norms else float("nan"),
        "learner/updates": n_updates,
        "precision/loss_scale": learner.scaler.scale,
        "precision/skipped_this_step": skipped,
        "precision/skipped_steps": learner.scaler.skipped_steps,
        "perf/rollout_tokens_per_s": tokens / max(t_rollout, 1e-9),
        **({} if single_update else {"perf/recompute_tokens_per_s": tokens / max(t_recompute, 1e-9),
                                     "perf/recompute_seconds": t_recompute}),
        "perf/learner_tokens_per_s": tokens * o.epochs / max(t_learn, 1e-9),
        "perf/rollout_seconds": t_rollout, "perf/learn_seconds": t_learn,
        "perf/step_seconds": time.perf_counter() - t_start, "perf/threads": torch.get_num_threads(),
    })  # fmt: skip
    return m


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False,
          allow_changes: bool = False) -> Path:
    """Run RL fine-tuning as configured; returns the run folder.

    Everything that can fail on the inputs (the run folder, the config, the model, the checkpoint to resume, the
    learner's optimizer, the engine) is built and checked before the run folder is locked, cleared (--overwrite)
    or written. A fault after that (a write that fails, SIGTERM, SIGINT) ends with `RunFault`: one line naming the
    newest complete checkpoint and the command that resumes."""
    if allow_changes and not resume:
        raise UserError("--allow-changes goes with --resume; pass both, or neither")
    check_run_dir(cfg.run.out, resume, overwrite)
    run = build_run(cfg)
    threads.configure(cfg.run.threads)
    s = run.setup
    seed = cfg.run.seed
    torch.manual_seed(seed)
    random.seed(seed)
    model = s.load_model()
    out = Path(cfg.run.out)
    latest = ckpt.latest_intact_checkpoint(out) if resume else None
    master = ckpt.check_compatible(latest, model) if latest is not None else None
    changes = resume_changes(out, to_dict(cfg)) if latest is not None else {}
    if changes and not allow_changes:
        k, (was, now) = next(iter(changes.items()))
        raise UserError(f"--resume would change {k} from {was!r} to {now!r} (the run saved in {out / 'config.yaml'}); "
                        "resume with the same settings, or pass --allow-changes to continue with the new "
                        "ones")  # fmt: skip
    loggers = resolve_loggers(cfg.run.loggers)
    learner = make_learner(cfg, run, model)
    engine = s.engine(run.policy.rollout)
    run_dir, lock = prepare_run_dir(out, resume, overwrite)
    previous = (signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread()
                else None)
    step = [latest_step(latest)]  # the step being run, for the message of a fault
    try:
        return _run(cfg, run, learner, engine, run_dir, latest, master, changes, quiet, step, loggers)
    except KeyboardInterrupt:
        raise _stop(run_dir, "interrupted (SIGINT)", step[0], SIGINT_CODE) from None
    except Terminated:
        raise _stop(run_dir, "terminated (SIGTERM)", step[0], SIGTERM_CODE) from None
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise _stop(run_dir, f"cannot write into {run_dir} ({exc.strerror})", step[0], WRITE_FAILED) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.release()


def latest_step(path: Path | None) -> int:
    return int(path.name.split("-")[-1]) if path is not None else 0


def make_learner(cfg: TrainConfig, run: RunInputs, model) -> Learner:
    """The learner of a run: its optimizer, loss scaler and micro-batching from the config."""
    p, o = cfg.precision, cfg.optim
    scaling = None if p.loss_scaling == "auto" else p.loss_scaling == "on"
    return Learner(
        model, run.policy, run.setup.device, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2),
        max_grad_norm=o.max_grad_norm or None, pad_token_id=run.setup.tokenizer.pad_token_id or 0,
        loss_scaling=scaling, matmul=cfg.model.matmul, micro_batch_tokens=o.micro_batch_tokens,
        share_prompts=o.share_prompts, reference=cfg.algorithm.kl_coef > 0,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
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
         quiet: bool, current: list, loggers: list[str]) -> Path:
    """The run itself, from its state (fresh, or the checkpoint `latest`) to its last step; `current[0]` is kept at
    the step being run."""
    s, p, seed = run.setup, cfg.precision, cfg.run.seed
    config_file = run_dir / "config.yaml"
    if latest is None or not config_file.exists():  # a resumed run keeps the config it was started with
        config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    preset = cfg.algorithm_fields()

    def watch(dtype):  # the FP16 range is fp16's concern: bf16 and fp32 share fp32's range
        return p.on_activation_overflow if dtype == torch.float16 else "off"

    guards = {"learner": OverflowGuard.attach(learner.model, watch(run.policy.train),
                                              "learner (full-sequence forward)"),
              "engine": OverflowGuard.attach(getattr(engine, "model", None) or torch.nn.Module(),
                                             watch(run.policy.rollout), "rollout engine (decode)")}  # fmt: skip
    stream = PromptStream(run.train_examples, seed)
    shuffle = torch.Generator().manual_seed(seed + 1)
    start = 0
    if latest is not None:
        state = ckpt.load_trainer_state(latest)
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
    if changes:
        ckpt.append_jsonl(run_dir / "resumes.jsonl",
                          {"step": start, "changes": {k: list(v) for k, v in changes.items()}})
        print(f"unison train: resumed at step {start} with changed settings (--allow-changes): "
              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), file=sys.stderr)  # fmt: skip
    learner.sync(engine)
    checked = {}
    if cfg.run.self_test:  # before the first step: do the engine and the learner agree on a few tokens?
        checked = self_test(engine, learner, [s.prompt_ids[id(e)] for e in run.train_examples[:8]])
    for name in ("metrics.jsonl", "samples.jsonl"):  # rows after the resumed step, and lines torn by a kill
        ckpt.truncate_jsonl(run_dir / name, start)
    log = MetricsLog(run_dir, loggers, to_dict(cfg))
    if not quiet:
        print(f"unison train: {s.describe(engine)} | {run.policy.describe()} | preset {cfg.algorithm.preset} | "
              f"{len(run.train_examples)} prompts | run folder {run_dir}"
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
            metrics = rl_step(cfg, run, learner, engine, stream, preset, shuffle, samples, step=step)
            done = step + 1
            ckpt.append_jsonl(run_dir / "samples.jsonl", {"step": done, **samples[0], "rows": samples[1]})
            log.samples(done, samples[1])
            if p.on_activation_overflow == "fp32_layers":
                metrics["precision/fp32_layers"] = sum(len(g.upcast) for g in guards.values() if g is not None)
            if (cfg.run.eval_every and done % cfg.run.eval_every == 0) or done == cfg.run.steps:
                prompts = [s.prompt_ids[id(e)] for e in run.test_examples]
                n = cfg.run.eval_samples
                ev = evaluate(engine, s.task, s.tokenizer, run.test_examples, prompts, run.sampling, n=n, ks=[1, n])
                metrics.update({f"eval/{k}": v for k, v in ev.items() if k.startswith(("avg@", "pass@"))})
            log.write(done, metrics)
            bar.set_postfix(acc=f"{metrics['rollout/accuracy']:.2f}", k3=f"{metrics['mismatch/k3']:.1e}",
                            skip=metrics["precision/skipped_steps"])  # fmt: skip
            if not quiet and not cfg.run.progress:
                print(console_line(done, cfg.run.steps, metrics), flush=True)
            if (cfg.run.save_every and done % cfg.run.save_every == 0) or done == cfg.run.steps:
                save(run_dir, done, learner, engine, s.tokenizer, stream, shuffle, cfg, guards)
    finally:
        bar.close()
        log.close()
    return run_dir


def save(run_dir: Path, step: int, learner: Learner, engine, tokenizer, stream: PromptStream, shuffle, cfg,
         guards: dict | None = None) -> Path:
    state = learner.state_dict()
    trainer_state = {
        "step": step,
        "data_position": stream.position,
        "learner": {"optimizer": state["optimizer"], "scaler": state["scaler"]},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "shuffle": shuffle.get_state(),
                "engine": engine.rng_state()},
        "precision": {"rollout": precision_name(learner.policy.rollout), "train": precision_name(learner.policy.train)},
        "overflow": {name: g.state_dict() for name, g in (guards or {}).items() if g is not None},
    }  # fmt: skip
    return ckpt.save_checkpoint(run_dir, step, learner.model, tokenizer, state["master"], trainer_state,
                                keep=cfg.run.keep_checkpoints,
                                shard_size=parse_size(cfg.run.shard_size, "run.shard_size"))
