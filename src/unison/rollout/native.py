"""The native rollout engine: batched sampling with a preallocated KV cache on a Hugging Face model's weights.

The decode loop runs its own attention over a static cache (one SDPA call per layer per token, the new key/value
written in place), and fuses elementwise work the way inference engines do (RMSNorm, rotary embedding and the
SiLU gate computed in fp32 and rounded once, where the learner's Hugging Face forward rounds after each op), so its
kernels differ from the learner's full-sequence forward the way an inference engine's do: same weights, other
reduction orders and roundings. Llama-family decoders (Qwen2, Qwen3, Llama, Mistral; sliding windows included, per
layer) and their mixture-of-experts variants (Qwen2-MoE, Qwen3-MoE, Mixtral) take this path where it computes what
the model computes (`fast_path_blocker`: rotary angles that depend on the position alone, no logit transform); any
other causal LM falls back to the model's own forward with its own cache (`_HFDecode`), its logit transforms
included. A sparse MoE block (router, top-k, renormalisation, shared expert) is called as the model's own module on
the hidden state in the rollout dtype, in the prefill and in every decode step (`is_sparse_moe`), so its routing is
the model's and the routing recorder sees it.

Per call of `generate` the engine packs its weights for decoding once (`DecodeWeights`): q/k/v and gate/up
concatenated into one matrix product each, and, in `fp32-accumulate` mode, the fp16/bf16 weights held as fp32 copies
of exactly the same values, so no token pays for an upcast. A decode step attends with two batched matrix products
over the cache (a single query row gains nothing from a flash kernel), applies rotary to q and k at once, and reads
the angles from a table built once. Where the products run in fp32 (`_FlatStep`) the step keeps its activations as
fp32 [B, hidden] rounded to the rollout dtype where the layer-by-layer forward rounds, in about half the operations.
The FP16 overflow guard (`unison.overflow`) is given the activations at its named check points as the decode
passes them (`overflow_guard`); an MLP that the guard moved to fp32, or whose output it may replace, is called as a
module.

Prompts are left-padded to a common length; identical prompts (the samples of a group) are run through the
prefill once and their cache copied to each. Finished rows are dropped from the batch once a quarter of it is done
(a copy of the cache); the loop ends when every row is done or `max_new_tokens` is reached. Log-probs: see
`unison.rollout.base` and `unison.sampling`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from unison.architecture import fast_path_blocker, layer_windows
from unison.attribution import upcast
from unison.exact import left_padding, make_exact
from unison.hf import cache_kwarg, output_cache, takes_logits_to_keep
from unison.matmul import (
    compute_dtype,
    gemm_kernel,
    matmul_mode,
    onednn_linear,
    onednn_linear_add,
    pack_weight,
    set_matmul,
)
from unison.models import load_model, load_tokenizer
from unison.overflow import OverflowGuard
from unison.precision import cast_module, checksum, upcast_lm_head
from unison.rollout.base import (
    Rollouts,
    SamplingParams,
    check_prompts,
    cut_at_stop_strings,
    response_text,
    stop_string_end,
)
from unison.routing import RoutingRecorder, prefill_experts, replay_rows, routers, stack_decode
from unison.sampling import draw, log_softmax, process_logits, sample


class StaticKVCache:
    """Keys and values for every layer, preallocated in one tensor: [layers, 2 (k, v), B, kv_heads, max_len, head_dim].

    In `fp32-accumulate` mode the cache is fp32 holding values already rounded to the rollout dtype (what the
    kernels would read up from a fp16/bf16 cache), so attention needs no cast per token."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.kv = torch.empty((layers, 2, batch, kv_heads, max_len, head_dim), dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, kv_heads, S, D] at positions start..start+S and return the cache up to there."""
        end = start + k.shape[2]
        self.kv[layer, 0, :, :, start:end] = k
        self.kv[layer, 1, :, :, start:end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the batch rows where `rows` is False."""
        self.kv = self.kv[:, :, rows]


def fused_rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm computed in fp32 with one rounding to x's dtype at the end (a fused inference kernel)."""
    return rms_norm_fp32(x, norm.weight.float(), norm.variance_epsilon)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fused_rms_norm with the weight already in fp32."""
    xf = x.float()
    return (weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def fused_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """Gated MLP with act(gate) * up computed in fp32 and rounded once (a fused silu-and-mul kernel)."""
    return mlp.down_proj((mlp.act_fn(mlp.gate_proj(x).float()) * mlp.up_proj(x).float()).to(x.dtype))


def is_sparse_moe(mlp) -> bool:
    """Whether a decoder layer's MLP is a sparse MoE block (router and experts, a shared expert in Qwen2-MoE), which
    the fast path calls as the model's module; False for a dense gated MLP (Qwen2-MoE's `mlp_only_layers`)."""
    return hasattr(mlp, "experts")


def moe_block(mlp, x: torch.Tensor) -> torch.Tensor:
    """The sparse MoE block called as the model's module on x [B, S, hidden] or [B, hidden] (rollout dtype)."""
    return mlp(x) if x.dim() == 3 else mlp(x[:, None])[:, 0]


