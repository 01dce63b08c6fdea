"""The native rollout engine: batched sampling with a preallocated KV cache on a Hugging Face model's weights.

The decode loop runs its own attention over a static cache (one SDPA call per layer per token, the new key/value
written in place), and fuses elementwise work the way inference engines do (RMSNorm, rotary embedding and the
SiLU gate computed in fp32 and rounded once, where the learner's Hugging Face forward rounds after each op), so its
kernels differ from the learner's full-sequence forward the way an inference engine's do: same weights, other
reduction orders and roundings. Llama-family decoders (Qwen2, Qwen3, Llama, Mistral) take this
path; any other causal LM falls back to the model's own forward with its dynamic cache.

Per call of `generate` the engine packs its weights for decoding once (`DecodeWeights`): q/k/v and gate/up
concatenated into one matrix product each, and, in `fp32-accumulate` mode, the fp16/bf16 weights held as fp32 copies
of exactly the same values, so no token pays for an upcast. A decode step attends with two batched matrix products
over the cache (a single query row gains nothing from a flash kernel), applies rotary to q and k at once, and reads
the angles from a table built once. Forward pre-hooks on the projections, the embedding and the LM head (the FP16
overflow guard's) still run where the modules would have been called; an MLP that the guard moved to fp32, or whose
output it may replace, is called as a module.

Prompts are left-padded to a common length. Finished rows are dropped from the batch once a quarter of it is done
(a copy of the cache); the loop ends when every row is done or `max_new_tokens` is reached. Log-probs: see
`unison.rollout.base` and `unison.sampling`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unison.precision import cast_module, checksum, matmul_mode, set_matmul
from unison.rollout.base import Rollouts, SamplingParams, check_prompts
from unison.sampling import sample

FAST_PATH_TYPES = {"qwen2", "qwen3", "llama", "mistral"}


class StaticKVCache:
    """Keys and values for every layer, preallocated: [layers, B, kv_heads, max_len, head_dim].

    In `fp32-accumulate` mode the cache is fp32 holding values already rounded to the rollout dtype (what the
    kernels would read up from a fp16/bf16 cache), so attention needs no cast per token."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, kv_heads, S, D] at positions start..start+S and return the cache up to there."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


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


