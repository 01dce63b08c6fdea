"""The learner: fp32 master weights, log-prob recompute in the train dtype, steps through the precision module,
and weight export to the rollout engine with verification.

Each (prompt, response) pair is laid out as one right-padded row [prompt, response, pad...] and run through the
model's own full-sequence causal forward (no KV cache); only the response positions go through the LM head and the
model's logit transforms (`unison.hf.LogitsAt`), and their logits are upcast to fp32 before the log-softmax
(`unison.sampling`). The model stays in eval mode: no dropout, so the policy trained is the policy that samples.
Where several rows of a micro-batch share a prompt (the samples of a group) and that costs fewer tokens, the
micro-batch runs in two forwards instead: each distinct prompt once, then every response on its prompt's keys and
values (`unison.batching.SharedPrompts`); gradients through those keys and values sum over the rows that share them,
so the step is the same up to rounding.

The model arrives prepared (`unison.setup.Setup.learner`): a LoRA model is peft's wrapper, whose adapters alone are
trained; an MoE model's routers can replay the engine's experts (`unison.routing.install_replay`).
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from unison import threads
from unison.batching import MicroBatch, MicroBatcher, SequenceBatch
from unison.config import ModelConfig, MoeConfig, OptimConfig, PrecisionConfig
from unison.distributed import SINGLE, World, shard
from unison.exact import make_exact
from unison.hf import LogitsAt, cache_kwarg, output_cache
from unison.lora import is_peft, merge_in_forward, merged_weights, set_dropout
from unison.matmul import gemm_kernel, matmul_mode, set_matmul
from unison.models import load_model, load_tokenizer
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
    step,
    upcast_lm_head,
)
from unison.rollout.base import Rollouts
from unison.routing import RoutingRecorder, install_replay, routers
from unison.sampling import chunked_entropy, chunked_token_logprobs, log_softmax, process_logits


class WeightSyncError(RuntimeError):
    """The rollout engine does not hold exactly the learner's weights after a sync."""


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass. transformers checkpoints a layer only while
    the layer is in train mode, and the learner keeps the model in eval mode (no dropout): the decoder layers alone
    are marked as training, which runs their checkpointing and leaves every module inside them (dropout included)
    in eval mode."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


class PolicyForward:
    """A model's log-probs of response tokens over `SequenceBatch` rows: its own logits (LM head and logit
    transforms) at the response positions, upcast to fp32 before the log-softmax. An MoE model's routers, where
    `replay` is on and a batch carries the engine's experts, route each token with them."""

    def __init__(self, model, replay: bool = False, exact: bool = False):
        self.model = model
        self.logits_at = LogitsAt(model)
        self.routers = routers(model)
        self.replay = replay
        self.exact = exact  # precision.bitwise: the log-softmax of `unison.exact`

    def response_logits(self, batch: SequenceBatch) -> torch.Tensor:
        """The model's own logits at the response positions, in its dtype. -> [B, T, V]"""
        if batch.shared is not None:
            return self.shared_prompt_logits(batch)
        if batch.replay is None or not self.replay:
            return self.logits_at(batch.gather, input_ids=batch.input_ids)
        for router, plan in zip(self.routers, batch.replay):  # route with the engine's experts
            router.replay_plan = plan
        try:
            return self.logits_at(batch.gather, input_ids=batch.input_ids)
        finally:
            for router in self.routers:
                router.replay_plan = None

    def shared_prompt_logits(self, batch: SequenceBatch) -> torch.Tensor:
        """Logits that predict the response tokens [B, T, V]: the distinct prompts run once (left-padded), their keys
        and values given to every row of them, then the responses on top."""
        model, sp = self.model, batch.shared
        positions = (sp.mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=sp.ids, attention_mask=sp.mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        cache.batch_select_indices(sp.inverse)  # one copy per row; the backward sums the rows' gradients per prompt
        B, T1 = batch.input_ids.shape
        attention = torch.cat((sp.mask[sp.inverse], sp.mask.new_ones(B, T1)), 1)
        positions = sp.lengths[:, None] + torch.arange(T1, device=sp.lengths.device)[None, :]
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            **{cache_kwarg(model): cache},
        ).logits
        return torch.cat((out.logits[sp.inverse], logits), 1)

    def logprobs(
        self,
        batch: SequenceBatch,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        with_entropy: bool = False,
    ):
        """log pi of each response token (fp32, 0 on padding), with gradient where the model has one.
        -> [B, T] (and the entropy [B, T], without gradient, with `with_entropy`)"""
        logits = self.response_logits(batch)
        logp = chunked_token_logprobs(logits, batch.targets, temperature, top_k, top_p, self.exact)
        logp = logp.masked_fill(~batch.mask, 0.0)
        if not with_entropy:
            return logp
        with torch.no_grad():
            ent = chunked_entropy(logits, temperature).masked_fill(~batch.mask, 0.0)
        return logp, ent


