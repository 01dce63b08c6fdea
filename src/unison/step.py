"""One RL step, top to bottom (`RLStep.__call__`):

    sample        G responses to each prompt from the rollout engine (rollout dtype), and their rewards; with
                  rollout.max_staleness k, the batch the engine's thread sampled with the weights of step - k
                  (`unison.ahead`)
    old log-probs log pi_old in the train dtype: its own pass only when a batch gives several updates, or when a KL
                  penalty in the reward needs it first; otherwise the first update's forward gives it
    advantages    per group, from the rewards (less the KL penalty to the reference where it goes into the reward)
    measurements  what the optional measurements (`unison.measurements`) need of pi_old before it changes
    update        optim.epochs passes over the batch, one optimizer step per optim.train_batch_size samples
    sync          the new master weights into the engine, verified by checksum (sampling ahead: each job's own, in
                  the engine's thread)
    metrics       the whole batch's (gathered from every rank): rollout, mismatch (with the phantom-clip fraction),
                  staleness, measurements, loss, precision, perf

With several ranks every rank takes the same prompts and samples its own share of the groups; the updates see the
whole batch through the global token and sequence counts, and the metrics are the whole batch's.

The paper's sanity setting is 64 prompts x 8 samples per step and train batch 128 (4 optimizer steps per rollout
batch); the built-in default is smaller so that it runs on a laptop CPU (configs/ has both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import resource
import time
from dataclasses import dataclass, field, replace

import torch

from unison import checkpoint as ckpt
from unison import threads
from unison.ahead import AheadSampler
from unison.algorithms import ADVANTAGES, KLTerm, aggregation_counts, clip_binding_frac, kl_penalty, policy_loss
from unison.batch import Batch
from unison.batching import MicroBatch
from unison.config import TrainConfig
from unison.distributed import SINGLE, World
from unison.evaluation import score
from unison.measurements import Measurement
from unison.mismatch import bits_equal, mismatch_metrics, staleness_split
from unison.rollout.base import Rollouts
from unison.schedules import lr_factor


def needs_recompute(optim, rollout_batch: int) -> bool:
    """Whether log pi_old needs its own forward pass: only when a rollout batch gives more than one update."""
    return optim.epochs > 1 or optim.train_batch_size < rollout_batch


class RLStep:
    """The RL step of a run: its config, its learner and engine, the reference policy of a KL penalty (or None),
    its optional measurements and its ranks."""

    def __init__(
        self,
        cfg: TrainConfig,
        run,
        learner,
        engine,
        reference=None,
        measurements: list[Measurement] = (),
        world: World = SINGLE,
    ):
        self.cfg, self.run, self.learner, self.engine = cfg, run, learner, engine
        self.reference, self.measurements, self.world = reference, list(measurements), world
        r, a = cfg.rollout, cfg.algorithm
        self.preset = cfg.algorithm_fields()
        self.sampling = (r.temperature, r.top_k, r.top_p)
        self.kl_reward = a.kl_coef > 0 and a.kl_in == "reward"
        # one update per rollout batch: pi_old is the policy of that update's own forward (unless a KL penalty in the
        # reward needs log pi_old before the advantages)
        self.single_update = not needs_recompute(cfg.optim, r.prompts_per_step * r.group_size) and not self.kl_reward
        self.update = PolicyUpdate(cfg, learner, world, reference, self.single_update, run.sampling.max_new_tokens)
        self.divergence: Divergence | None = None  # precision.bitwise: the first token the two engines disagree on
        self.last_batch: Batch | None = None
        replay = cfg.moe.routing_replay and learner.moe  # the engine's experts, for the learner to route with
        self.asks = {"keep_routing": True} if replay else {}
        for m in self.measurements:
            self.asks.update(m.asks)
        # rollout.max_staleness > 0: the engine samples ahead in its own thread (`unison.ahead`)
        self.sampler = AheadSampler(self, r.max_staleness) if r.max_staleness > 0 else None

    def __call__(self, step: int, stream, shuffle: torch.Generator, samples: list | None = None) -> dict:
        """RL step `step` (0-based). Returns its metrics, and appends a digest of the sampled responses and
        `run.log_samples` decoded rows to `samples` when given."""
        if self.sampler is None:
            threads.adapt()  # the cores the machine's other processes leave free
        lr = self.set_lr(step)
        t_start = time.perf_counter()
        # the batch: sampled now, or (sampling ahead) by the engine's thread with the weights of step - k
        batch, prompts = self.sample(stream) if self.sampler is None else self.sampler.next(step, stream)
        if self.sampler is None:  # the engine's copy of the policy is not needed again before the sync
            self.engine.release_weights()
        release_free_memory()  # the engine's decode buffers (and its weights)
        t_rollout = time.perf_counter() - t_start
        t0 = time.perf_counter()
        self.old_logprobs(batch)
        t_recompute = time.perf_counter() - t0
        self.advantages(batch)
        for m in self.measurements:  # pi_old, before the update changes it
            m.before_update(self.learner, batch.rollouts, self.cfg.optim.micro_batch_size, self.sampling)
        t0 = time.perf_counter()
        updates = self.update(batch, shuffle)
        release_free_memory()  # the activations and gradients
        t_learn = time.perf_counter() - t0
        # the new weights into the engine, verified (sampling ahead: the engine's thread loads each job's own)
        metrics = self.learner.sync(self.engine) if self.sampler is None else dict(batch.sync)
        release_free_memory()  # the exported weights
        rows = len(batch.rollouts)  # this rank's
        batch = self.gather(batch, prompts)
        metrics.update(self.mismatch(batch))
        metrics.update(self.staleness(step, batch))
        self.last_batch = batch
        if self.cfg.precision.bitwise:  # the same on every rank: the gathered batch, and every rank's update
            self.divergence = bitwise_divergence(batch) or first_of_ranks(self.world, self.update.divergence, rows)
        metrics.update({**{k: float(v) for k, v in batch.kl.items()}, "learner/lr": lr})
        if samples is not None:
            samples.append(ckpt.rollout_digest(batch.rollouts))
            samples.append(readable_samples(self.cfg.run.log_samples, batch, self.run.setup.tokenizer))
        metrics.update({**rollout_metrics(batch), **updates, **self.precision_metrics()})
        times = {"rollout": t_rollout, "recompute": None if self.single_update else t_recompute, "learn": t_learn}
        metrics.update(self.perf_metrics(batch, times, time.perf_counter() - t_start))
        return metrics

    # ---- the parts, in order ---------------------------------------------------------------------------------
    def set_lr(self, step: int) -> float:
        o = self.cfg.optim
        lr = o.lr * lr_factor(o.schedule, step, self.cfg.run.steps, o.warmup_steps, o.min_lr_ratio)
        self.learner.set_lr(lr)
        return lr

    def sample(self, stream) -> tuple[Batch, list]:
        """This rank's share of the step's prompts (the same on every rank), G responses each, and their rewards.
        -> (the batch, the step's prompts)"""
        prompts = stream.take(self.cfg.rollout.prompts_per_step)
        return self.generate(prompts), prompts

    def generate(self, prompts: list) -> Batch:
        """This rank's share of `prompts`, G responses each (groups contiguous), and their rewards."""
        r, w, s = self.cfg.rollout, self.world, self.run.setup
        share = r.prompts_per_step // w.size
        examples = [e for e in prompts[w.rank * share : (w.rank + 1) * share] for _ in range(r.group_size)]
        t0 = time.perf_counter()
        rollouts = self.engine.generate([s.prompt_ids[id(e)] for e in examples], self.run.sampling, **self.asks)
        t_engine = time.perf_counter() - t0
        rewards, texts = score(s.task, s.tokenizer, rollouts, examples)
        return Batch(rollouts, rewards, texts, examples, sync={"perf/engine_seconds": t_engine})

    def old_logprobs(self, batch: Batch) -> None:
        """log pi_old and the entropy: recomputed, or zeros that the first update's forward fills."""
        shape = batch.rollouts.response_ids.shape
        if self.single_update:
            batch.logp_old, batch.entropy = torch.zeros(shape), torch.zeros(shape)
            return
        batch.logp_old, batch.entropy = self.learner.recompute(
            batch.rollouts, self.cfg.optim.micro_batch_size, *self.sampling, with_entropy=True
        )

    def advantages(self, batch: Batch) -> None:
        """Per group (whole groups on each rank), from the rewards, less beta x sum_t KL_t(pi_old || ref) where the
        KL penalty goes into the reward."""
        a, ro, shaped = self.cfg.algorithm, batch.rollouts, batch.rewards
        if self.kl_reward:  # r_i - beta * sum_t KL_t(pi_old || ref)
            logp_ref = self.learner.recompute(
                ro, self.cfg.optim.micro_batch_size, *self.sampling, policy=self.reference
            )
            kl = kl_penalty(a.kl_estimator, batch.logp_old, logp_ref, ro.mask)  # [B, T]
            batch.kl = {"kl/ref": kl.sum() / ro.mask.sum().clamp(min=1), "kl/ref_seq": kl.sum(1).mean()}
            shaped = batch.rewards - a.kl_coef * kl.sum(1)
        batch.advantages = ADVANTAGES[self.preset.advantage](shaped, self.cfg.rollout.group_size)  # [B]

    def gather(self, batch: Batch, prompts: list) -> Batch:
        """The whole batch on every rank (each rank's rows in rank order); one rank's batch as it is."""
        w = self.world
        if not w.distributed:
            return batch
        b = batch
        parts = w.gather(
            (
                b.rollouts,
                b.rewards,
                b.logp_old,
                b.entropy,
                b.advantages,
                b.texts,
                {k: float(v) for k, v in b.kl.items()},
            )
        )
        rollouts = Rollouts.concat([p[0] for p in parts], self.run.setup.tokenizer.pad_token_id or 0)
        T = rollouts.response_ids.shape[1]
        logp_old, entropy = (
            torch.cat([torch.nn.functional.pad(p[i], (0, T - p[i].shape[1])) for p in parts]) for i in (2, 3)
        )
        examples = [e for e in prompts for _ in range(self.cfg.rollout.group_size)]
        kl = {k: sum(p[6][k] for p in parts) / w.size for k in b.kl}
        return Batch(
            rollouts,
            torch.cat([p[1] for p in parts]),
            [t for p in parts for t in p[5]],
            examples,
            logp_old,
            entropy,
            torch.cat([p[4] for p in parts]),
            kl,
        )

    # ---- metrics ---------------------------------------------------------------------------------------------
    def mismatch(self, batch: Batch) -> dict:
        """The estimators on the sampled tokens (pi_old against mu), then the measurements' metrics."""
        ro = batch.rollouts
        estimated = mismatch_metrics(batch.logp_old, ro.logprobs, ro.mask)
        out = {f"mismatch/{k}": v for k, v in estimated.items()}
        p = self.preset
        if p.objective == "ppo_clip":  # tokens the clip of pi_old / mu would cut where pi_old equals pi_theta
            frac = clip_binding_frac(batch.logp_old, ro.logprobs, batch.advantages, ro.mask, p.clip_low, p.clip_high)
            out["mismatch/phantom_clip_frac"] = frac
        for m in self.measurements:
            out.update(m.metrics(estimated))
        return out

    def staleness(self, step: int, batch: Batch) -> dict:
        """How many updates old the batch's weights are, and (sampling ahead, on the split's rows) its off-policy
        gap log pi_old - log mu split into engine mismatch and policy change (`mismatch.staleness_split`)."""
        age = step - batch.version if self.sampler is not None else 0
        out = {"staleness/mean": float(age), "staleness/max": float(age)}
        if batch.logp_sampled is None:
            return out
        rows, ro = batch.split_rows, batch.rollouts
        T = batch.logp_sampled.shape[1]
        now, mu, mask = batch.logp_old[rows, :T], ro.logprobs[rows, :T], ro.mask[rows, :T]
        out.update({f"staleness/{k}": v for k, v in staleness_split(now, batch.logp_sampled, mu, mask).items()})
        p = self.preset
        if p.objective == "ppo_clip":  # the phantom clipping of the mismatch alone
            adv = batch.advantages[rows]
            out["staleness/mismatch_clip_frac"] = clip_binding_frac(
                batch.logp_sampled, mu, adv, mask, p.clip_low, p.clip_high
            )
        out["staleness/split_rows"] = len(rows)
        return out

    def close(self) -> None:
        """Stop the engine's thread (sampling ahead), after the job it is on."""
        if self.sampler is not None:
            self.sampler.close()

    def precision_metrics(self) -> dict:
        return {
            "precision/loss_scale": self.learner.scaler.scale,
            "precision/skipped_steps": self.learner.scaler.skipped_steps,
        }

    def perf_metrics(self, batch: Batch, times: dict, step_seconds: float) -> dict:
        """Tokens per second of each part, the step's time, threads and memory (the largest rank's)."""
        tokens = int(batch.rollouts.lengths.sum())
        out = {"perf/rollout_tokens_per_s": tokens / max(times["rollout"], 1e-9)}
        if times["recompute"] is not None:
            out.update(
                {
                    "perf/recompute_tokens_per_s": tokens / max(times["recompute"], 1e-9),
                    "perf/recompute_seconds": times["recompute"],
                }
            )
        out.update(
            {
                "perf/learner_tokens_per_s": tokens * self.cfg.optim.epochs / max(times["learn"], 1e-9),
                "perf/rollout_seconds": times["rollout"],
                "perf/learn_seconds": times["learn"],
                "perf/step_seconds": step_seconds,
                "perf/threads": torch.get_num_threads(),
            }
        )
        peak, now = zip(*self.world.gather((peak_rss_mib(), rss_mib())))
        out["perf/peak_rss_mib"], out["perf/rss_mib"] = max(peak), max(now)
        if self.world.distributed:
            out["perf/ranks"] = self.world.size
        return out


@dataclass
class Divergence:
    """precision.bitwise: the first sampled token whose log-probs differ (`what`: which two), in a step's batch."""

    row: int
    position: int
    what: str
    values: tuple[float, float]


def first_unequal(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[int, int] | None:
    """(row, position) of the first response token where a and b differ as fp32 bit patterns, or None."""
    differ = ~bits_equal(a, b) & mask.bool()
    if not bool(differ.any()):
        return None
    row, position = differ.nonzero()[0].tolist()
    return row, position


def first_of_ranks(world: World, divergence: Divergence | None, rows: int) -> Divergence | None:
    """The first rank's `divergence` (found in its own `rows` rows), its row numbered in the gathered batch (each
    rank's rows in rank order), on every rank; None where no rank has one."""
    offset = 0
    for found, n in world.gather((divergence, rows)):
        if found is not None:
            return replace(found, row=offset + found.row)
        offset += n
    return None


def bitwise_divergence(batch: Batch) -> Divergence | None:
    """The first token whose log pi_old differs from log mu (in bits), or None."""
    at = first_unequal(batch.logp_old, batch.rollouts.logprobs, batch.rollouts.mask)
    if at is None:
        return None
    row, pos = at
    values = (float(batch.rollouts.logprobs[row, pos]), float(batch.logp_old[row, pos]))
    return Divergence(row, pos, "log mu (engine) and log pi_old (learner)", values)


def rollout_metrics(batch: Batch) -> dict:
    """Rewards, accuracy, lengths, truncation, entropy and advantages of the whole batch."""
    ro, mask = batch.rollouts, batch.rollouts.mask
    return {
        "rollout/reward_mean": batch.rewards.mean().item(),
        "rollout/accuracy": (batch.rewards > 0.5).float().mean().item(),
        "rollout/response_length_mean": ro.lengths.float().mean().item(),
        "rollout/response_length_max": int(ro.lengths.max()),
        "rollout/truncated_frac": (~ro.finished).float().mean().item(),
        "rollout/entropy": (batch.entropy * mask).sum().item() / max(int(mask.sum()), 1),
        "rollout/advantage_abs_mean": batch.advantages.abs().mean().item(),
    }


def readable_samples(n: int, batch: Batch, tokenizer) -> list[dict]:
    """`n` rows of a step spread over its groups: the prompt as the model saw it, the response, its reward, length,
    whether it ended on a stop, and its mean |log pi_old - log mu| (the mismatch on its tokens)."""
    B, ro = len(batch.examples), batch.rollouts
    if n <= 0 or B == 0:
        return []
    picks = sorted({round(j * (B - 1) / max(n - 1, 1)) for j in range(min(n, B))})
    rows = []
    for i in picks:
        length = int(ro.lengths[i])
        gap = (batch.logp_old[i, :length] - ro.logprobs[i, :length]).abs().mean().item() if length else 0.0
        rows.append(
            {
                "id": batch.examples[i].id,
                "prompt": tokenizer.decode(ro.prompt_ids[i]),
                "response": batch.texts[i],
                "reward": float(batch.rewards[i]),
                "length": length,
                "finished": bool(ro.finished[i]),
                "mismatch": gap,
            }
        )
    return rows


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the memory the allocator holds free to the system (glibc's `malloc_trim`): what one part of the step
    freed (the engine's decode buffers, the activations and gradients of the update) then stays out of the resident
    memory of the next part, where it would otherwise sit in pieces too small for that part's tensors."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the update ----------------------------------------------------------------------------------------------------
@dataclass
class LossTotals:
    """A step's updates as they go: the loss terms summed over micro-batches (each weighted by its share of its
    update's rows, over every rank), each update's loss, the skipped steps and the gradient norms."""

    sums: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)
    skipped: int = 0
    norms: list = field(default_factory=list)

    def add(self, weight: float, terms: dict, loss: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + weight * float(v)
        self.losses[-1] += loss

    def result(self, world: World) -> dict:
        """The loss and its terms averaged over the updates (and summed over the ranks), the mean finite norm."""
        n, keys = len(self.losses), sorted(self.sums)
        totals = world.all_reduce_sum(
            torch.tensor([sum(self.losses)] + [self.sums[k] for k in keys], dtype=torch.float64)
        )
        finite = [x for x in self.norms if math.isfinite(x)]
        return {
            "policy/loss": float(totals[0]) / n,
            **{k: float(v) / n for k, v in zip(keys, totals[1:])},
            "learner/grad_norm": sum(finite) / len(finite) if finite else float("nan"),
            "learner/updates": n,
            "precision/skipped_this_step": self.skipped,
        }


class PolicyUpdate:
    """The optimizer steps of one rollout batch (`__call__`): `optim.epochs` passes over its groups in a seeded
    order, one `Learner.update` per `optim.train_batch_size` samples (each rank takes its share of them). With
    `single_update`, the update's own forward gives log pi_old and the entropy (written into the batch's); with a
    KL penalty in the loss, `reference` is the policy it is measured against."""

    def __init__(
        self,
        cfg: TrainConfig,
        learner,
        world: World = SINGLE,
        reference=None,
        single_update: bool = False,
        max_new_tokens: int | None = None,
    ):
        self.cfg, self.learner, self.world, self.reference = cfg, learner, world, reference
        self.preset, self.single_update = cfg.algorithm_fields(), single_update
        self.max_new_tokens = cfg.rollout.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.sampling = (cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p)
        a = cfg.algorithm
        self.kl_loss = a.kl_coef > 0 and a.kl_in == "loss"
        # precision.bitwise with a pass of its own for log pi_old: the first update's forward must equal it
        self.check_first = cfg.precision.bitwise and not single_update
        self.divergence: Divergence | None = None
        # algorithm.staleness_correction=rollout: the engine's log mu stands for pi_old in the loss
        self.old_is_mu = a.staleness_correction == "rollout"

    def __call__(self, batch: Batch, shuffle: torch.Generator) -> dict:
        self.batch, self.totals, self.divergence = batch, LossTotals(), None
        G, o = self.cfg.rollout.group_size, self.cfg.optim
        groups = len(batch.rollouts) // G
        per_update = o.train_batch_size // G // self.world.size  # groups of this rank in each update
        for _ in range(o.epochs):
            group_order = torch.randperm(groups, generator=shuffle)
            for g0 in range(0, groups, per_update):
                chosen = group_order[g0 : g0 + per_update].tolist()
                self.one(torch.cat([torch.arange(g * G, (g + 1) * G) for g in chosen]))
        return self.totals.result(self.world)

    def one(self, rows: torch.Tensor) -> None:
        """One optimizer step on `rows`, the loss normalised by the whole update's token and sequence counts."""
        ro = self.batch.rollouts
        counts = self.world.all_reduce_sum(torch.tensor(aggregation_counts(ro.mask[rows]), dtype=torch.long))
        total_tokens, total_seqs = (int(c) for c in counts)
        self.totals.losses.append(0.0)

        def loss_fn(mb: MicroBatch) -> torch.Tensor:
            return self.loss(mb, len(rows), total_tokens, total_seqs)

        result = self.learner.update(
            ro, rows, loss_fn, self.cfg.optim.micro_batch_size, *self.sampling, with_entropy=self.single_update
        )
        self.totals.skipped += int(result.skipped)
        self.totals.norms.append(result.grad_norm)

    def compare_first(self, mb: MicroBatch) -> None:
        """precision.bitwise: the first update's log pi against log pi_old, token by token (in bits)."""
        T = mb.logp.shape[1]
        old = self.batch.logp_old[mb.rows, :T]
        at = first_unequal(mb.logp.detach().float().cpu(), old, mb.rollouts.mask)
        if at is not None:
            row, pos = int(mb.rows[at[0]]), at[1]
            values = (float(old[at]), float(mb.logp[at].detach()))
            self.divergence = Divergence(row, pos, "log pi_old and log pi at the first update's forward", values)

    def loss(self, mb: MicroBatch, update_rows: int, total_tokens: int, total_seqs: int) -> torch.Tensor:
        """One micro-batch's loss: the preset's policy loss (with the KL term where it goes into the loss), weighted
        so that the micro-batch losses sum to the update's; with a single update, its forward gives log pi_old."""
        b, a = self.batch, self.cfg.algorithm
        logp, T = mb.logp, mb.logp.shape[1]
        if self.single_update:
            b.logp_old[mb.rows, :T], b.entropy[mb.rows, :T] = logp.detach().float().cpu(), mb.entropy.float().cpu()
        elif self.check_first and len(self.totals.losses) == 1 and self.divergence is None:
            self.compare_first(mb)
        dev = logp.device
        kl = None
        if self.kl_loss:
            with torch.no_grad():
                kl = KLTerm(a.kl_coef, a.kl_estimator, self.reference.logprobs(mb.batch, *self.sampling))
        old = mb.rollouts.logprobs if self.old_is_mu else b.logp_old[mb.rows, :T]
        loss, terms = policy_loss(
            self.preset,
            logp,
            old.to(dev),
            mb.rollouts.logprobs.to(dev),
            b.advantages[mb.rows].to(dev),
            mb.rollouts.mask.to(dev),
            self.max_new_tokens,
            total_tokens=total_tokens,
            total_seqs=total_seqs,
            kl=kl,
        )
        self.totals.add(len(mb.rows) / (update_rows * self.world.size), terms, float(loss.detach()))
        return loss
