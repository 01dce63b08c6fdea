"""How the learner lays out rows for its forwards: micro-batches of similar length within a token budget, and each
micro-batch as one right-padded row per (prompt, response) pair, or as its distinct prompts run once and the
responses on their keys and values (`SharedPrompts`) where that costs fewer tokens.

    MicroBatcher    which rows go into which micro-batch (the cost model: `length_buckets`, `prefer_shared`)
    SequenceBatch   one micro-batch's rows ready for a forward
    MicroBatch      one micro-batch of an update, as the loss receives it
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unison import threads
from unison.architecture import shares_prompts
from unison.distributed import SINGLE, World
from unison.rollout.base import Rollouts


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
    return (
        len(torch.unique(groups)) < len(groups)
        and int(prompt_lengths.sum()) >= SHARE_MIN_PROMPT * len(groups)
        and shared_cost(groups, prompt_lengths, response_lengths)
        <= SHARE_GAIN * plain_cost(prompt_lengths, response_lengths)
    )


# Hidden activation values per forward/backward on a CPU (padded tokens x hidden size): the learner step per token is
# fastest with micro-batches whose activations stay in cache (docs/benchmarks.md, the learner tables). GPUs want
# the biggest micro-batch that fits.
CPU_MICRO_BATCH_VALUES = 2**18


def split_to(buckets: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """`buckets` with the largest split in two until there are `count` of them (no more than the rows)."""
    buckets = list(buckets)
    while len(buckets) < count and max(map(len, buckets)) > 1:
        i = max(range(len(buckets)), key=lambda j: len(buckets[j]))
        half = len(buckets[i]) // 2
        buckets[i : i + 1] = [buckets[i][:half], buckets[i][half:]]
    return buckets


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
        return cls(
            ids.to(device), gather.to(device), rollouts.response_ids.to(device), rollouts.mask.to(device), replay=replay
        )

    @classmethod
    def shared_layout(
        cls, rollouts: Rollouts, prompts: list[tuple], groups: torch.Tensor, pad_token_id: int, device
    ) -> SequenceBatch:
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for u, p in enumerate(prompts):
            ids[u, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[u, P - len(p) :] = 1
        lengths = torch.tensor([len(p) for p in rollouts.prompt_ids])
        shared = SharedPrompts(ids.to(device), mask.to(device), groups.to(device), lengths.to(device))
        return cls(
            rollouts.response_ids[:, :-1].to(device),
            None,
            rollouts.response_ids.to(device),
            rollouts.mask.to(device),
            shared,
        )


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


@dataclass
class MicroBatcher:
    """Which rows of a rollout batch go into each forward/backward.

    token_budget   padded tokens per forward at most (speed only: gradients are summed over micro-batches either
                   way); 0: no limit
    auto_budget    the budget is the automatic CPU one (`CPU_MICRO_BATCH_VALUES` / hidden size), which shared
                   prompts may override
    share_prompts  run each distinct prompt of a micro-batch once where that costs fewer tokens
    """

    token_budget: int = 0
    auto_budget: bool = False
    share_prompts: bool = False
    world: World = SINGLE

    @classmethod
    def for_model(
        cls,
        config,
        device: torch.device,
        micro_batch_tokens: int = 0,
        share_prompts: bool = True,
        world: World = SINGLE,
        unshareable: bool = False,
    ) -> MicroBatcher:
        """The batcher of a learner on a model of `config` on `device`: on a CPU (one rank) the automatic budget
        CPU_MICRO_BATCH_VALUES / hidden size unless `micro_batch_tokens` sets one, no limit elsewhere nor with several
        ranks (each micro-batch there gathers every weight from the ranks twice, which a cache-sized one does not
        repay). Prompts are shared where the architecture allows (`shares_prompts`), on one rank (every rank must run
        the same forwards, whose all-gathers pair up), and not where `unshareable` (gradient checkpointing, whose
        recomputed prompt pass would append its keys and values again; routing replay)."""
        hidden = getattr(config, "hidden_size", 0) or 0
        auto = (
            max(CPU_MICRO_BATCH_VALUES // hidden, 1) if device.type == "cpu" and hidden and not world.distributed else 0
        )
        share = bool(share_prompts and shares_prompts(config) and not unshareable and not world.distributed)
        return cls(micro_batch_tokens or auto, bool(auto and not micro_batch_tokens), share, world)

    def plan(self, rollouts: Rollouts, size: int, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`length_buckets` of the rows (all, or `rows`; indices into them) by prompt + response length, within the
        token budget. Where rows share prompts and the budget is the automatic CPU one, the buckets cut without it
        are taken instead if, each distinct prompt run once (`SharedPrompts`), they cost at most SHARE_GAIN of the
        tokens: the budget keeps one forward's activations in cache, and a prompt pass that serves more rows is worth
        more. A budget the user set is always kept."""
        plens = torch.tensor([len(p) for p in rollouts.prompt_ids], dtype=torch.long)
        rlens = rollouts.lengths
        if rows is not None:
            plens, rlens = plens[rows], rlens[rows]
        plain = length_buckets(plens + rlens, size, max_tokens=self.token_budget)
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

    def per_row(self, rollouts: Rollouts, size: int, compute) -> tuple[torch.Tensor, ...]:
        """`compute(part)` over the planned micro-batches, each of its tensors ([b, t, ...], on the CPU) put in the
        rows of one [B, T, ...] tensor of its dtype, zeros elsewhere."""
        B, T = rollouts.response_ids.shape
        out = None
        for idx in self.plan(rollouts, size):
            threads.rebalance()  # (the learner's thread: the cores an engine sampling ahead leaves now)
            got = compute(rollouts.select(idx))
            if out is None:
                out = tuple(torch.zeros(B, T, *g.shape[2:], dtype=g.dtype) for g in got)
            for o, g in zip(out, got):
                o[idx, : g.shape[1]] = g
        return out
