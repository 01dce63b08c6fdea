"""The learner: fp32 master weights, log-prob recompute in the train dtype, steps through the precision module,
and weight export to the rollout engine with verification.

Each (prompt, response) pair is laid out as one right-padded row [prompt, response, pad...] and run through the
model's own full-sequence causal forward (no KV cache); only the response positions go through the LM head and the
model's logit transforms (`unison.hf.LogitsAt`), and their logits are upcast to fp32 before the log-softmax
(`unison.sampling`). The model stays in eval mode: no dropout, so the policy trained is the policy that samples.
Where several rows of a micro-batch share a prompt (the samples of a group) and that costs fewer tokens, the
micro-batch runs in two forwards instead: each distinct prompt once, then every response on its prompt's keys and
values (`SharedPrompts`); gradients through those keys and values sum over the rows that share them, so the step is
the same up to rounding.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import torch

from unison.distributed import SINGLE, World, shard
from unison.errors import UserError
from unison.hf import LogitsAt, cache_kwarg, output_cache
from unison.lora import check_rank, check_same_shape, merged_weights, read_adapter, resolve_targets, set_dropout, wrap
from unison.precision import (
    LossScaler,
    MasterWeights,
    PrecisionPolicy,
    StepResult,
    backward,
    cast_module,
    checksum,
    full_tensor,
    local_tensor,
    matmul_mode,
    set_matmul,
    step,
    upcast_lm_head,
)
from unison.rollout.base import Rollouts
from unison.rollout.native import layer_windows
from unison.routing import install_replay, routers
from unison.sampling import entropy as entropy_of
from unison.sampling import process_logits, token_logprobs


def length_buckets(lengths: torch.Tensor, size: int, slack: float = 1.25, max_tokens: int = 0) -> list[torch.Tensor]:
    """Row indices in micro-batches of at most `size` rows, rows of similar length together.

    Rows are sorted by length and cut greedily: a micro-batch closes when it holds `size` rows, when the next row
    would make its padded size (rows x longest row) exceed `slack` times its real tokens, or (with `max_tokens`)
    exceed `max_tokens`. A forward then costs about the tokens it holds rather than rows x the longest response of
    the whole batch (RL responses spread from a few tokens to the limit), at the price of a few more, smaller
    forwards. A row longer than `max_tokens` gets a micro-batch of its own.
    """
    order = torch.argsort(lengths, stable=True)
    lens = lengths[order].clamp(min=1).tolist()
    buckets, start, real = [], 0, 0
    for i, n in enumerate(lens):
        rows = i - start
        padded = (rows + 1) * n
        if rows and (rows == size or padded > slack * (real + n) or (max_tokens and padded > max_tokens)):
            buckets.append(order[start:i])
            start, real = i, 0
        real += n
    if start < len(lens):
        buckets.append(order[start:])
    return buckets


def prompt_groups(prompts: list[list[int]]) -> tuple[torch.Tensor, list[tuple]]:
    """Each row's prompt as an index into the distinct prompts, and those prompts (in order of first use)."""
    index: dict[tuple, int] = {}
    groups = torch.tensor([index.setdefault(tuple(p), len(index)) for p in prompts], dtype=torch.long)
    return groups, list(index)


def plain_cost(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor) -> int:
    """Padded tokens of a one-forward micro-batch: rows x the longest prompt + response."""
    return len(prompt_lengths) * int((prompt_lengths + response_lengths).max())


def shared_cost(groups: torch.Tensor, prompt_lengths: torch.Tensor, response_lengths: torch.Tensor) -> int:
    """Padded tokens of a micro-batch run as distinct prompts, then responses (all but their last token)."""
    return len(torch.unique(groups)) * int(prompt_lengths.max()) + len(groups) * max(int(response_lengths.max()) - 1, 0)