def _packed(compute: torch.dtype, *linears, rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases, zeros where a layer has none) of `linears` stacked along the output, in `compute`.
    With `rows`, the fp32 weight in oneDNN's layout for products of about that many rows (`unison.matmul.
    pack_weight`). Otherwise, on a CPU the weight [out, in] is a view of a copy laid out [in, out], the order in
    which `x @ W.T` reads it (decode steps, whose weights come back from memory every token, are faster so);
    elsewhere a single layer's own tensor is used where it already is in `compute`."""

    def stacked(tensors):
        return (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).to(compute)

    weight = stacked([m.weight for m in linears])
    if rows:
        weight = pack_weight(weight, rows)
    elif weight.device.type == "cpu":
        weight = weight.t().contiguous().t()
    if all(m.bias is None for m in linears):
        return weight, None
    return weight, stacked([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


class DecodeWeights:
    """The engine's weights packed for decoding: q/k/v and gate/up concatenated, in the compute dtype (fp32 copies
    of the fp16/bf16 values in `fp32-accumulate` mode; with `rows`, in oneDNN's layout for products of that many
    rows), norm weights in fp32, and the modules and constants each layer needs (looked up once, not per token). A
    sparse MoE layer's MLP is not packed (`gate_up`, `down` and `act_fn` None, `sparse` True): it runs as the model's
    module. Built from the parameters at the start of every `generate`, so it always holds what `weights_checksum`
    reads."""

    @torch.no_grad()
    def __init__(self, model, compute: torch.dtype, head_fp32: bool = False, rows: int = 0):
        self.layers = []
        windows = layer_windows(model.config)
        for layer, window in zip(model.model.layers, windows):
            a, m = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            sparse = is_sparse_moe(m)
            self.layers.append(
                {
                    "qkv": _packed(compute, a.q_proj, a.k_proj, a.v_proj, rows=rows),
                    "o": _packed(compute, a.o_proj, rows=rows),
                    "gate_up": None if sparse else _packed(compute, m.gate_proj, m.up_proj, rows=rows),
                    "down": None if sparse else _packed(compute, m.down_proj, rows=rows),
                    "ln1": (ln1.weight.float(), ln1.variance_epsilon),
                    "ln2": (ln2.weight.float(), ln2.variance_epsilon),
                    "qk_norm": (a.q_norm, a.k_norm) if hasattr(a, "q_norm") else None,
                    "scaling": a.scaling,
                    "mlp": m,
                    "sparse": sparse,
                    "act_fn": None if sparse else m.act_fn,
                    "window": window,
                }
            )
        norm = model.model.norm
        self.norm = (norm.weight.float(), norm.variance_epsilon)
        self.head = _packed(torch.float32 if head_fp32 else compute, model.lm_head, rows=rows)


class NativeEngine:
    """Samples from a copy of the policy held in the rollout dtype."""

    def __init__(
        self,
        model,
        dtype: torch.dtype,
        device: torch.device,
        seed: int = 0,
        pad_token_id: int = 0,
        matmul: str = "auto",
        tokenizer=None,
        lm_head: str = "same",
        bitwise: bool = False,
        gemm: str = "auto",
    ):
        self.tokenizer = tokenizer  # decodes responses for stop strings
        self.model = cast_module(model, dtype).to(device).eval()
        self.matmul = matmul_mode(matmul, torch.device(device), dtype)
        # oneDNN for the decode's products where they all run in fp32 (`unison.matmul.gemm_kernel`); exact mode's
        # products are PyTorch's own, a block of rows at a time (`unison.exact.blocked_linear`)
        fp32_products = compute_dtype(self.matmul, dtype) == torch.float32
        self.gemm = gemm_kernel(gemm, device) if fp32_products and not bitwise else "torch"
        set_matmul(self.model, self.matmul, self.gemm)
        self.lm_head_fp32 = lm_head == "fp32"  # the LM head in fp32, its logits not rounded (`upcast_lm_head`)
        if self.lm_head_fp32:
            upcast_lm_head(self.model, dtype)
        self.bitwise = bitwise  # precision.bitwise: the model's own forward in exact mode
        if bitwise:
            make_exact(self.model)
        self.checks: OverflowGuard | None = None  # the fp16 activation guard's check points (`overflow_guard`)
        self.forced_fallback = ""  # why the model's own forward decodes where the fast path could (`upcast_components`)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.released: dict[str, torch.Size] = {}  # parameters freed until the next load (`release_weights`)
        self.dtype = dtype
        self.device = torch.device(device)
        self.pad_token_id = pad_token_id
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        cfg = model.config
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @classmethod
    def from_pretrained(
        cls,
        model_dir,
        dtype: torch.dtype,
        device,
        seed: int = 0,
        matmul: str = "auto",
        attn_implementation: str = "auto",
        lm_head: str = "same",
        bitwise: bool = False,
        gemm: str = "auto",
    ):
        tok = load_tokenizer(model_dir)
        model = load_model(model_dir, device=device, dtype=dtype, attn_implementation=attn_implementation)
        return cls(
            model,
            dtype=dtype,
            device=device,
            seed=seed,
            pad_token_id=tok.pad_token_id or 0,
            matmul=matmul,
            tokenizer=tok,
            lm_head=lm_head,
            bitwise=bitwise,
            gemm=gemm,
        )

    def close(self) -> None:
        """Nothing to free beyond what the garbage collector takes (here for the `RolloutEngine` protocol)."""

    def upcast_components(self, components) -> None:
        """Compute `components` of the model in fp32 from now on (`unison.attribution.upcast`); decoding then runs
        the model's own modules (the fallback path)."""

        upcast(self.model, self.dtype, components)
        self.forced_fallback = "component attribution runs the model's own modules"

    def overflow_guard(self, mode: str, where: str) -> OverflowGuard | None:
        """The fp16 activation guard of this engine's decode (`unison.overflow`), where it runs in fp16 and `mode`
        is not off: the fast path calls its check points, the fallback runs the model's modules, which the guard
        hooks."""
        fast = self.decode_path()[0] == "fast"
        self.checks = OverflowGuard.attach(self.model, mode, where, hooks="mlp" if fast else "all")
        return self.checks

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def decode_path(self) -> tuple[str, str]:
        """("fast", "") or ("fallback", why)."""
        if self.bitwise:
            return "fallback", "precision.bitwise: the model's own forward in exact mode, every row at once"
        why = fast_path_blocker(self.config) or self.forced_fallback
        return ("fallback", why) if why else ("fast", "")

    def describe(self) -> str:
        """One line: this engine, its dtype and the decode path it runs."""
        path, why = self.decode_path()
        how = "fast path" if path == "fast" else f"fallback to the model's own forward ({why})"
        head = ", LM head fp32" if self.lm_head_fp32 else ""
        return f"native engine, {self.dtype}".replace("torch.", "") + f"{head}, {how}"

    # ---- weights -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named_tensors) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            p = params[name]
            if name in self.released:  # freed by `release_weights`: the tensor given becomes the parameter's own
                shape = self.released.pop(name)
                if (tensor.shape, tensor.dtype, tensor.device) == (shape, p.dtype, p.device) and tensor.is_contiguous():
                    p.data = tensor.detach()
                    continue
                p.data = torch.empty(shape, dtype=p.dtype, device=p.device)
            p.copy_(tensor)
        if self.released:
            raise ValueError(
                f"load_weights left {len(self.released)} released parameters empty (e.g. {next(iter(self.released))})"
            )

    @torch.no_grad()
    def release_weights(self) -> None:
        """Free every parameter's storage until the next `load_weights`, which must then give them all and whose
        tensors (in the engine's dtype, contiguous) become the parameters themselves, not copied: the caller hands
        them over (`Learner.sync` exports fresh ones). A synchronous run calls it once the batch is sampled: the
        engine has nothing to do until the sync, and its copy of the policy would otherwise sit beside the learner's
        activations, gradients and optimizer state."""
        for name, p in self.model.named_parameters():  # a tied weight once
            self.released[name] = p.shape
            p.data = p.data.new_empty(0)

    def weights_checksum(self) -> str:
        return checksum(self.model.named_parameters())

    def text_of(self, prompt: list[int], ids: list[int]) -> str:
        """A response's text after its prompt, as stop strings are matched against it (`response_text`)."""
        return response_text(self.tokenizer, prompt, ids)

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    # ---- the model, layer by layer ----------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matrix products run in: fp32 in `fp32-accumulate` mode, else the rollout dtype."""
        return compute_dtype(self.matmul, self.dtype)

    def _linear(self, x: torch.Tensor, packed: tuple) -> torch.Tensor:
        """x [.., in] in the rollout dtype -> x @ W.T + b, rounded to the rollout dtype once."""
        weight, bias = packed
        if self.gemm == "onednn":
            return onednn_linear(x.float(), weight, bias).to(self.dtype)
        return F.linear(x.to(weight.dtype), weight, bias).to(self.dtype)

    def _attention(self, w: dict, x, cos, sin, cache: StaticKVCache, index: int, start: int, mask):
        """x [B, S, hidden]; cos, sin [B, S, 1, D] fp32 (sin with rotate-half's sign folded in, see _StaticDecode)."""
        B, S, _ = x.shape
        H, Hkv, D = self.num_heads, self.kv_heads, self.head_dim
        if self.checks is not None:
            self.checks.attention_input(index, x)
        qkv = self._linear(x, w["qkv"]).view(B, S, H + 2 * Hkv, D)
        qk, v = qkv[:, :, : H + Hkv], qkv[:, :, H + Hkv :]
        if w["qk_norm"] is not None:  # Qwen3
            q_norm, k_norm = w["qk_norm"]
            qk = torch.cat((fused_rms_norm(q_norm, qk[:, :, :H]), fused_rms_norm(k_norm, qk[:, :, H:])), 2)
        # fused rotary on q and k at once, one rounding: x cos + rotate_half(x) sin == x cos + roll(x, D/2) sin_signed
        qk32 = qk.float()
        qk = (qk32 * cos + qk32.roll(D // 2, -1) * sin).to(self.dtype)
        cdt = cache.dtype
        q = qk[:, :, :H].transpose(1, 2)  # [B, H, S, D]
        keys, values = cache.write(index, start, qk[:, :, H:].transpose(1, 2).to(cdt), v.transpose(1, 2).to(cdt))
        if w["window"] is not None:  # a key is seen from fewer than `window` slots ahead (slots and positions differ
            # by the row's left padding alone)
            k_slot = torch.arange(start + S, device=x.device)
            q_slot = start + torch.arange(S, device=x.device)
            mask = mask & (k_slot[None, :] > q_slot[:, None] - w["window"])  # [B, 1, S, start+S]
        if S == 1:  # decode: one query row per sequence, two batched products over the cache [B, Hkv, L, D]
            qg = q.to(cdt).reshape(B, Hkv, H // Hkv, D)  # query heads grouped by the key/value head they share
            scores = (qg @ keys.transpose(-1, -2)).float() * w["scaling"]  # [B, Hkv, G, L]
            scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
            out = (scores.softmax(-1).to(cdt) @ values).to(self.dtype).view(B, 1, H * D)
        else:
            out = F.scaled_dot_product_attention(
                q.to(cdt), keys, values, attn_mask=mask, scale=w["scaling"], enable_gqa=True
            )
            out = out.to(self.dtype).transpose(1, 2).reshape(B, S, H * D)
        return self._linear(out, w["o"])

    def _mlp(self, w: dict, x: torch.Tensor, index: int) -> torch.Tensor:
        """Gated MLP: gate and up in one product, act(gate) * up in fp32 rounded once (a fused silu-and-mul); a sparse
        MoE block, or an MLP the overflow guard watches as a module: the model's module."""
        mlp = w["mlp"]
        if w["sparse"]:
            return moe_block(mlp, x)
        if self.checks is not None:
            self.checks.mlp_input(index, x)
            if self.checks.mlp_as_module(index):
                return fused_mlp(mlp, x)
        gate, up = self._linear(x, w["gate_up"]).chunk(2, dim=-1)
        return self._linear((w["act_fn"](gate.float()) * up.float()).to(self.dtype), w["down"])

    def _forward(self, weights: DecodeWeights, ids, cos, sin, cache: StaticKVCache, start: int, mask) -> torch.Tensor:
        """Logits of the last position. ids [B, S]; cos, sin [B, S, 1, D]; mask [B, 1, S, start+S] bool."""
        x = self.model.model.embed_tokens(ids)
        for i, w in enumerate(weights.layers):
            x = x + self._attention(w, rms_norm_fp32(x, *w["ln1"]), cos, sin, cache, i, start, mask)
            x = x + self._mlp(w, rms_norm_fp32(x, *w["ln2"]), i)
        if self.checks is not None:
            self.checks.final_residual(x[:, -1:])
        x = rms_norm_fp32(x[:, -1:], *weights.norm)
        if self.checks is not None:
            self.checks.head_input(x)
        if self.lm_head_fp32:  # fp32 logits from the fp32 head, not rounded
            weight, bias = weights.head
            product = onednn_linear if self.gemm == "onednn" else F.linear
            logits = product(x.float(), weight, bias)[:, -1]
        else:
            logits = self._linear(x, weights.head)[:, -1]  # [B, V] in the rollout dtype
        if self.checks is not None:
            self.checks.head_output(logits, fp32_head=self.lm_head_fp32)
        return logits

    # ---- sampling ------------------------------------------------------------------------------------------
    def _completed_stop_string(
        self, tokens: torch.Tensor, done: torch.Tensor, prompts: list[list[int]], strings, tail: int
    ) -> torch.Tensor:
        """Rows not yet done whose tokens so far [B, t] hold a stop string: found in the decoded last `tail` tokens,
        then confirmed on the whole response after its prompt (a row dropped from the batch must be cut where
        `cut_at_stop_strings` will cut it). A stop string the tail misses is cut at the end all the same. -> [B] bool"""
        hit = torch.zeros_like(done)
        live = (~done).nonzero().flatten().tolist()
        if not live:
            return hit
        texts = self.tokenizer.batch_decode(tokens[live, -tail:].tolist(), skip_special_tokens=True)
        for row, text in zip(live, texts):
            if any(x in text for x in strings):
                text_of = lambda ids, p=prompts[row]: self.text_of(p, ids)  # noqa: E731
                hit[row] = stop_string_end(tokens[row].tolist(), text_of, strings) is not None
        return hit

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        progress: bool = False,
        keep_distributions: bool = False,
        keep_routing: bool = False,
    ) -> Rollouts:
        """Sample one response per prompt; with `keep_distributions`, also every distribution sampled from
        (`Rollouts.distributions`, [B, T, V] fp32 on the CPU: mind the memory for a large vocabulary); with
        `keep_routing`, an MoE model's router decisions (`Rollouts.routing`, `Rollouts.replay`), recorded on the
        routers as modules in either decode path. With precision.bitwise, every row decodes in one batch, each
        prompt padded on the left and realigned inside the exact attention (`unison.exact.left_padding`)."""
        if self.released:
            raise RuntimeError("the engine's weights are released (release_weights): load_weights before generate")
        return self._generate_recorded(prompt_ids, params, progress, keep_distributions, keep_routing)

    def _generate_recorded(self, prompt_ids, params, progress, keep_distributions, keep_routing) -> Rollouts:
        """`_generate`, with an MoE model's routing recorded where asked."""
        if not (keep_routing and routers(self.model)):
            return self._generate(prompt_ids, params, progress, keep_distributions)
        with RoutingRecorder(self.model) as rec:
            out = self._generate(prompt_ids, params, progress, keep_distributions, rec.sources)
        B, T = out.response_ids.shape
        calls = rec.by_row(B)  # the fast path's deduplicated prefill and compacted steps, in row order
        logits, idx = stack_decode(calls, B, T)
        out.routing = (logits.cpu(), idx.cpu())
        out.replay = replay_rows(
            prefill_experts(calls, B).cpu(), idx.cpu(), [len(p) for p in prompt_ids], out.lengths.tolist()
        )
        return out

    def _generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        progress: bool,
        keep_distributions: bool,
        sources: list | None = None,
    ) -> Rollouts:
        """`generate` without routing; `sources`, where given, receives each forward's row layout
        (`RoutingRecorder.sources`)."""
        check_prompts(prompt_ids)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer (NativeEngine(..., tokenizer=...))")
        B, N, dev = len(prompt_ids), params.max_new_tokens, self.device
        P = max(len(p) for p in prompt_ids)
        prompts = torch.full((B, P), self.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            prompts[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        pad_left = torch.tensor([P - len(p) for p in prompt_ids], device=dev)  # [B]
        stop = torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=dev)
        decoder = (_StaticDecode if self.decode_path()[0] == "fast" else _HFDecode)(self, prompts.to(dev), pad_left, N)
        decoder.sources = sources
        logits = decoder.prefill()
        keep = keep_distributions and params.temperature > 0
        slots = _Slots(B, N, logits.shape[-1] if keep else 0, self.pad_token_id, dev)
        T = self._decode(decoder, logits, slots, params, stop, prompt_ids, progress)
        slots.finish(T)
        return self._rollouts(prompt_ids, slots, stop, T, params.stop_strings)

    def _decode(
        self,
        decoder,
        logits: torch.Tensor,
        slots: _Slots,
        params: SamplingParams,
        stop: torch.Tensor,
        prompt_ids: list[list[int]],
        progress: bool,
    ) -> int:
        """Sample token after token until every row is done or max_new_tokens is reached. -> the steps taken"""
        N, strings, dev = params.max_new_tokens, params.stop_strings, self.device
        tail = 8 + 4 * max(map(len, strings), default=0)  # tokens enough to hold a stop string completed lately
        bar = tqdm(total=N, desc="sampling", unit="tok", leave=False, disable=not progress)
        T = N
        for t in range(N):
            if slots.dists is not None:  # the same draw as `sample`, from a distribution kept whole
                logq = process_logits(logits, params.temperature, params.top_k, params.top_p, self.bitwise)
                logq = log_softmax(logq, self.bitwise)
                slots.slot_dists[:, t] = logq
                tok, lp = draw(logq, self.generator)
            else:
                tok, lp = sample(logits, self.generator, params.temperature, params.top_k, params.top_p, self.bitwise)
            slots.slot_tokens[:, t], slots.slot_logprobs[:, t] = tok, lp
            if params.stop_token_ids:
                slots.done |= torch.isin(tok, stop)
            if strings and t % 8 == 7:  # stop early where a stop string appeared (the exact cut is made below)
                live_prompts = [prompt_ids[i] for i in slots.rows.tolist()]
                slots.done |= self._completed_stop_string(
                    slots.slot_tokens[:, : t + 1], slots.done, live_prompts, strings, tail
                )
            bar.update(1)
            if t == N - 1:
                break
            if dev.type == "cpu" or t % 8 == 7:  # on a GPU, look at the host only every 8 tokens
                n_done = int(slots.done.sum())
                if n_done == len(slots.done):
                    T = t + 1
                    break
                # drop finished rows from the batch once a quarter of it is done (a copy of the cache)
                if 4 * n_done >= len(slots.done) and decoder.compact(~slots.done):
                    tok = slots.drop_done(t, tok)
            logits = decoder.step(t, tok)
        bar.close()
        return T

    def _rollouts(self, prompt_ids: list[list[int]], slots: _Slots, stop: torch.Tensor, T: int, strings) -> Rollouts:
        """The sampled rows as `Rollouts`: each response ends at its first stop token (included), or after T tokens,
        and at the token that completes a stop string."""
        hits = torch.isin(slots.tokens[:, :T], stop)
        finished = hits.any(1)
        lengths = torch.where(finished, hits.int().argmax(1) + 1, T)
        T = int(lengths.max().item())
        mask = torch.arange(T, device=self.device)[None, :] < lengths[:, None]
        dists = slots.dists
        out = Rollouts(
            prompt_ids=[list(p) for p in prompt_ids],
            response_ids=slots.tokens[:, :T].masked_fill(~mask, self.pad_token_id).cpu(),
            logprobs=slots.logprobs[:, :T].masked_fill(~mask, 0.0).cpu(),
            mask=mask.cpu(),
            lengths=lengths.cpu(),
            finished=finished.cpu(),
            distributions=dists[:, :T].masked_fill(~mask[..., None], 0.0).cpu() if dists is not None else None,
        )
        return cut_at_stop_strings(out, self.text_of, strings, self.pad_token_id) if strings else out


class _Slots:
    """The rows of a batch as they are sampled. Per slot (a row still decoded): its original row (`rows`), its
    tokens, log-probs (and distributions, where kept) so far, whether it stopped (`done`). A stopped row goes on
    sampling until it is dropped (`drop_done`); what it samples after its stop token is cut at the end. `tokens`,
    `logprobs` and `dists` hold every original row's, written when a slot is dropped and at the end (`finish`)."""

    def __init__(self, B: int, N: int, vocab: int, pad_token_id: int, dev: torch.device):
        self.tokens = torch.full((B, N), pad_token_id, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros((B, N), dtype=torch.float32, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.slot_tokens, self.slot_logprobs = torch.empty_like(self.tokens), torch.empty_like(self.logprobs)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.dists = self.slot_dists = None
        if vocab:
            self.dists = torch.zeros((B, N, vocab), dtype=torch.float32, device=dev)
            self.slot_dists = torch.zeros_like(self.dists)

    def drop_done(self, t: int, tok: torch.Tensor) -> torch.Tensor:
        """Write the stopped slots' first t + 1 tokens into their rows and drop them. -> the live slots' `tok`"""
        done, rows = self.done, self.rows
        self.tokens[rows[done], : t + 1] = self.slot_tokens[done, : t + 1]
        self.logprobs[rows[done], : t + 1] = self.slot_logprobs[done, : t + 1]
        if self.dists is not None:
            self.dists[rows[done], : t + 1] = self.slot_dists[done, : t + 1]
            self.slot_dists = self.slot_dists[~done]
        live = ~done
        self.rows, self.done = rows[live], done[live]
        self.slot_tokens, self.slot_logprobs = self.slot_tokens[live], self.slot_logprobs[live]
        return tok[live]

    def finish(self, T: int) -> None:
        """Write the live slots' first T tokens into their rows."""
        self.tokens[self.rows, :T] = self.slot_tokens[:, :T]
        self.logprobs[self.rows, :T] = self.slot_logprobs[:, :T]
        if self.dists is not None:
            self.dists[self.rows, :T] = self.slot_dists[:, :T]


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a 2-D tensor: the index of the first occurrence of each distinct row, and for every row the position of
    its distinct row in that list (x == x[first][inverse])."""
    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    rows = torch.arange(len(x), device=x.device)
    first = torch.full((int(inverse.max()) + 1,), len(x), device=x.device).scatter_reduce_(0, inverse, rows, "amin")
    return first, inverse


class _StaticDecode:
    """Prefill and decode steps over a static KV cache; finished rows can be dropped (`compact`)."""

    def __init__(self, engine: NativeEngine, prompts, pad_left, max_new: int):
        B, P = prompts.shape
        dev = prompts.device
        self.engine, self.prompts, self.pad_left, self.P = engine, prompts, pad_left, P
        # where a recorder asks (`RoutingRecorder.sources`): per forward, the row of its batch holding each row
        self.sources: list | None = None
        self.source = None  # the decode steps' (None: every row, in order; -1 for a row dropped)
        self.B, self.rows = B, torch.arange(B, device=dev)  # the rows of `prompts` still decoded
        rows = B if engine.gemm == "onednn" else 0
        self.weights = DecodeWeights(engine.model, engine.compute_dtype, engine.lm_head_fp32, rows)
        L = P + max_new
        self.cache = StaticKVCache(engine.num_layers, B, engine.kv_heads, L, engine.head_dim, engine.compute_dtype, dev)
        self.valid = torch.arange(L, device=dev)[None, :] >= pad_left[:, None]  # [B, P+N] no left padding
        # rotary angles of every position, once (the fp32 values the model's rotary module gives per call), and sin
        # with rotate_half's sign folded in: rotate_half(x) * sin == roll(x, D/2) * cat(-sin[:D/2], sin[D/2:])
        cos, sin = engine.model.model.rotary_emb(torch.zeros(1, device=dev), torch.arange(L, device=dev)[None])
        half = cos.shape[-1] // 2
        self.cos = cos[0].float()[:, None]  # [L, 1, D]
        self.sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1).float()[:, None]
        fp32 = engine.compute_dtype == torch.float32
        self.flat = _FlatStep(engine, self.weights, self.cache, self.valid) if fp32 else None

    def prefill(self) -> torch.Tensor:
        """Run the prompts, filling the cache up to P; -> the logits of each row's last prompt position [B, V].

        Identical prompts (a group's samples) are run once: their keys, values and logits are copied to each of them."""
        P, dev, e = self.P, self.prompts.device, self.engine
        q_pos = torch.arange(P, device=dev)
        causal = q_pos[None, :] <= q_pos[:, None]  # [P, P]
        # padded query rows attend to themselves only, so no row is empty (an empty row gives NaN)
        mask = (causal[None] & self.valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)[None]
        positions = (q_pos[None, :] - self.pad_left[:, None]).clamp(min=0)  # [B, P]
        first, inverse = distinct_rows(torch.cat((self.pad_left[:, None], self.prompts), 1))
        if self.sources is not None:
            self.sources.append(None if len(first) == len(inverse) else inverse)
        if len(first) == len(inverse):
            return e._forward(
                self.weights, self.prompts, self.cos[positions], self.sin[positions], self.cache, 0, mask[:, None]
            )
        cache = StaticKVCache(e.num_layers, len(first), e.kv_heads, P, e.head_dim, self.cache.dtype, dev)
        pos = positions[first]
        logits = e._forward(
            self.weights, self.prompts[first], self.cos[pos], self.sin[pos], cache, 0, mask[first, None]
        )
        self.cache.kv[:, :, :, :, :P] = cache.kv[:, :, inverse]  # in place: the decode step holds views of the cache
        return logits[inverse]

    def step(self, t: int, tok: torch.Tensor) -> torch.Tensor:
        cur = self.P + t
        pos = cur - self.pad_left  # [B] each row's rotary position: its cache slot less its left padding
        if self.sources is not None:
            self.sources.append(self.source)
        if self.flat is not None:
            return self.flat(tok, cur, self.cos[pos], self.sin[pos])
        mask = self.valid[:, None, None, : cur + 1]  # [B, 1, 1, cur+1]
        pos = pos[:, None]  # [B, 1]
        return self.engine._forward(self.weights, tok[:, None], self.cos[pos], self.sin[pos], self.cache, cur, mask)

    def compact(self, keep: torch.Tensor) -> bool:
        self.cache.keep(keep)
        self.valid, self.pad_left = self.valid[keep], self.pad_left[keep]
        self.rows = self.rows[keep]
        if self.sources is not None:
            self.source = torch.full((self.B,), -1, device=keep.device)
            self.source[self.rows] = torch.arange(len(self.rows), device=keep.device)
        if self.flat is not None:
            self.flat.keep(self.valid)
        return True


class _FlatStep:
    """One decode step for engines whose matrix products run in fp32 (fp32 rollouts, and fp16/bf16 in
    `fp32-accumulate` mode), with activations kept as fp32 [B, hidden] tensors that hold values rounded to the
    rollout dtype at the same points as `NativeEngine._forward` (after each product, norm, rotary, attention,
    activation and residual add). It computes what `_forward` computes for one token, in about half the
    operations: no dtype conversions where there is nothing to convert, the residual add fused into the product in
    fp32, the attention scale and padding mask folded into one batched product (`baddbmm` over a bias row built
    once), and the per-step positions, angles and mask looked up once for all layers. On this kind of machine a
    decode step is bound by the number of operations, not by arithmetic."""

    def __init__(self, engine: NativeEngine, weights: DecodeWeights, cache: StaticKVCache, valid: torch.Tensor):
        model = engine.model
        self.dtype = engine.dtype
        self.exact = engine.dtype == torch.float32  # no rounding to emulate
        self.onednn = engine.gemm == "onednn"  # weights in oneDNN's layout; else laid out for torch.mm (`_transposed`)
        self.H, self.Hkv, self.D = engine.num_heads, engine.kv_heads, engine.head_dim
        self.cache = cache
        embed = model.model.embed_tokens
        # the weight itself in the rollout dtype (a head in fp32 tied to it: its values rounded, as the lookup's),
        # upcast row by row as tokens are looked up
        self.embed = embed.weight.to(engine.dtype)
        self.checks = engine.checks
        self.layers = []
        layout = (lambda packed: packed) if self.onednn else _transposed
        for w in weights.layers:
            mlp, act = w["mlp"], w["act_fn"]
            self.layers.append(
                (
                    w["ln1"],
                    w["ln2"],
                    layout(w["qkv"]),
                    layout(w["o"]),
                    None if w["sparse"] else layout(w["gate_up"]),
                    None if w["sparse"] else layout(w["down"]),
                    mlp,
                    w["qk_norm"],
                    w["scaling"],
                    F.silu if type(act) is torch.nn.SiLU else act,
                    w["window"],
                )
            )
        self.norm = weights.norm
        self.head = layout(weights.head)
        self.head_fp32 = engine.lm_head_fp32
        self.set_mask(valid)
        self.set_views()

    def set_mask(self, valid: torch.Tensor) -> None:
        """The additive attention bias [B * kv_heads, 1, max_len]: 0 where a row may attend, -inf on its padding."""
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, float("-inf"))
        self.bias = bias.repeat_interleave(self.Hkv, 0)[:, None]

    def keep(self, valid: torch.Tensor) -> None:
        """After the cache dropped rows: the mask and views of the rows left (`valid` of those rows)."""
        self.set_mask(valid)
        self.set_views()

    def set_views(self) -> None:
        """Per layer, views of the cache: keys and values [B, kv_heads, max_len, D] (to write), and keys transposed
        [B * kv_heads, D, max_len] and values [B * kv_heads, max_len, D] (to read)."""
        kv = self.cache.kv
        B, Lmax = kv.shape[2], kv.shape[4]
        self.views = [
            (
                kv[i, 0],
                kv[i, 1],
                kv[i, 0].view(B * self.Hkv, Lmax, self.D).transpose(1, 2),
                kv[i, 1].view(B * self.Hkv, Lmax, self.D),
            )
            for i in range(kv.shape[0])
        ]

    def rnd(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded to the rollout dtype, kept in fp32."""
        return x if self.exact else x.to(self.dtype).float()

    def norm_heads(self, norm, x: torch.Tensor) -> torch.Tensor:
        """Qwen3's per-head RMSNorm of q or k [B, heads, D], in fp32, rounded once."""
        return self.rnd(fused_rms_norm(norm, x))

    def linear(self, x: torch.Tensor, packed: tuple, residual: torch.Tensor | None = None) -> torch.Tensor:
        """rnd(x @ W.T + b), plus a residual: fused into the product in fp32, or added after rounding (as the
        engine's fp16/bf16 kernels would: product rounded, then the sum rounded)."""
        w_t, b = packed
        if self.onednn:
            if residual is not None and self.exact:
                return onednn_linear_add(x, w_t, b, residual)
            out = self.rnd(onednn_linear(x, w_t, b))
            return out if residual is None else self.rnd(residual + out)
        if residual is not None and self.exact:
            out = torch.addmm(residual, x, w_t)
            return out if b is None else out.add_(b)
        out = self.rnd(torch.mm(x, w_t) if b is None else torch.addmm(b, x, w_t))
        return out if residual is None else self.rnd(residual + out)

    def __call__(self, tok: torch.Tensor, cur: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (fp32 holding rollout-dtype values) for tokens tok [B] at cache position `cur`; cos, sin
        [B, 1, D] the rotary angles of each row's position."""
        H, Hkv, D = self.H, self.Hkv, self.D
        B, G, L = tok.shape[0], H // Hkv, cur + 1
        rnd, linear, checks = self.rnd, self.linear, self.checks
        x = F.embedding(tok, self.embed).float()  # [B, hidden]
        bias = self.bias[:, :, :L]
        for i, (ln1, ln2, qkv_w, o_w, gu_w, down_w, mlp, qk_norm, scaling, act, window) in enumerate(self.layers):
            h = rnd(F.rms_norm(x, (x.shape[-1],), *ln1))
            if checks is not None:
                checks.attention_input(i, h)
            qkv = linear(h, qkv_w).view(B, H + 2 * Hkv, D)
            qk = qkv[:, : H + Hkv]
            if qk_norm is not None:  # Qwen3
                q_norm, k_norm = qk_norm
                qk = torch.cat((self.norm_heads(q_norm, qk[:, :H]), self.norm_heads(k_norm, qk[:, H:])), 1)
            qk = rnd(torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin))  # rotary, see _StaticDecode
            k_slots, v_slots, keys_t, values = self.views[i]
            k_slots.select(2, cur).copy_(qk[:, H:])
            v_slots.select(2, cur).copy_(qkv[:, H + Hkv :])
            q = qk[:, :H].reshape(B * Hkv, G, D)
            lo = max(0, cur + 1 - window) if window is not None else 0  # a sliding window sees the last `window` slots
            scores = torch.baddbmm(bias[:, :, lo:] if lo else bias, q, keys_t.narrow(2, lo, L - lo), alpha=scaling)
            out = rnd(torch.bmm(scores.softmax(-1), values.narrow(1, lo, L - lo)).view(B, H * D))  # [B * Hkv, G, L]
            x = linear(out, o_w, residual=x)
            h = rnd(F.rms_norm(x, (x.shape[-1],), *ln2))
            if gu_w is None:  # a sparse MoE block: the model's module
                x = rnd(x + moe_block(mlp, h.to(self.dtype)).float())
                continue
            if checks is not None:
                checks.mlp_input(i, h)
                if checks.mlp_as_module(i):
                    x = rnd(x + fused_mlp(mlp, h.to(self.dtype)).float())
                    continue
            gate, up = linear(h, gu_w).chunk(2, dim=-1)
            x = linear(rnd(act(gate) * up), down_w, residual=x)
        if checks is not None:
            checks.final_residual(x)
        h = rnd(F.rms_norm(x, (x.shape[-1],), *self.norm))
        if checks is not None:
            checks.head_input(h)
        if self.head_fp32:  # the fp32 head's logits, not rounded
            w_t, b = self.head
            if self.onednn:
                logits = onednn_linear(h, w_t, b)
            else:
                logits = torch.mm(h, w_t) if b is None else torch.addmm(b, h, w_t)
        else:
            logits = linear(h, self.head)  # fp32 holding rollout-dtype values: inf where they left its range
        if checks is not None:
            checks.head_output(logits, fp32_head=self.head_fp32)
        return logits


def _transposed(packed: tuple) -> tuple:
    """(W.T, b) of a packed (W, b): the layout `torch.mm(x, W.T)` reads without a transpose per call."""
    return packed[0].t(), packed[1]


class _HFDecode:
    """Fallback for architectures without the fast path: the model's own forward and dynamic cache."""

    sources = None  # every forward runs every row in order: no row layout to record

    def __init__(self, engine: NativeEngine, prompts, pad_left, max_new: int):
        self.model = engine.model
        self.cache_kw = cache_kwarg(self.model)
        self.prompts = prompts
        self.attn = (torch.arange(prompts.shape[1], device=prompts.device)[None, :] >= pad_left[:, None]).long()
        self.positions = (self.attn.cumsum(-1) - 1).clamp(min=0)
        # bitwise: a cache of every layer's keys at their positions (no sliding-window layer that drops old ones),
        # each row's realigned by its left padding inside the exact attention
        self.past = DynamicCache() if engine.bitwise else None
        self.padding = functools.partial(left_padding, pad_left) if engine.bitwise else contextlib.nullcontext

    def prefill(self) -> torch.Tensor:
        last = {"logits_to_keep": 1} if takes_logits_to_keep(self.model) else {}
        cache = {self.cache_kw: self.past} if self.past is not None else {}
        with self.padding():
            out = self.model(
                input_ids=self.prompts,
                attention_mask=self.attn,
                position_ids=self.positions,
                use_cache=True,
                **last,
                **cache,
            )
        self.past = output_cache(out)
        return out.logits[:, -1]

    def step(self, t: int, tok: torch.Tensor) -> torch.Tensor:
        self.attn = torch.cat([self.attn, self.attn.new_ones(len(tok), 1)], dim=1)
        pos = self.positions[:, -1:] + t + 1
        with self.padding():
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=self.attn,
                position_ids=pos,
                use_cache=True,
                **{self.cache_kw: self.past},
            )
        self.past = output_cache(out)
        return out.logits[:, -1]

    def compact(self, keep: torch.Tensor) -> bool:
        return False
