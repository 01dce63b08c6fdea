"""The vLLM rollout engine against the learner: log-prob agreement, precision ordering, in-place weight loading,
sync verification, stop tokens and seeds. Skipped where vLLM is not installed (scripts/install-vllm.sh installs it);
the missing-vLLM error is tested everywhere. One engine per dtype is shared by the whole file (vLLM starts slowly).
"""

import sys

import pytest
import torch

from unison.errors import UserError
from unison.learner import Learner, WeightSyncError
from unison.mismatch import mismatch_metrics
from unison.models import build_tokenizer, random_model, save_model
from unison.precision import PrecisionPolicy, checksum
from unison.rollout import RolloutEngine, make_engine
from unison.rollout.base import SamplingParams

TOK = build_tokenizer()
PROMPTS = [TOK(p).input_ids for p in ["97-7:", "250-9:", "61-4:", "140-5:"]] * 4
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KV_BYTES = 2**26  # 64 MiB of KV cache per engine: 32k tokens of the tiny model
REASON = "vLLM is not installed (bash scripts/install-vllm.sh .venv/bin/python installs the CPU build)"


def test_missing_vllm_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    model = save_model(random_model(seed=0), TOK, tmp_path / "m")
    with pytest.raises(UserError, match="install-vllm.sh"):
        make_engine("vllm", model, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two random checkpoints of the built-in architecture: the start weights and another set to load in place."""
    root = tmp_path_factory.mktemp("vllm-models")
    return {s: save_model(random_model(seed=s), TOK, root / f"seed{s}") for s in (0, 1)}


@pytest.fixture(scope="module")
def engines(dirs):
    """One running vLLM engine per dtype on the seed-0 checkpoint, started on first use."""
    pytest.importorskip("vllm", reason=REASON)
    started = {}

    def get(dtype):
        if dtype not in started:
            started[dtype] = make_engine(
                "vllm", dirs[0], dtype=dtype, device="cpu", seed=0, kv_cache_memory_bytes=KV_BYTES
            )
        return started[dtype]

    yield get
    for e in started.values():
        e.close()


def learner(model_dir, dtype):
    return Learner.from_pretrained(model_dir, PrecisionPolicy(dtype, dtype), "cpu")


def sample(engine, max_new_tokens=64, stop=(1,), temperature=1.0, **kw):
    return engine.generate(
        PROMPTS, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=stop, **kw)
    )


def test_fp32_logprobs_agree_with_the_learner(engines, dirs):
    e = engines(torch.float32)
    assert isinstance(e, RolloutEngine)
    r = sample(e)
    diff = (learner(dirs[0], torch.float32).recompute(r) - r.logprobs).abs()[r.mask]
    assert diff.mean().item() < 1e-5, diff.mean().item()


def test_top_k_top_p_logprobs_are_the_truncated_distribution(engines, dirs):
    e = engines(torch.float32)
    r = sample(e, max_new_tokens=32, temperature=0.8, top_k=20, top_p=0.9)
    lp = learner(dirs[0], torch.float32).recompute(r, temperature=0.8, top_k=20, top_p=0.9)
    assert torch.isfinite(lp[r.mask]).all()
    assert (lp - r.logprobs).abs()[r.mask].mean().item() < 1e-5


def test_mismatch_ordering_fp32_fp16_bf16(engines, dirs):
    values = {}
    for dt in DTYPES:
        r = sample(engines(dt))
        values[dt] = mismatch_metrics(learner(dirs[0], dt).recompute(r), r.logprobs, r.mask)["abs_log_ratio_mean"]
    assert values[torch.float32] < values[torch.float16] < values[torch.bfloat16], values


def test_stop_token_is_included_and_truncation_is_marked(engines):
    e = engines(torch.float32)
    stop = tuple(range(5, 200))  # most byte tokens stop: most rows end early, on a stop token
    r = sample(e, max_new_tokens=6, stop=stop)
    assert r.finished.any()
    for row, n, done in zip(r.response_ids.tolist(), r.lengths.tolist(), r.finished.tolist()):
        body = row[:n]
        assert (body[-1] in stop) == done
        assert not any(t in stop for t in body[:-1])
        assert done or n == 6
        assert all(t == e.pad_token_id for t in row[n:])
    assert (r.mask.sum(1) == r.lengths).all()
    assert (r.logprobs[~r.mask] == 0).all() and (r.logprobs[r.mask] <= 0).all()


def test_seeds_reproduce_and_advance(engines):
    e = engines(torch.float32)
    state = e.rng_state()
    a, b = sample(e, 16), sample(e, 16)
    e.set_rng_state(state)
    c = sample(e, 16)
    assert torch.equal(a.response_ids, c.response_ids) and torch.equal(a.logprobs, c.logprobs)
    assert not torch.equal(a.response_ids, b.response_ids)
    assert len({tuple(x) for x in a.responses()}) > 1  # repeated prompts get their own seeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_in_place_load_equals_a_fresh_engine(engines, dirs, dtype):
    e = engines(dtype)
    new = learner(dirs[1], torch.float32)
    before = sample(e, 24)
    e.load_weights(new.export_weights(dtype))
    assert e.weights_checksum() == checksum(new.export_weights(dtype))
    fresh = make_engine("vllm", dirs[1], dtype=dtype, device="cpu", seed=0, kv_cache_memory_bytes=KV_BYTES)
    try:
        state = torch.tensor([7, 1000])
        e.set_rng_state(state)
        fresh.set_rng_state(state)
        a, b = sample(e, 24), sample(fresh, 24)
    finally:
        fresh.close()
        e.load_weights(learner(dirs[0], torch.float32).export_weights(dtype))  # back to the shared start weights
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.logprobs, before.logprobs)


def perturb_norm(model):
    with torch.no_grad():
        model.model.norm.weight[0] += 0.5


def perturb_kernel(model):
    """Wrap one linear layer's kernel so that it multiplies by slightly different weights."""
    layer = model.model.layers[0].mlp.down_proj
    inner = layer.cpu_linear
    layer.cpu_linear = lambda x, weight, bias: inner(x, weight, bias) * 1.001


@pytest.mark.parametrize("corrupt", ["param", "kernel", "stale-head"])
def test_corrupted_sync_is_caught(engines, dirs, monkeypatch, corrupt):
    import unison.rollout.vllm as vllm_engine

    e = engines(torch.float32)
    if corrupt == "stale-head":
        # skip the repack of the tied LM head's kernel: vLLM's reload alone leaves it computing with the old embedding
        monkeypatch.setattr(vllm_engine, "_repack_vocab_kernels", lambda model: None)
    else:
        original = e.load_weights

        def load_then_corrupt(named):
            original(named)
            e.llm.apply_model(perturb_norm if corrupt == "param" else perturb_kernel)

        monkeypatch.setattr(e, "load_weights", load_then_corrupt)
    try:
        with pytest.raises(WeightSyncError):
            learner(dirs[1], torch.float32).sync(e)
    finally:
        monkeypatch.undo()
        assert learner(dirs[0], torch.float32).sync(e)["sync/checksum_ok"] == 1.0  # a clean sync repairs it


def test_long_prompt_groups_share_no_stale_prefix(engines, dirs):
    # 16 distinct 300-token prompts, 2 rows each: 9600 prompt tokens, more than vLLM's CPU scheduler takes in one
    # step, so with chunked prefill it would split a seeded request's prompt (which vLLM-CPU cannot do). The prefix
    # cache shares each prompt between its rows, within one call: a call does not depend on what earlier calls
    # cached, and after a weight load never sees the old weights' key/values.
    e = engines(torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [p for p in (torch.randint(5, 261, (300,), generator=g).tolist() for _ in range(16)) for _ in range(2)]
    params = SamplingParams(max_new_tokens=8, stop_token_ids=())
    state = e.rng_state()
    first = e.generate(prompts, params)  # the prompts' key/values cached under the start weights
    e.set_rng_state(state)
    again = e.generate(prompts, params)  # a call samples as if the cache were empty: the same tokens and log-probs
    assert torch.equal(first.response_ids, again.response_ids) and torch.equal(first.logprobs, again.logprobs)
    try:
        e.load_weights(learner(dirs[1], torch.float32).export_weights(torch.float32))
        r = e.generate(prompts, params)
    finally:
        e.load_weights(learner(dirs[0], torch.float32).export_weights(torch.float32))  # back to the start weights
    assert r.response_ids.shape == (32, 8) and r.mask.all()
    diff = (learner(dirs[1], torch.float32).recompute(r) - r.logprobs).abs()[r.mask]
    assert diff.mean().item() < 1e-5, diff.mean().item()


# ---- conformance: each architecture vLLM runs in unison, against the model's own forward ------------------------
VLLM_ARCHS = ["qwen2", "qwen3", "llama", "llama-untied", "llama3-rope", "mistral-window", "cohere", "granite", "gemma3"]
# vLLM-CPU attends with head sizes 32, 64, ...
VLLM_SHAPE = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32)


@pytest.mark.parametrize("name", VLLM_ARCHS)
def test_vllm_engine_equals_the_models_own_forward(name, tmp_path):
    # the learner's weights synced into vLLM and read back exactly, then vLLM's fp32 log-probs against the model's
    # own forward (the contract of unison.conformance), and the bf16 mismatch finite and above fp32's
    pytest.importorskip("vllm", reason=REASON)
    from unison.archs import save_tiny
    from unison.conformance import MAX_TOL, MEAN_TOL, default_prompts, measure

    d = save_tiny(name, tmp_path / name, **VLLM_SHAPE)
    r = measure(
        d, default_prompts(), max_new_tokens=24, precisions=("bf16",), engine="vllm", kv_cache_memory_bytes=KV_BYTES
    )
    assert r.engine_vs_hf[0] <= MEAN_TOL and r.engine_vs_hf[1] <= MAX_TOL, (name, r.engine_vs_hf)
    assert r.learner_vs_hf[0] <= MEAN_TOL and r.learner_vs_hf[1] <= MAX_TOL, (name, r.learner_vs_hf)
    assert r.mismatch["fp32"] < r.mismatch["bf16"] < 1.0, r.mismatch


def test_a_config_vllm_cannot_start_on_is_one_line(tmp_path):
    pytest.importorskip("vllm", reason=REASON)
    from unison.archs import save_tiny

    d = save_tiny("qwen2-window", tmp_path / "w", **VLLM_SHAPE)  # a window on some layers only: vLLM asserts
    with pytest.raises(UserError, match="vLLM could not start"):
        make_engine("vllm", d, dtype=torch.float32, device="cpu", kv_cache_memory_bytes=KV_BYTES)


@pytest.mark.parametrize("name", ["phi3", "gpt2", "gpt-neox", "olmo2", "qwen2-moe", "qwen3-moe", "mixtral", "gemma2"])
def test_architectures_vllm_cannot_run_exactly_are_refused_by_name(name, tmp_path, monkeypatch):
    # refused before vLLM is imported: the same line whether or not it is installed
    from unison.archs import save_tiny

    monkeypatch.setitem(sys.modules, "vllm", None)
    d = save_tiny(name, tmp_path / name)
    with pytest.raises(UserError, match="use --engine native") as err:
        make_engine("vllm", d, dtype=torch.float32, device="cpu")
    assert "\n" not in str(err.value)


def test_stop_strings_end_responses_where_the_native_engine_ends_them(engines, dirs):
    # vLLM stops on the strings itself; both engines then cut at the token that completes the first one
    from unison.rollout.base import stop_string_end

    e = engines(torch.float32)
    stops = ("a", "e", "3")
    r = sample(e, max_new_tokens=40, stop=(1,), stop_strings=stops)
    assert r.finished.any()
    for prompt, ids, fin in zip(r.prompt_ids, r.responses(), r.finished.tolist()):
        end = stop_string_end(ids, lambda part, prompt=prompt: e.text_of(prompt, part), stops)
        if ids and ids[-1] == 1:
            assert end is None  # EOS came first
        else:
            assert (end == len(ids)) == fin, (e.text_of(prompt, ids), fin)
    diff = (learner(dirs[0], torch.float32).recompute(r) - r.logprobs).abs()[r.mask]
    assert diff.mean().item() < 1e-5


def test_lora_merged_weights_sync_verified(engines, dirs):
    # a LoRA learner (adapters moved off zero) gives vLLM its merged weights, verified by checksum, and vLLM samples
    # from them with the fp16 mismatch of full fine-tuning
    from unison.config import LoraConfig
    from unison.lora import adapt
    from unison.models import load_model

    e = engines(torch.float16)
    lora = Learner(
        adapt(load_model(dirs[0]), LoraConfig(enabled=True, rank=4, alpha=8.0)),
        PrecisionPolicy(torch.float16, torch.float16),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in lora.weights.named_master():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora.weights.copy_to_model()
    try:
        assert lora.sync(e)["sync/checksum_ok"] == 1.0
        ro = sample(e, 24)
        m = mismatch_metrics(lora.recompute(ro), ro.logprobs, ro.mask)
        assert 0 < m["abs_log_ratio_mean"] < 2e-2, m
    finally:
        e.load_weights(learner(dirs[0], torch.float32).export_weights(torch.float16))