# Prompts are shared (a micro-batch laid out as `SharedPrompts`; on a CPU, micro-batches cut without the token budget)
# where that costs at most this share of the tokens of the other way: the two-forward layout pays a masked attention
# and a second pass of per-call work, which a small saving does not repay
SHARE_GAIN = 0.8
# ... and only for prompts of at least this many tokens on average: a short prompt saves less than a second pass costs
SHARE_MIN_PROMPT = 32


def prefer_shared(groups: torch.Tensor, prompt_lengths: torch.Tensor, response_lengths: torch.Tensor) -> bool:
    """Whether a micro-batch runs each distinct prompt once (`SharedPrompts`): some rows share a prompt, the prompts
    average SHARE_MIN_PROMPT tokens, and that layout costs at most SHARE_GAIN of the tokens of one forward."""
    return (len(torch.unique(groups)) < len(groups)
            and int(prompt_lengths.sum()) >= SHARE_MIN_PROMPT * len(groups)
            and shared_cost(groups, prompt_lengths, response_lengths)
            <= SHARE_GAIN * plain_cost(prompt_lengths, response_lengths))  # fmt: skip


# Hidden activation values per forward/backward on a CPU (padded tokens x hidden size): the learner step per token is
# fastest with micro-batches whose activations stay in cache (docs/benchmarks.md, the learner tables). GPUs want
# the biggest micro-batch that fits.
CPU_MICRO_BATCH_VALUES = 2**18

# models whose prompts can be run once per micro-batch (`SharedPrompts`): full causal attention over a DynamicCache
SHARED_PROMPT_TYPES = {"qwen2", "qwen3", "llama"}


# learning-rate schedules: the share of the peak learning rate after warm-up, at progress p in [0, 1] through the
# rest of the run (floor: optim.min_lr_ratio)
def _constant(p: float, floor: float) -> float:
    return 1.0


def _linear(p: float, floor: float) -> float:
    return 1.0 - (1.0 - floor) * p


def _cosine(p: float, floor: float) -> float:
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


LR_SCHEDULES = {"constant": _constant, "linear": _linear, "cosine": _cosine}


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0, floor: float = 0.0) -> float:
    """The share of the peak learning rate for RL step `step` (0-based) of `total`: a linear warm-up over the first
    `warmup` steps (step 0 of a warm-up gets 1/warmup of it, not 0), then the schedule from 1 at the warm-up's end
    to `floor` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    rest = max(total - warmup - 1, 1)
    return LR_SCHEDULES[schedule](min((step - warmup) / rest, 1.0), floor)


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass. transformers checkpoints a layer only while
    the layer is in train mode, and the learner keeps the model in eval mode (no dropout): the decoder layers alone
    are marked as training, which runs their checkpointing and leaves every module inside them (dropout included)
    in eval mode."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


def split_to(buckets: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """`buckets` with the largest split in two until there are `count` of them (no more than the rows)."""
    buckets = list(buckets)
    while len(buckets) < count and max(map(len, buckets)) > 1:
        i = max(range(len(buckets)), key=lambda j: len(buckets[j]))
        half = len(buckets[i]) // 2
        buckets[i : i + 1] = [buckets[i][:half], buckets[i][half:]]
    return buckets


@dataclass
class MicroBatch:
    """One micro-batch of an update, as `Learner.update` hands it to the loss.

    rows      [b]     the rows of the rollout batch it holds
    rollouts  those rows (`Rollouts.select`)
    batch     the rows laid out for the forward
    logp      [b, T]  log pi_theta of the response tokens, with gradient (0 on padding)
    entropy   [b, T]  the policy's entropy at each response position (without gradient), when asked for
    """

    rows: torch.Tensor
    rollouts: Rollouts
    batch: SequenceBatch
    logp: torch.Tensor
    entropy: torch.Tensor | None = None


class WeightSyncError(RuntimeError):
    """The rollout engine does not hold exactly the learner's weights after a sync."""