def run_pre_hooks(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run `module`'s forward pre-hooks on input x, as a call of the module would, and return the input they leave."""
    for hook in module._forward_pre_hooks.values():
        out = hook(module, (x,))
        if out is not None:
            x = out[0] if isinstance(out, tuple) else out
    return x


def _packed(compute: torch.dtype, *linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases, zeros where a layer has none) of `linears` stacked along the output, in `compute`
    (a single layer's own tensors where they already are in `compute`: no copy)."""
    def stacked(tensors):
        return (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).to(compute)

    weight = stacked([m.weight for m in linears])
    if all(m.bias is None for m in linears):
        return weight, None
    return weight, stacked([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


class DecodeWeights:
    """The engine's weights packed for decoding: q/k/v and gate/up concatenated, in the compute dtype (fp32 copies
    of the fp16/bf16 values in `fp32-accumulate` mode), norm weights in fp32, and the modules and constants each
    layer needs (looked up once, not per token). Built from the parameters at the start of every `generate`, so it
    always holds what `weights_checksum` reads."""

    @torch.no_grad()
    def __init__(self, model, compute: torch.dtype):
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            self.layers.append({
                "qkv": _packed(compute, a.q_proj, a.k_proj, a.v_proj), "o": _packed(compute, a.o_proj),
                "gate_up": _packed(compute, m.gate_proj, m.up_proj), "down": _packed(compute, m.down_proj),
                "ln1": (ln1.weight.float(), ln1.variance_epsilon), "ln2": (ln2.weight.float(), ln2.variance_epsilon),
                "q_proj": a.q_proj, "qk_norm": (a.q_norm, a.k_norm) if hasattr(a, "q_norm") else None,
                "scaling": a.scaling, "mlp": m, "gate_proj": m.gate_proj, "act_fn": m.act_fn,
            })  # fmt: skip
        norm = model.model.norm
        self.norm = (norm.weight.float(), norm.variance_epsilon)
        self.head = _packed(compute, model.lm_head)


class NativeEngine:
    """Samples from a copy of the policy held in the rollout dtype."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device, seed: int = 0, pad_token_id: int = 0,
                 matmul: str = "auto"):
        self.model = cast_module(model, dtype).to(device).eval()
        self.matmul = matmul_mode(matmul, torch.device(device), dtype)
        set_matmul(self.model, self.matmul)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dtype = dtype
        self.device = torch.device(device)
        self.pad_token_id = pad_token_id
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        cfg = model.config
        self.fast = cfg.model_type in FAST_PATH_TYPES
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @classmethod
    def from_pretrained(cls, model_dir, dtype: torch.dtype, device, seed: int = 0, matmul: str = "auto", **_):
        from unison.models import load_model, load_tokenizer

        tok = load_tokenizer(model_dir)
        model = load_model(model_dir, device=device, dtype=dtype)
        return cls(model, dtype=dtype, device=device, seed=seed, pad_token_id=tok.pad_token_id or 0, matmul=matmul)

    # ---- weights -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named_tensors) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            params[name].copy_(tensor)

    def weights_checksum(self) -> str:
        return checksum(self.model.named_parameters())

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    # ---- the model, layer by layer ----------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matrix products run in: fp32 in `fp32-accumulate` mode, else the rollout dtype."""
        return torch.float32 if self.matmul == "fp32-accumulate" else self.dtype

    def _linear(self, x: torch.Tensor, packed: tuple) -> torch.Tensor:
        """x [.., in] in the rollout dtype -> x @ W.T + b, rounded to the rollout dtype once."""
        weight, bias = packed
        return F.linear(x.to(weight.dtype), weight, bias).to(self.dtype)

    def _attention(self, w: dict, x, cos, sin, cache: StaticKVCache, index: int, start: int, mask):
        """x [B, S, hidden]; cos, sin [B, S, 1, D] fp32 (sin with rotate-half's sign folded in, see _StaticDecode)."""
        B, S, _ = x.shape
        H, Hkv, D = self.num_heads, self.kv_heads, self.head_dim
        qkv = self._linear(run_pre_hooks(w["q_proj"], x), w["qkv"]).view(B, S, H + 2 * Hkv, D)
        qk, v = qkv[:, :, : H + Hkv], qkv[:, :, H + Hkv:]
        if w["qk_norm"] is not None:  # Qwen3
            q_norm, k_norm = w["qk_norm"]
            qk = torch.cat((fused_rms_norm(q_norm, qk[:, :, :H]), fused_rms_norm(k_norm, qk[:, :, H:])), 2)
        # fused rotary on q and k at once, one rounding: x cos + rotate_half(x) sin == x cos + roll(x, D/2) sin_signed
        qk32 = qk.float()
        qk = (qk32 * cos + qk32.roll(D // 2, -1) * sin).to(self.dtype)
        cdt = cache.k.dtype
        q = qk[:, :, :H].transpose(1, 2)  # [B, H, S, D]
        keys, values = cache.write(index, start, qk[:, :, H:].transpose(1, 2).to(cdt), v.transpose(1, 2).to(cdt))
        if S == 1:  # decode: one query row per sequence, two batched products over the cache [B, Hkv, L, D]
            qg = q.to(cdt).reshape(B, Hkv, H // Hkv, D)  # query heads grouped by the key/value head they share
            scores = (qg @ keys.transpose(-1, -2)).float() * w["scaling"]  # [B, Hkv, G, L]
            scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
            out = (scores.softmax(-1).to(cdt) @ values).to(self.dtype).view(B, 1, H * D)
        else:
            out = F.scaled_dot_product_attention(q.to(cdt), keys, values, attn_mask=mask, scale=w["scaling"],
                                                 enable_gqa=True)  # fmt: skip
            out = out.to(self.dtype).transpose(1, 2).reshape(B, S, H * D)
        return self._linear(out, w["o"])

    def _mlp(self, w: dict, x: torch.Tensor) -> torch.Tensor:
        """Gated MLP: gate and up in one product, act(gate) * up in fp32 rounded once (a fused silu-and-mul)."""
        mlp = w["mlp"]
        down = mlp.down_proj
        if getattr(mlp, "_unison_fp32", False) or down._forward_hooks or down._forward_pre_hooks:
            return fused_mlp(mlp, x)  # the overflow guard watches or replaces this MLP's output: call the modules
        gate, up = self._linear(run_pre_hooks(w["gate_proj"], x), w["gate_up"]).chunk(2, dim=-1)
        return self._linear((w["act_fn"](gate.float()) * up.float()).to(self.dtype), w["down"])

    def _forward(self, weights: DecodeWeights, ids, cos, sin, cache: StaticKVCache, start: int, mask) -> torch.Tensor:
        """Logits of the last position. ids [B, S]; cos, sin [B, S, 1, D]; mask [B, 1, S, start+S] bool."""
        x = self.model.model.embed_tokens(ids)
        for i, w in enumerate(weights.layers):
            x = x + self._attention(w, rms_norm_fp32(x, *w["ln1"]), cos, sin, cache, i, start, mask)
            x = x + self._mlp(w, rms_norm_fp32(x, *w["ln2"]))
        x = run_pre_hooks(self.model.lm_head, rms_norm_fp32(x[:, -1:], *weights.norm))
        return self._linear(x, weights.head)[:, -1]  # [B, V] in the rollout dtype

    # ---- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress: bool = False) -> Rollouts:
        check_prompts(prompt_ids)
        B, N = len(prompt_ids), params.max_new_tokens
        P = max(len(p) for p in prompt_ids)
        dev = self.device
        prompts = torch.full((B, P), self.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            prompts[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompts = prompts.to(dev)
        pad_left = torch.tensor([P - len(p) for p in prompt_ids], device=dev)  # [B]
        stop = torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=dev)

        tokens = torch.full((B, N), self.pad_token_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros((B, N), dtype=torch.float32, device=dev)
        lengths = torch.full((B,), N, dtype=torch.long, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        decoder = (_StaticDecode if self.fast else _HFDecode)(self, prompts, pad_left, N)
        rows = torch.arange(B, device=dev)  # the original row of each slot still decoded
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # [slots]
        logits = decoder.prefill()
        bar = tqdm(total=N, desc="sampling", unit="tok", leave=False, disable=not progress)
        for t in range(N):
            tok, lp = sample(logits, self.generator, params.temperature, params.top_k, params.top_p)
            tok = torch.where(done, self.pad_token_id, tok)
            tokens[rows, t] = tok
            logprobs[rows, t] = torch.where(done, 0.0, lp)
            hit = ~done & torch.isin(tok, stop)
            lengths[rows] = torch.where(hit, t + 1, lengths[rows])
            finished[rows] |= hit
            done |= hit
            bar.update(1)
            if t == N - 1:
                break
            if dev.type == "cpu" or t % 8 == 7:  # on a GPU, look at the host only every 8 tokens
                n_done = int(done.sum())
                if n_done == len(done):
                    break
                # drop finished rows from the batch once a quarter of it is done (a copy of the cache)
                if 4 * n_done >= len(done) and decoder.compact(~done):
                    keep = ~done
                    rows, tok, done = rows[keep], tok[keep], done[keep]
            logits = decoder.step(t, tok)
        bar.close()
        T = int(lengths.max().item())
        mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
        return Rollouts(
            prompt_ids=[list(p) for p in prompt_ids],
            response_ids=tokens[:, :T].masked_fill(~mask, self.pad_token_id).cpu(),
            logprobs=logprobs[:, :T].masked_fill(~mask, 0.0).cpu(),
            mask=mask.cpu(),
            lengths=lengths.cpu(),
            finished=finished.cpu(),
        )


class _StaticDecode:
    """Prefill and decode steps over a static KV cache; finished rows can be dropped (`compact`)."""

    def __init__(self, engine: NativeEngine, prompts, pad_left, max_new: int):
        B, P = prompts.shape
        dev = prompts.device
        self.engine, self.prompts, self.pad_left, self.P = engine, prompts, pad_left, P
        self.weights = DecodeWeights(engine.model, engine.compute_dtype)
        L = P + max_new
        self.cache = StaticKVCache(engine.num_layers, B, engine.kv_heads, L, engine.head_dim, engine.compute_dtype, dev)
        self.valid = torch.arange(L, device=dev)[None, :] >= pad_left[:, None]  # [B, P+N] no left padding
        # rotary angles of every position, once (the fp32 values the model's rotary module gives per call), and sin
        # with rotate_half's sign folded in: rotate_half(x) * sin == roll(x, D/2) * cat(-sin[:D/2], sin[D/2:])
        cos, sin = engine.model.model.rotary_emb(torch.zeros(1, device=dev), torch.arange(L, device=dev)[None])
        half = cos.shape[-1] // 2
        self.cos = cos[0].float()[:, None]  # [L, 1, D]
        self.sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), -1).float()[:, None]

    def prefill(self) -> torch.Tensor:
        P, dev = self.P, self.prompts.device
        q_pos = torch.arange(P, device=dev)
        causal = q_pos[None, :] <= q_pos[:, None]  # [P, P]
        # padded query rows attend to themselves only, so no row is empty (an empty row gives NaN)
        mask = (causal[None] & self.valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)[None]
        positions = (q_pos[None, :] - self.pad_left[:, None]).clamp(min=0)  # [B, P]
        return self.engine._forward(self.weights, self.prompts, self.cos[positions], self.sin[positions], self.cache, 0,
                                    mask[:, None])  # fmt: skip

    def step(self, t: int, tok: torch.Tensor) -> torch.Tensor:
        cur = self.P + t
        mask = self.valid[:, None, None, : cur + 1]  # [B, 1, 1, cur+1]
        pos = (cur - self.pad_left)[:, None]  # [B, 1]
        return self.engine._forward(self.weights, tok[:, None], self.cos[pos], self.sin[pos], self.cache, cur, mask)

    def compact(self, keep: torch.Tensor) -> bool:
        self.cache.k, self.cache.v = self.cache.k[:, keep], self.cache.v[:, keep]
        self.valid, self.pad_left = self.valid[keep], self.pad_left[keep]
        return True


class _HFDecode:
    """Fallback for architectures without the fast path: the model's own forward and dynamic cache."""

    def __init__(self, engine: NativeEngine, prompts, pad_left, max_new: int):
        self.model = engine.model
        self.prompts = prompts
        self.attn = (torch.arange(prompts.shape[1], device=prompts.device)[None, :] >= pad_left[:, None]).long()
        self.positions = (self.attn.cumsum(-1) - 1).clamp(min=0)
        self.past = None

    def prefill(self) -> torch.Tensor:
        out = self.model(input_ids=self.prompts, attention_mask=self.attn, position_ids=self.positions, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1]

    def step(self, t: int, tok: torch.Tensor) -> torch.Tensor:
        self.attn = torch.cat([self.attn, self.attn.new_ones(len(tok), 1)], dim=1)
        pos = self.positions[:, -1:] + t + 1
        out = self.model(input_ids=tok[:, None], attention_mask=self.attn, position_ids=pos, past_key_values=self.past,
                         use_cache=True)  # fmt: skip
        self.past = out.past_key_values
        return out.logits[:, -1]

    def compact(self, keep: torch.Tensor) -> bool:
        return False

