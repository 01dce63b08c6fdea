"""The native rollout engine: batched sampling with a preallocated KV cache on a Hugging Face model's weights.

The decode loop runs its own attention over a static cache (one SDPA call per layer per token, the new key/value
written in place), and fuses elementwise work the way inference engines do (RMSNorm, rotary embedding and the
SiLU gate computed in fp32 and rounded once, where the learner's Hugging Face forward rounds after each op), so its
kernels differ from the learner's full-sequence forward the way an inference engine's do: same weights, other
reduction orders and roundings. Llama-family decoders (Qwen2, Qwen3, Llama, Mistral) take this
path; any other causal LM falls back to the model's own forward with its dynamic cache.

Prompts are left-padded to a common length; a finished row keeps its slot (its tokens are ignored) until every
row is done or `max_new_tokens` is reached. Log-probs: see `unison.rollout.base` and `unison.sampling`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from unison.precision import cast_module, checksum, fp32_attention, matmul_mode, set_matmul
from unison.rollout.base import Rollouts, SamplingParams, check_prompts
from unison.sampling import sample

FAST_PATH_TYPES = {"qwen2", "qwen3", "llama", "mistral"}


class StaticKVCache:
    """Keys and values for every layer, preallocated: [layers, B, kv_heads, max_len, head_dim]."""

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
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return (norm.weight.float() * xf).to(x.dtype)


def fused_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """Gated MLP with act(gate) * up computed in fp32 and rounded once (a fused silu-and-mul kernel)."""
    return mlp.down_proj((mlp.act_fn(mlp.gate_proj(x).float()) * mlp.up_proj(x).float()).to(x.dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
    def _attention(self, layer, x, cos, sin, cache: StaticKVCache, index: int, start: int, mask):
        attn = layer.self_attn
        B, S, _ = x.shape
        q = attn.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = attn.k_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        v = attn.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = fused_rms_norm(attn.q_norm, q), fused_rms_norm(attn.k_norm, k)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D] fp32
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype)  # fused rotary: one rounding
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype)
        keys, values = cache.write(index, start, k, v)  # [B, Hkv, start+S, D]
        sdpa = fp32_attention if self.matmul == "fp32-accumulate" else F.scaled_dot_product_attention
        out = sdpa(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
        return attn.o_proj(out.transpose(1, 2).reshape(B, S, -1))

    def _forward(self, ids, positions, cache: StaticKVCache, start: int, mask) -> torch.Tensor:
        """Logits of the last position. ids, positions [B, S]; mask [B, 1, S, start+S] bool."""
        inner = self.model.model
        x = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(x.float(), positions)  # fp32 angles
        for i, layer in enumerate(inner.layers):
            x = x + self._attention(layer, fused_rms_norm(layer.input_layernorm, x), cos, sin, cache, i, start, mask)
            x = x + fused_mlp(layer.mlp, fused_rms_norm(layer.post_attention_layernorm, x))
        x = fused_rms_norm(inner.norm, x[:, -1:])
        return self.model.lm_head(x)[:, -1]  # [B, V] in the rollout dtype

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
        self.cache = StaticKVCache(engine.num_layers, B, engine.kv_heads, P + max_new, engine.head_dim, engine.dtype, dev)
        self.valid = torch.arange(P + max_new, device=dev)[None, :] >= pad_left[:, None]  # [B, P+N] no left padding

    def prefill(self) -> torch.Tensor:
        P, dev = self.P, self.prompts.device
        q_pos = torch.arange(P, device=dev)
        causal = q_pos[None, :] <= q_pos[:, None]  # [P, P]
        # padded query rows attend to themselves only, so no row is empty (an empty row gives NaN)
        mask = (causal[None] & self.valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)[None]
        positions = (q_pos[None, :] - self.pad_left[:, None]).clamp(min=0)  # [B, P]
        return self.engine._forward(self.prompts, positions, self.cache, 0, mask[:, None])

    def step(self, t: int, tok: torch.Tensor) -> torch.Tensor:
        cur = self.P + t
        mask = self.valid[:, None, None, : cur + 1]  # [B, 1, 1, cur+1]
        return self.engine._forward(tok[:, None], (cur - self.pad_left)[:, None], self.cache, cur, mask)

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