@dataclass
class SharedPrompts:
    """The distinct prompts of a micro-batch, run once. U prompts, P = the longest.

    ids        [U, P]  left-padded
    mask       [U, P]  1 on prompt tokens (long)
    inverse    [B]     each row's prompt (an index into ids)
    lengths    [B]     each row's prompt length
    """

    ids: torch.Tensor
    mask: torch.Tensor
    inverse: torch.Tensor
    lengths: torch.Tensor


@dataclass
class SequenceBatch:
    """Rows of [prompt, response] ready for a forward. B rows, L = longest row, T = longest response.

    input_ids  [B, L]  right-padded; with `shared`, the responses but their last token [B, T-1]
    gather     [B, T]  for response token j of row i, the position whose logits predict it (without `shared`)
    targets    [B, T]  the response tokens (pad after the end)
    mask       [B, T]  True on real response tokens
    shared     the distinct prompts, run once (None: every row carries its prompt)
    """

    input_ids: torch.Tensor
    gather: torch.Tensor | None
    targets: torch.Tensor
    mask: torch.Tensor
    shared: SharedPrompts | None = None
    replay: list[torch.Tensor] | None = None  # per router, the experts to route each input token with [B * L, k]

    @classmethod
    def from_rollouts(cls, rollouts: Rollouts, pad_token_id: int, device, share: bool = False) -> SequenceBatch:
        """The rows of `rollouts`; with `share`, as distinct prompts and responses where `prefer_shared`."""
        B, T = rollouts.response_ids.shape
        plens = [len(p) for p in rollouts.prompt_ids]
        lengths = rollouts.lengths.tolist()
        if share and T > 1 and min(plens) > 0:
            groups, distinct = prompt_groups(rollouts.prompt_ids)
            if prefer_shared(groups, torch.tensor(plens), rollouts.lengths):
                return cls.shared_layout(rollouts, distinct, groups, pad_token_id, device)
        L = max(pl + n for pl, n in zip(plens, lengths))
        ids = torch.full((B, max(L, 1)), pad_token_id, dtype=torch.long)
        for i, (p, n) in enumerate(zip(rollouts.prompt_ids, lengths)):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            ids[i, len(p) : len(p) + n] = rollouts.response_ids[i, :n]
        offsets = torch.tensor(plens, dtype=torch.long)[:, None] - 1
        gather = (offsets + torch.arange(T)[None, :]).clamp(max=ids.shape[1] - 1)
        replay = None
        if rollouts.replay is not None:  # the engine's experts at each position, -1 on padding
            first = rollouts.replay[0]
            plan = torch.full((B, ids.shape[1], *first.shape[1:]), -1, dtype=torch.long)
            for i, r in enumerate(rollouts.replay):
                plan[i, : len(r)] = r
            replay = [plan[:, :, layer].reshape(-1, plan.shape[-1]).to(device) for layer in range(plan.shape[2])]
        return cls(ids.to(device), gather.to(device), rollouts.response_ids.to(device), rollouts.mask.to(device),
                   replay=replay)  # fmt: skip

    @classmethod
    def shared_layout(cls, rollouts: Rollouts, prompts: list[tuple], groups: torch.Tensor, pad_token_id: int,
                      device) -> SequenceBatch:
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for u, p in enumerate(prompts):
            ids[u, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[u, P - len(p) :] = 1
        lengths = torch.tensor([len(p) for p in rollouts.prompt_ids])
        shared = SharedPrompts(ids.to(device), mask.to(device), groups.to(device), lengths.to(device))
        return cls(rollouts.response_ids[:, :-1].to(device), None, rollouts.response_ids.to(device),
                   rollouts.mask.to(device), shared)


class Learner:
    """Trains a causal LM with fp32 master weights; forward/backward in the train dtype."""

    def __init__(
        self,
        model,
        policy: PrecisionPolicy,
        device,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_grad_norm: float | None = 1.0,
        pad_token_id: int = 0,
        loss_scaling: bool | None = None,
        scaler_kwargs: dict | None = None,
        matmul: str = "auto",
        micro_batch_tokens: int = 0,
        share_prompts: bool = True,
        reference: bool = False,
        gradient_checkpointing: bool = False,
        world: World = SINGLE,
        routing_replay: bool = False,
        lora=None,
        adapter=None,
    ):
        self.device = torch.device(device)
        self.world = world
        # padded tokens per forward/backward at most (speed only: gradients are summed over micro-batches either way);
        # 0: CPU_MICRO_BATCH_VALUES / hidden size on a CPU, no limit elsewhere, nor with several ranks (each
        # micro-batch there gathers every weight from the ranks twice, which a cache-sized one does not repay)
        hidden = getattr(model.config, "hidden_size", 0) if hasattr(model, "config") else 0
        auto = (max(CPU_MICRO_BATCH_VALUES // hidden, 1) if self.device.type == "cpu" and hidden
                and not world.distributed else 0)  # fmt: skip
        self.micro_batch_tokens = micro_batch_tokens or auto
        self.auto_budget = bool(auto and not micro_batch_tokens)
        self.policy = policy
        # distinct prompts run once per micro-batch where the model's attention is plain causal attention whose
        # cache HF can extend (no sliding window, no other cache kind)
        cfg = getattr(model, "config", None)
        # (not with gradient checkpointing: the recomputed prompt pass would append its keys and values again)
        # (nor across ranks: every rank must run the same forwards, whose FSDP all-gathers pair up)
        self.share_prompts = bool(share_prompts and cfg is not None and cfg.model_type in SHARED_PROMPT_TYPES
                                  and not any(layer_windows(cfg)) and not gradient_checkpointing
                                  and not world.distributed and not routing_replay)  # fmt: skip
        # the policy that is trained is the policy that samples: dropout (and any other train-time randomness, such
        # as a router's jitter) stays off, as in the rollout engine
        # LoRA (`unison.lora`): peft adapts the target layers in place; the model itself then runs the adapters, the
        # base frozen, the adapters alone trainable (so alone with fp32 masters); `peft` keeps peft's wrapper
        self.peft = self._adapt(model, lora, adapter) if lora is not None else None
        self.model = model.to(self.device).eval()
        if hasattr(self.model.config, "use_cache"):
            self.model.config.use_cache = False
        self.matmul = matmul_mode(matmul, self.device, policy.train)
        # a frozen copy of the starting policy in the train dtype, for a KL penalty (`reference_logprobs`)
        self.reference = None
        if reference:
            self.reference = cast_module(copy.deepcopy(self.model), policy.train).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
            set_matmul(self.reference, self.matmul)
            self.reference_logits_at = LogitsAt(self.reference)
        if world.distributed:  # FSDP2: the sharded fp32 parameters are the master weights; it casts for compute
            self.model = shard(self.model.float(), policy.train)
            self.weights = MasterWeights(self.model, torch.float32)
        else:
            self.weights = MasterWeights(self.model, policy.train)
        set_matmul(self.model, self.matmul)
        # names of the LM head's parameters when it runs in fp32 (exported to the engine in fp32)
        self.fp32_names: set[str] = set()
        if policy.lm_head_fp32:
            if world.distributed:
                raise UserError("precision.lm_head=fp32 with several ranks is not supported yet; train on one rank "
                                "or leave precision.lm_head=same")  # fmt: skip
            self.fp32_names = upcast_lm_head(self.model, policy.train)
            if self.reference is not None:
                upcast_lm_head(self.reference, policy.train)
        self.logits_at = LogitsAt(self.model)
        # routing replay (R3): an MoE model routes each token with the experts the engine chose for it
        self.routing_replay = routing_replay
        self.moe = bool(routers(self.model))  # an MoE model: the routing mismatch can be measured
        # (installed on every MoE model: without a plan a router runs as before; `replaying` turns replay on for a
        # while, as the engine self-test does)
        self.routers = install_replay(self.model) if self.moe else []
        if routing_replay and not self.routers:
            raise UserError("moe.routing_replay needs a mixture-of-experts model (Qwen2-MoE, Qwen3-MoE, Mixtral); "
                            f"this {cfg.model_type if cfg is not None else 'model'} has no routers")  # fmt: skip
        if gradient_checkpointing:
            enable_checkpointing(self.model)
        # PyTorch's fused AdamW (one kernel over all master weights) where it has one: the same update to an ulp as
        # the per-tensor loop, in a fraction of its time
        fused = self.device.type in ("cpu", "cuda") or None
        self.optimizer = torch.optim.AdamW(self.weights.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                           fused=fused)  # fmt: skip
        enabled = policy.needs_loss_scaling if loss_scaling is None else loss_scaling
        self.scaler = LossScaler(enabled=enabled, **(scaler_kwargs or {}))
        self.max_grad_norm = max_grad_norm
        self.pad_token_id = pad_token_id
        if lora is not None and lora.dropout > 0:  # the adapters' dropout alone in train mode (after LogitsAt's probe)
            set_dropout(self.model, True)

    @staticmethod
    def _adapt(model, lora, adapter):
        """peft's LoRA wrapper around `model` as `lora` (a LoraConfig section) asks, checked first: targets that
        match layers, a rank each layer can take, and, going on from a saved adapter, one of that shape."""
        targets = resolve_targets(model, lora.target_modules)
        check_rank(model, targets, lora.rank)
        if adapter is not None:
            check_same_shape(adapter, lora.rank, lora.alpha, targets)
        wrapped = wrap(model, lora.rank, lora.alpha, targets, lora.dropout)
        if adapter is not None:  # go on from a saved adapter (before any copy of the model is taken)
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            saved = read_adapter(adapter, trainable)
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(saved[n])
        return wrapped

    @classmethod
    def from_pretrained(cls, model_dir, policy: PrecisionPolicy, device, **kwargs) -> Learner:
        from unison.models import load_model, load_tokenizer

        tok = load_tokenizer(model_dir)
        model = load_model(model_dir, device=device, dtype=torch.float32)
        return cls(model, policy, device, pad_token_id=tok.pad_token_id or 0, **kwargs)

    # ---- forward --------------------------------------------------------------------------------------------
    def micro_batches(self, rollouts: Rollouts, size: int, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`length_buckets` of the rows (all, or `rows`; indices into them) by prompt + response length, within this
        learner's token budget per micro-batch. Where rows share prompts and the budget is the automatic CPU one, the
        buckets cut without it are taken instead if, each distinct prompt run once (`SharedPrompts`), they cost at
        most SHARE_GAIN of the tokens: the budget keeps one forward's activations in cache, and a prompt pass that
        serves more rows is worth more. A budget the user set is always kept."""
        plens = torch.tensor([len(p) for p in rollouts.prompt_ids], dtype=torch.long)
        rlens = rollouts.lengths
        if rows is not None:
            plens, rlens = plens[rows], rlens[rows]
        plain = length_buckets(plens + rlens, size, max_tokens=self.micro_batch_tokens)
        if self.world.distributed:  # every rank runs as many forwards as the rank that needs most
            return split_to(plain, self.world.all_reduce_max(len(plain)))
        if not self.share_prompts or not self.auto_budget:
            return plain
        prompts = rollouts.prompt_ids if rows is None else [rollouts.prompt_ids[i] for i in rows.tolist()]
        groups, distinct = prompt_groups(prompts)
        if len(distinct) == len(prompts) or not all(prompts):
            return plain
        free = length_buckets(plens + rlens, size)

        def cost(b):  # tokens of a micro-batch, laid out as SequenceBatch.from_rollouts would
            if prefer_shared(groups[b], plens[b], rlens[b]):
                return shared_cost(groups[b], plens[b], rlens[b])
            return plain_cost(plens[b], rlens[b])

        return free if sum(map(cost, free)) <= SHARE_GAIN * sum(map(cost, plain)) else plain

    def batch(self, rollouts: Rollouts) -> SequenceBatch:
        return SequenceBatch.from_rollouts(rollouts, self.pad_token_id, self.device, share=self.share_prompts)

    def response_logits(self, batch: SequenceBatch, reference: bool = False) -> torch.Tensor:
        """The model's own logits (its LM head and logit transforms) at the response positions, in the train dtype;
        with `reference`, the frozen starting policy's. -> [B, T, V]"""
        if batch.shared is not None:
            return self.shared_prompt_logits(batch, self.reference if reference else self.model)
        logits_at = self.reference_logits_at if reference else self.logits_at
        if batch.replay is None or not self.routing_replay or reference:
            return logits_at(batch.gather, input_ids=batch.input_ids)
        for router, plan in zip(self.routers, batch.replay):  # route with the engine's experts
            router.replay_plan = plan
        try:
            return logits_at(batch.gather, input_ids=batch.input_ids)
        finally:
            for router in self.routers:
                router.replay_plan = None

    @contextlib.contextmanager
    def replaying(self):
        """Within: an MoE learner routes every token of rollouts that carry the engine's experts (`Rollouts.replay`)
        with them, whatever moe.routing_replay says."""
        was, self.routing_replay = self.routing_replay, bool(self.routers)
        try:
            yield
        finally:
            self.routing_replay = was

    def shared_prompt_logits(self, batch: SequenceBatch, model=None) -> torch.Tensor:
        """Logits that predict the response tokens [B, T, V]: the distinct prompts run once (left-padded), their keys
        and values given to every row of them, then the responses on top."""
        model = self.model if model is None else model
        sp = batch.shared
        cache_kw = cache_kwarg(model)
        positions = (sp.mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=sp.ids, attention_mask=sp.mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)  # fmt: skip
        cache = output_cache(out)
        cache.batch_select_indices(sp.inverse)  # one copy per row; the backward sums the rows' gradients per prompt
        B, T1 = batch.input_ids.shape
        attention = torch.cat((sp.mask[sp.inverse], sp.mask.new_ones(B, T1)), 1)
        positions = sp.lengths[:, None] + torch.arange(T1, device=sp.lengths.device)[None, :]
        logits = model(input_ids=batch.input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                       **{cache_kw: cache}).logits  # fmt: skip
        return torch.cat((out.logits[sp.inverse], logits), 1)

    def logprobs(self, batch: SequenceBatch, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 with_entropy: bool = False, reference: bool = False):
        """log pi of each response token (fp32, 0 on padding), with gradient; with `reference`, the frozen starting
        policy's (no gradient). -> [B, T] (and entropy [B, T])"""
        if reference:
            with torch.no_grad():
                logits = self.response_logits(batch, reference=True)
        else:
            logits = self.response_logits(batch)
        logp = token_logprobs(logits, batch.targets, temperature, top_k, top_p).masked_fill(~batch.mask, 0.0)
        if not with_entropy:
            return logp
        with torch.no_grad():
            ent = entropy_of(logits, temperature).masked_fill(~batch.mask, 0.0)
        return logp, ent

    def _per_row(self, rollouts: Rollouts, micro_batch_size: int, compute) -> tuple[torch.Tensor, ...]:
        """`compute(part)` over micro-batches of similar length, each of its tensors ([b, t, ...], on the CPU) put
        in the rows of one [B, T, ...] tensor of its dtype, zeros elsewhere."""
        B, T = rollouts.response_ids.shape
        out = None
        for idx in self.micro_batches(rollouts, micro_batch_size):
            got = compute(rollouts.select(idx))
            if out is None:
                out = tuple(torch.zeros(B, T, *g.shape[2:], dtype=g.dtype) for g in got)
            for o, g in zip(out, got):
                o[idx, : g.shape[1]] = g
        return out

    @torch.no_grad()
    def distributions(self, rollouts: Rollouts, micro_batch_size: int = 64, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
        """log pi(.) at every response position: the learner's whole distribution (the same processing as the
        sampler's, -inf outside a top-k/top-p support, 0 after the end). -> [B, T, V] fp32 on the CPU"""

        def compute(part):
            batch = self.batch(part)
            logq = process_logits(self.response_logits(batch), temperature, top_k, top_p).log_softmax(-1)
            return (logq.masked_fill(~batch.mask[..., None], 0.0).float().cpu(),)

        return self._per_row(rollouts, micro_batch_size, compute)[0]

    @torch.no_grad()
    def routing(self, rollouts: Rollouts, micro_batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """An MoE model's router logits [B, T, L, E] and chosen experts [B, T, L, k] at the inputs of the response
        positions (each position that predicts a response token), from the learner's full-sequence forward."""
        from unison.routing import RoutingRecorder

        def compute(part):
            batch = SequenceBatch.from_rollouts(part, self.pad_token_id, self.device, share=False)
            with RoutingRecorder(self.model) as rec:
                self.response_logits(batch)
            b, L = batch.input_ids.shape
            rows, where = torch.arange(b)[:, None], batch.gather.to(torch.long)  # [b, 1], [b, t]
            logits = torch.stack([c[0][0].view(b, L, -1)[rows, where] for c in rec.calls], 2)
            experts = torch.stack([c[0][1].view(b, L, -1)[rows, where] for c in rec.calls], 2)
            return logits.float().cpu(), experts.cpu()

        return self._per_row(rollouts, micro_batch_size, compute)

    @torch.no_grad()
    def recompute(self, rollouts: Rollouts, micro_batch_size: int = 64, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, with_entropy: bool = False, reference: bool = False):
        """log pi_old (with `reference`, the frozen starting policy's log-probs) for a whole rollout batch without
        gradient, in micro-batches of similar length (less padding).
        -> [B, T] fp32 on the CPU (and the entropy [B, T] with `with_entropy`)"""

        def compute(part):
            res = self.logprobs(self.batch(part), temperature, top_k, top_p, with_entropy=with_entropy,
                                reference=reference)  # fmt: skip
            return tuple(x.float().cpu() for x in (res if with_entropy else (res,)))

        out = self._per_row(rollouts, micro_batch_size, compute)
        return out if with_entropy else out[0]

    # ---- update ---------------------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def update(self, rollouts: Rollouts, rows: torch.Tensor, loss_fn, micro_batch_size: int = 64,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, with_entropy: bool = False,
               ) -> StepResult:  # fmt: skip
        """One optimizer step on the rows `rows` of `rollouts`, in micro-batches of similar length.

        For each micro-batch the learner computes log pi_theta, `loss_fn(MicroBatch)` returns its loss (weighted so
        that the micro-batch losses sum to the step's loss, over every rank), and the loss is backpropagated before
        the next micro-batch runs; then the precision module unscales, clips and steps or skips (`precision.step`)."""
        self.weights.zero_grad()
        parts = self.micro_batches(rollouts, micro_batch_size, rows)
        for i, idx in enumerate(parts):
            if self.world.distributed:  # sharded: gradients reduced over the ranks once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(parts) - 1)
            part_rows = rows[idx]
            part = rollouts.select(part_rows)
            batch = self.batch(part)
            res = self.logprobs(batch, temperature, top_k, top_p, with_entropy=with_entropy)
            logp, ent = res if with_entropy else (res, None)
            backward(loss_fn(MicroBatch(part_rows, part, batch, logp, ent)), self.weights, self.scaler)
        return self.finish_step()

    def step(self, losses) -> StepResult:
        """One optimizer step over plain micro-batch losses (an iterable; a generator computes each after the
        previous one's backward)."""
        self.weights.zero_grad()
        for loss in losses:
            backward(loss, self.weights, self.scaler)
        return self.finish_step()

    def finish_step(self) -> StepResult:
        reduce = self.world.all_reduce_sum if self.world.distributed else None
        return step(self.weights, self.optimizer, self.scaler, self.max_grad_norm, all_reduce=reduce)

    # ---- weight sync ----------------------------------------------------------------------------------------
    def export_weights(self, dtype: torch.dtype | None = None):
        """(name, master weight cast to `dtype`) for every parameter; the rollout dtype by default."""
        dtype = dtype or self.policy.rollout
        if self.peft is not None:  # W + scale * B A for the adapted layers
            out = merged_weights(self.model, dict(self.weights.named_master()), dtype, self.policy.train,
                                 self.fp32_names)  # fmt: skip
        else:
            out = [(name, full_tensor(t.to(torch.float32 if name in self.fp32_names else dtype)))
                   for name, t in self.weights.named_master()]  # cast, then gather  # fmt: skip
        # a value that rounds to -0.0 sent as +0.0 (x + 0.0): vLLM's loader stores every zero as +0.0, and the two
        # holders must agree to the bit; a zero's sign changes no product or sum the engine computes
        return [(name, t + 0.0) for name, t in out]

    def sync(self, engine) -> dict:
        """Load the master weights, cast to the engine's dtype, into the engine, then verify the engine's checksum
        (on every rank: each rank's engine receives the full weights)."""
        t0 = time.perf_counter()
        exported = self.export_weights(engine.dtype)
        engine.load_weights(exported)
        t1 = time.perf_counter()
        expected = checksum(exported)
        got = engine.weights_checksum()
        if got != expected:
            raise WeightSyncError(
                f"weight sync failed: the rollout engine's checksum {got} differs from the learner's {expected} "
                "(weights cast to the rollout dtype); the engine is not sampling from the policy being trained"
            )
        t2 = time.perf_counter()
        return {"perf/sync_seconds": t2 - t0, "perf/sync_verify_seconds": t2 - t1, "sync/checksum_ok": 1.0}

    # ---- state ----------------------------------------------------------------------------------------------
    def master_state(self) -> dict[str, torch.Tensor]:
        """The full fp32 master weights by name (gathered from every rank's shard when sharded)."""
        return {n: full_tensor(t).clone() for n, t in self.weights.named_master()}

    def optimizer_state(self) -> dict:
        """The optimizer's state: the whole of it in one process; this rank's shard of it (plain tensors) with
        several ranks."""
        return {"state": {k: {n: local_tensor(v) for n, v in st.items()} for k, st in self.optimizer.state_dict()[
            "state"].items()}, "param_groups": self.optimizer.state_dict()["param_groups"]}

    def state_dict(self) -> dict:
        return {"master": self.master_state(), "optimizer": self.optimizer_state(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.world.distributed:  # each rank's shard of the full master weights
            from torch.distributed.tensor import distribute_tensor

            with torch.no_grad():
                for name, p in zip(self.weights.names, self.weights.params):
                    full = state["master"][name].to(device=p.device, dtype=p.dtype)
                    p.copy_(distribute_tensor(full, p.device_mesh, p.placements))
        else:
            self.weights.load_master(state["master"])
        self.optimizer.load_state_dict(self._as_sharded(state["optimizer"]))
        self.scaler.load_state_dict(state["scaler"])

    def _as_sharded(self, optimizer_state: dict) -> dict:
        """An optimizer state of plain tensors given the sharding of the parameters they belong to."""
        if not self.world.distributed:
            return optimizer_state
        from torch.distributed.tensor import DTensor

        out = {}
        for k, st in optimizer_state["state"].items():
            p = self.weights.params[int(k)]
            out[k] = {n: DTensor.from_local(v, p.device_mesh, p.placements) if torch.is_tensor(v) and v.dim() else v
                      for n, v in st.items()}  # fmt: skip
        return {"state": out, "param_groups": optimizer_state["param_groups"]}