def frozen_copy(model, policy: PrecisionPolicy, matmul: str = "auto", gemm: str = "auto") -> PolicyForward:
    """The starting policy of a KL penalty: a frozen copy of `model` (taken before training changes it, and before
    routing replay is installed) in the train dtype, computed as the learner computes."""
    device = next(model.parameters()).device
    reference = cast_module(copy.deepcopy(model), policy.train).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    set_matmul(reference, matmul_mode(matmul, device, policy.train), gemm_kernel(gemm, device))
    forward = PolicyForward(reference)
    if policy.lm_head_fp32:
        upcast_lm_head(reference, policy.train)
    return forward


def load_verified(engine, exported: list) -> dict:
    """Load `exported` ((name, tensor) in the engine's dtype) into `engine`, then check the engine's checksum against
    theirs (WeightSyncError where they differ). -> the load's metrics"""
    t0 = time.perf_counter()
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


class Learner:
    """Trains a causal LM with fp32 master weights; forward/backward in the train dtype.

    model          the prepared model (`Setup.learner`): peft's wrapper for LoRA, routers installed for replay
    policy         the rollout, train and master dtypes
    pad_token_id   what pads rows (never read: masked)
    optim          AdamW, clipping and micro-batching (`OptimConfig`)
    precision      loss scaling (`PrecisionConfig`: loss_scaling, init_scale, growth_interval, min_scale)
    model_cfg      matmul mode and gradient checkpointing (`ModelConfig`)
    moe            routing replay (`MoeConfig`)
    world          the ranks (FSDP2 sharding with several)
    """

    def __init__(
        self,
        model,
        policy: PrecisionPolicy,
        *,
        pad_token_id: int = 0,
        optim: OptimConfig | None = None,
        precision: PrecisionConfig | None = None,
        model_cfg: ModelConfig | None = None,
        moe: MoeConfig | None = None,
        world: World = SINGLE,
    ):
        optim, precision = optim or OptimConfig(), precision or PrecisionConfig()
        model_cfg, moe = model_cfg or ModelConfig(), moe or MoeConfig()
        self.peft = model if is_peft(model) else None  # peft's wrapper, whose checkpoint is its adapter
        model = model.get_base_model() if self.peft is not None else model  # runs the adapters
        self.device = next(model.parameters()).device
        self.policy, self.world, self.pad_token_id = policy, world, pad_token_id
        self.model = model.eval()  # no dropout (nor a router's jitter): the policy trained is the one that samples
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        self.matmul = matmul_mode(model_cfg.matmul, self.device, policy.train)
        self.bitwise = precision.bitwise  # `unison.exact`: log-probs equal to the bit to the engine's
        # exact mode's products are PyTorch's own, a block of rows at a time (`unison.exact.blocked_linear`)
        self.gemm = "torch" if self.bitwise else gemm_kernel(model_cfg.gemm, self.device)
        self.batcher = MicroBatcher.for_model(
            model.config,
            self.device,
            optim.micro_batch_tokens,
            optim.share_prompts,
            world,
            model_cfg.gradient_checkpointing or moe.routing_replay or self.bitwise,
        )
        self._cast(policy, world)
        if self.bitwise:
            make_exact(self.model)
            if self.peft is not None:  # the engine's merged weights, to the bit (`unison.lora.merged_forward`)
                merge_in_forward(self.model)
        install_replay(self.model)  # an MoE model's routers: inert without a plan (routing replay, the self-test)
        self.forward = PolicyForward(self.model, replay=moe.routing_replay, exact=self.bitwise)
        if model_cfg.gradient_checkpointing:
            enable_checkpointing(self.model)
        self._optimizer(optim, precision)
        if self.peft is not None and self.peft.peft_config["default"].lora_dropout > 0:
            set_dropout(self.model, True)  # the adapters' dropout alone in train mode (after LogitsAt's probe)

    def _cast(self, policy: PrecisionPolicy, world: World) -> None:
        """The compute copy in the train dtype beside the fp32 master weights (FSDP2's sharded fp32 parameters with
        several ranks, which casts for compute), the matmul mode, and an LM head in fp32 where asked."""
        if world.distributed:
            self.model = shard(self.model.float(), policy.train)
            self.weights = MasterWeights(self.model, torch.float32)
        else:
            self.weights = MasterWeights(self.model, policy.train)
        set_matmul(self.model, self.matmul, self.gemm)
        self.fp32_names: set[str] = set()  # the LM head's parameters when it runs in fp32 (exported in fp32)
        if policy.lm_head_fp32:
            self.fp32_names = upcast_lm_head(self.model, policy.train)

    def _optimizer(self, optim: OptimConfig, precision: PrecisionConfig) -> None:
        """PyTorch's fused AdamW (one kernel over all master weights, the same update to an ulp as the per-tensor
        loop) where it has one; the loss scaler (dynamic for fp16 training unless precision.loss_scaling says)."""
        fused = self.device.type in ("cpu", "cuda") or None
        self.optimizer = torch.optim.AdamW(
            self.weights.params,
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=1e-8,
            weight_decay=optim.weight_decay,
            fused=fused,
        )
        p = precision
        enabled = self.policy.needs_loss_scaling if p.loss_scaling == "auto" else p.loss_scaling == "on"
        self.scaler = LossScaler(
            enabled=enabled, init_scale=p.init_scale, growth_interval=p.growth_interval, min_scale=p.min_scale
        )
        self.max_grad_norm = optim.max_grad_norm or None

    @classmethod
    def from_pretrained(cls, model_dir, policy: PrecisionPolicy, device="cpu", **sections) -> Learner:

        tok = load_tokenizer(model_dir)
        model = load_model(model_dir, device=device, dtype=torch.float32)
        return cls(model, policy, pad_token_id=tok.pad_token_id or 0, **sections)

    # ---- forward --------------------------------------------------------------------------------------------
    @property
    def moe(self) -> bool:
        """Whether the model is a mixture of experts (its routing mismatch can be measured)."""
        return bool(self.forward.routers)

    @property
    def routing_replay(self) -> bool:
        return self.forward.replay

    @contextlib.contextmanager
    def replaying(self):
        """Within: an MoE learner routes every token of rollouts that carry the engine's experts (`Rollouts.replay`)
        with them, whatever moe.routing_replay says."""
        was, self.forward.replay = self.forward.replay, self.moe
        try:
            yield
        finally:
            self.forward.replay = was

    def batch(self, rollouts: Rollouts, share: bool | None = None) -> SequenceBatch:
        share = self.batcher.share_prompts if share is None else share
        return SequenceBatch.from_rollouts(rollouts, self.pad_token_id, self.device, share=share)

    def logprobs(
        self,
        batch: SequenceBatch,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        with_entropy: bool = False,
    ):
        """log pi_theta of each response token (fp32, 0 on padding), with gradient. -> [B, T] (and entropy)"""
        return self.forward.logprobs(batch, temperature, top_k, top_p, with_entropy)

    @torch.no_grad()
    def recompute(
        self,
        rollouts: Rollouts,
        micro_batch_size: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        with_entropy: bool = False,
        policy: PolicyForward | None = None,
    ):
        """log pi_old for a whole rollout batch without gradient (with `policy`, that policy's: the reference), in
        micro-batches of similar length. -> [B, T] fp32 on the CPU (and the entropy [B, T] with `with_entropy`)"""
        policy = policy or self.forward

        def compute(part):
            res = policy.logprobs(self.batch(part), temperature, top_k, top_p, with_entropy=with_entropy)
            return tuple(x.float().cpu() for x in (res if with_entropy else (res,)))

        out = self.batcher.per_row(rollouts, micro_batch_size, compute)
        return out if with_entropy else out[0]

    @torch.no_grad()
    def distributions(
        self,
        rollouts: Rollouts,
        micro_batch_size: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> torch.Tensor:
        """log pi(.) at every response position: the learner's whole distribution (the same processing as the
        sampler's, -inf outside a top-k/top-p support, 0 after the end). -> [B, T, V] fp32 on the CPU"""

        def compute(part):
            batch = self.batch(part)
            logits = self.forward.response_logits(batch)
            logq = log_softmax(
                process_logits(logits, temperature, top_k, top_p, self.forward.exact), self.forward.exact
            )
            return (logq.masked_fill(~batch.mask[..., None], 0.0).float().cpu(),)

        return self.batcher.per_row(rollouts, micro_batch_size, compute)[0]

    @torch.no_grad()
    def routing(self, rollouts: Rollouts, micro_batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """An MoE model's router logits [B, T, L, E] and chosen experts [B, T, L, k] at the inputs of the response
        positions (each position that predicts a response token), from the learner's full-sequence forward."""

        def compute(part):
            batch = self.batch(part, share=False)
            with RoutingRecorder(self.model) as rec:
                self.forward.response_logits(batch)
            b, L = batch.input_ids.shape
            rows, where = torch.arange(b)[:, None], batch.gather.to(torch.long)  # [b, 1], [b, t]
            logits = torch.stack([c[0][0].view(b, L, -1)[rows, where] for c in rec.calls], 2)
            experts = torch.stack([c[0][1].view(b, L, -1)[rows, where] for c in rec.calls], 2)
            return logits.float().cpu(), experts.cpu()

        return self.batcher.per_row(rollouts, micro_batch_size, compute)

    # ---- update ---------------------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def update(
        self,
        rollouts: Rollouts,
        rows: torch.Tensor,
        loss_fn,
        micro_batch_size: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        with_entropy: bool = False,
    ) -> StepResult:
        """One optimizer step on the rows `rows` of `rollouts`, in micro-batches of similar length.

        For each micro-batch the learner computes log pi_theta, `loss_fn(MicroBatch)` returns its loss (weighted so
        that the micro-batch losses sum to the step's loss, over every rank), and the loss is backpropagated before
        the next micro-batch runs; then the precision module unscales, clips and steps or skips (`precision.step`)."""
        self.weights.zero_grad()
        parts = self.batcher.plan(rollouts, micro_batch_size, rows)
        for i, idx in enumerate(parts):
            threads.rebalance()  # the cores an engine sampling ahead leaves now
            if self.world.distributed:  # sharded: gradients reduced over the ranks once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(parts) - 1)
            part_rows = rows[idx]
            part = rollouts.select(part_rows)
            batch = self.batch(part)
            res = self.logprobs(batch, temperature, top_k, top_p, with_entropy=with_entropy)
            logp, ent = res if with_entropy else (res, None)
            backward(loss_fn(MicroBatch(part_rows, part, batch, logp, ent)), self.weights, self.scaler)
        reduce = self.world.all_reduce_sum if self.world.distributed else None
        threads.rebalance()
        return step(self.weights, self.optimizer, self.scaler, self.max_grad_norm, all_reduce=reduce)

    # ---- weight sync ----------------------------------------------------------------------------------------
    def export_weights(self, dtype: torch.dtype | None = None):
        """(name, master weight cast to `dtype`) for every parameter; the rollout dtype by default."""
        dtype = dtype or self.policy.rollout
        if self.peft is not None:  # W + scale * B A for the adapted layers
            adapters = dict(self.weights.named_master())
            if self.bitwise:  # A and B as the learner's forward holds them, in the train dtype (`merged_forward`)
                adapters = {n: t.to(self.policy.train) for n, t in adapters.items()}
            out = merged_weights(self.model, adapters, dtype, self.policy.train, self.fp32_names)
            # a value that rounds to -0.0 sent as +0.0 (x + 0.0): vLLM's loader stores every zero as +0.0, and the two
            # holders must agree to the bit; a zero's sign changes no product or sum the engine computes
            return [(name, t + 0.0) for name, t in out]
        # each a copy made once (cast, then gathered), so +0.0 is added in place: no second copy of the weights in
        # flight during the sync
        return [
            (name, full_tensor(t.to(torch.float32 if name in self.fp32_names else dtype, copy=True)).add_(0.0))
            for name, t in self.weights.named_master()
        ]

    def sync(self, engine) -> dict:
        """Load the master weights, cast to the engine's dtype, into the engine, then verify the engine's checksum
        (on every rank: each rank's engine receives the full weights)."""
        t0 = time.perf_counter()
        metrics = load_verified(engine, self.export_weights(engine.dtype))
        metrics["perf/sync_seconds"] = time.perf_counter() - t0
        return metrics

    # ---- state ----------------------------------------------------------------------------------------------
    def master_state(self) -> dict[str, torch.Tensor]:
        """The full fp32 master weights by name (gathered from every rank's shard when sharded)."""
        return {n: full_tensor(t).clone() for n, t in self.weights.named_master()}

    def optimizer_state(self) -> dict:
        """The optimizer's state: the whole of it in one process; this rank's shard of it (plain tensors) with
        several ranks."""
        state = self.optimizer.state_dict()
        return {
            "state": {k: {n: local_tensor(v) for n, v in st.items()} for k, st in state["state"].items()},
            "param_groups": state["param_groups"],
        }

    def state_dict(self) -> dict:
        return {"master": self.master_state(), "optimizer": self.optimizer_state(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.world.distributed:  # each rank's shard of the full master weights
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

        out = {}
        for k, st in optimizer_state["state"].items():
            p = self.weights.params[int(k)]
            out[k] = {
                n: DTensor.from_local(v, p.device_mesh, p.placements) if torch.is_tensor(v) and v.dim() else v
                for n, v in st.items()
            }
        return {"state": out, "param_groups": optimizer_state["param_groups"]}
