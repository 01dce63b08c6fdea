import pytest
import torch

from unison.config import ModelConfig
from unison.learner import Learner, WeightSyncError
from unison.mismatch import mismatch_metrics
from unison.models import build_tokenizer, load_model
from unison.precision import PrecisionPolicy
from unison.rollout import RolloutEngine, make_engine
from unison.rollout.base import SamplingParams
from unison.rollout.native import NativeEngine
from unison.sampling import process_logits, sample, token_logprobs

TOK = build_tokenizer()
PROMPTS = [TOK(p).input_ids for p in ["47-9:", "123-4:", "8-3:", "300-7:"]] * 2


def engine(model_dir, dtype=torch.float32, seed=0):
    return NativeEngine.from_pretrained(model_dir, dtype=dtype, device="cpu", seed=seed)


def decode_variants(monkeypatch):
    """The fast path's two decode steps in turn: the flat one (fp32 products), then the layer-by-layer one."""
    from unison.rollout.native import _StaticDecode

    init = _StaticDecode.__init__

    def layered(self, *a, **k):
        init(self, *a, **k)
        self.flat = None

    yield True
    monkeypatch.setattr(_StaticDecode, "__init__", layered)
    yield False


def test_protocol_and_factory(tiny_dir):
    e = make_engine("native", tiny_dir, dtype=torch.float32, device="cpu")
    assert isinstance(e, RolloutEngine)
    from unison.errors import UserError

    with pytest.raises(UserError, match="native, vllm"):
        make_engine("sglang", tiny_dir, dtype=torch.float32, device="cpu")


def test_seeded_sampling_is_deterministic(tiny_dir):
    p = SamplingParams(max_new_tokens=20, stop_token_ids=(1,))
    a = engine(tiny_dir, seed=3).generate(PROMPTS, p)
    b = engine(tiny_dir, seed=3).generate(PROMPTS, p)
    c = engine(tiny_dir, seed=4).generate(PROMPTS, p)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_max_tokens_and_shapes(tiny_dir):
    r = engine(tiny_dir).generate(PROMPTS, SamplingParams(max_new_tokens=7, stop_token_ids=()))
    assert r.response_ids.shape == (8, 7) and r.lengths.tolist() == [7] * 8
    assert not r.finished.any() and r.mask.all()
    assert (r.logprobs <= 0).all()


def test_eos_stops_and_is_included(tiny_dir):
    e = engine(tiny_dir)
    r = e.generate(PROMPTS, SamplingParams(max_new_tokens=30, temperature=1.0, stop_token_ids=tuple(range(5, 272))))
    # every non-special token stops: each response is exactly one token long unless a special token came first
    assert r.finished.all()
    assert (r.lengths >= 1).all()
    last = r.response_ids[torch.arange(8), r.lengths - 1]
    assert (last >= 5).all()
    assert (r.mask.sum(1) == r.lengths).all()
    for row, n in zip(r.response_ids, r.lengths):
        assert (row[n:] == e.pad_token_id).all()


def test_greedy_matches_hf_generate(tiny_dir):
    e = engine(tiny_dir)
    r = e.generate(PROMPTS[:2], SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=()))
    model = load_model(tiny_dir)
    for i, p in enumerate(PROMPTS[:2]):
        out = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[0, len(p) :].tolist() == r.response_ids[i].tolist()


def test_learner_agrees_with_engine_in_fp32(tiny_dir):
    e = engine(tiny_dir)
    r = e.generate(PROMPTS, SamplingParams(max_new_tokens=40, stop_token_ids=(1,)))
    lr = Learner.from_pretrained(tiny_dir, PrecisionPolicy(torch.float32, torch.float32), "cpu")
    m = mismatch_metrics(lr.recompute(r), r.logprobs, r.mask)
    assert m["abs_log_ratio_mean"] < 1e-5 and m["num_tokens"] == int(r.lengths.sum())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch without oneDNN")
def test_onednn_and_torch_kernels_decode_to_fp32_rounding(tiny_dir):
    # model.gemm picks the library of the fp32 products; the two round differently, by fp32's rounding alone
    engines = [
        NativeEngine.from_pretrained(tiny_dir, torch.float32, "cpu", seed=5, gemm=g) for g in ("torch", "onednn")
    ]
    assert [e.gemm for e in engines] == ["torch", "onednn"]
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=())
    a, b = (e.generate(PROMPTS, greedy) for e in engines)
    assert torch.equal(a.response_ids, b.response_ids)
    a, b = (e.generate(PROMPTS, SamplingParams(max_new_tokens=16, stop_token_ids=())) for e in engines)
    agree = (a.response_ids == b.response_ids).cumprod(1).bool()  # up to the first token the two draw differently
    assert agree[:, :4].all() and (a.logprobs - b.logprobs)[agree].abs().max() < 1e-5


@pytest.mark.parametrize("matmul", ["native", "fp32-accumulate"])
def test_mismatch_ordering_fp32_fp16_bf16(builtin_dir, matmul):
    prompts = [TOK(p).input_ids for p in ["97-7:", "250-9:", "61-4:", "140-5:"]] * 4
    values = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        eng = NativeEngine.from_pretrained(builtin_dir, dtype=dt, device="cpu", seed=0, matmul=matmul)
        r = eng.generate(prompts, SamplingParams(max_new_tokens=128, stop_token_ids=(1,)))
        lr = Learner.from_pretrained(builtin_dir, PrecisionPolicy(dt, dt), model_cfg=ModelConfig(matmul=matmul))
        values[dt] = mismatch_metrics(lr.recompute(r), r.logprobs, r.mask)["abs_log_ratio_mean"]
    assert values[torch.float32] < values[torch.float16] < values[torch.bfloat16]
    assert values[torch.float32] < 1e-5


def test_top_p_top_k_logprobs_are_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    q = process_logits(logits, temperature=1.0, top_k=0, top_p=0.7).softmax(-1)
    p = logits.softmax(-1)
    # top-p 0.7 keeps tokens 0 and 1 (0.61 < 0.7 after token 0, crossed by token 1), renormalised
    assert q[0, 2] == 0 and q[0, 3] == 0
    torch.testing.assert_close(q[0, :2], p[0, :2] / p[0, :2].sum())
    lp = token_logprobs(logits, torch.tensor([1]), top_k=1)
    assert lp.item() == float("-inf")  # outside the top-1 support
    lp = token_logprobs(logits * 2, torch.tensor([0]), temperature=2.0)
    torch.testing.assert_close(lp, p[:, 0].log())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunked_logprobs_and_entropy_equal_the_whole_tensors_to_the_bit(dtype, monkeypatch):
    # the learner's log-probs over a large vocabulary are computed a chunk of positions at a time, forward and
    # backward; every step is a function of one row, so values and gradients are those of the whole tensor
    import unison.sampling as sampling
    from unison.sampling import chunked_entropy, chunked_token_logprobs, entropy

    monkeypatch.setattr(sampling, "CHUNK_VALUES", 1000)  # 3 positions a chunk
    torch.manual_seed(0)
    W = torch.randn(300, 32).to(dtype).requires_grad_()
    h, tok = torch.randn(3, 17, 32).to(dtype), torch.randint(0, 300, (3, 17))
    for settings in ((1.0, 0, 1.0), (0.7, 20, 0.9)):
        got = []
        for f in (token_logprobs, chunked_token_logprobs):
            W.grad = None
            lp = f(h @ W.t(), tok, *settings)
            (lp * torch.arange(lp.numel()).view(lp.shape).cos()).sum().backward()
            got.append((lp.detach(), W.grad.clone()))
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
        logits, seen = h @ W.t(), []
        logits.register_hook(lambda g, seen=seen: seen.append(g.data_ptr()))
        chunked_token_logprobs(logits, tok, *settings).sum().backward()
        assert seen == [logits.data_ptr()]  # the gradient written over the logits, no second such tensor
        with torch.no_grad():
            logits = h @ W.t()
            assert torch.equal(chunked_token_logprobs(logits, tok, *settings), got[0][0])
            assert torch.equal(chunked_entropy(logits, settings[0]), entropy(logits, settings[0]))


def test_sample_draws_from_the_processed_distribution():
    n = 40_000
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0], [9.0, -9.0, 0.0, 0.0]])
    # top-k 2 keeps e^2 / (e^2 + e) = 0.731059 and 0.268941 of row 0; a tie at the k-th value keeps all tied
    # tokens: all 4 of row 1, and of row 2 e^9 / (e^9 + 2) = 0.999753 and 1 / (e^9 + 2) = 1.2338e-4 twice
    expected = torch.tensor(
        [
            [0.731059, 0.268941, 0.0, 0.0],
            [0.25, 0.25, 0.25, 0.25],
            [0.999753, 0.0, 1.2338e-4, 1.2338e-4],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(process_logits(rows, top_k=2).softmax(-1).double(), expected, atol=1e-6, rtol=1e-4)
    logits = rows.repeat_interleave(n, 0)
    tokens, logp = sample(logits, g, temperature=1.0, top_k=2, top_p=1.0)
    freq = torch.stack([torch.bincount(t, minlength=4) for t in tokens.view(3, n)]).double() / n
    assert (freq[expected == 0] == 0).all()  # never a token outside the support
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt() + 1e-12).all(), freq
    # the log-probability returned is that of the processed distribution, for the token drawn
    torch.testing.assert_close(logp, token_logprobs(logits, tokens, top_k=2))
    # 272 tokens of a peaked distribution: every frequency within 5 sigma of the softmax
    wide = torch.randn(1, 272, generator=g) * 3
    tokens, _ = sample(wide.expand(n, -1), g, temperature=1.0, top_k=0, top_p=1.0)
    p = wide[0].double().softmax(-1)
    freq = torch.bincount(tokens, minlength=272).double() / n
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1 / n).all()


def test_sync_verifies_and_catches_corruption(tiny_dir):
    e = engine(tiny_dir, torch.float16)
    lr = Learner.from_pretrained(tiny_dir, PrecisionPolicy(torch.float16, torch.float16), "cpu")
    assert lr.sync(e)["sync/checksum_ok"] == 1.0
    original = e.load_weights

    def corrupt(named):
        original(named)
        with torch.no_grad():
            next(iter(e.model.parameters())).view(-1)[0] += 1.0

    e.load_weights = corrupt
    with pytest.raises(WeightSyncError, match="checksum"):
        lr.sync(e)


def test_weights_loaded_in_place_change_outputs_like_a_fresh_engine(tiny_dir, tmp_path):
    from unison.models import build_tokenizer, random_model, save_model

    other = save_model(random_model(seed=7), build_tokenizer(), tmp_path / "other")
    p = SamplingParams(max_new_tokens=10, stop_token_ids=())
    fresh = engine(other, torch.bfloat16, seed=5).generate(PROMPTS, p)
    e = engine(tiny_dir, torch.bfloat16, seed=5)
    e.load_weights((n, t.to(torch.bfloat16)) for n, t in load_model(other).named_parameters())
    loaded = e.generate(PROMPTS, p)
    assert torch.equal(fresh.response_ids, loaded.response_ids) and torch.equal(fresh.logprobs, loaded.logprobs)


@pytest.mark.parametrize("name", ["qwen2-window", "mistral-window"])
def test_sliding_window_fast_path_equals_the_models_own_forward_in_every_layout(name, monkeypatch):
    # the layer-by-layer step (fp16/bf16 on a CPU with fast units) and the flat one (fp32 products), in fp32, against
    # the model's own forward: rows of other prompt lengths (left padding), past the window, with rows dropped
    from unison.archs import tiny_model
    from unison.conformance import reference_logprobs

    prompts = [list(range(5, 5 + n)) for n in (3, 9, 14, 6)] * 2
    p = SamplingParams(max_new_tokens=20, stop_token_ids=tuple(range(100, 120)))
    for flat in decode_variants(monkeypatch):
        eng = NativeEngine(tiny_model(name), torch.float32, "cpu", seed=2)
        assert eng.decode_path() == ("fast", "")
        r = eng.generate(prompts, p)
        d = (r.logprobs - reference_logprobs(tiny_model(name), r)).abs()[r.mask]
        assert d.mean() < 1e-6 and d.max() < 1e-4 and r.lengths.max() > 8, (flat, d.mean(), d.max())


def test_fallback_path_matches_fast_path(tiny_dir):
    p = SamplingParams(max_new_tokens=10, temperature=0.0, stop_token_ids=())
    fast = engine(tiny_dir).generate(PROMPTS, p)
    slow_engine = engine(tiny_dir)
    slow_engine.decode_path = lambda: ("fallback", "tested")  # the model's own forward and cache
    slow = slow_engine.generate(PROMPTS, p)
    assert torch.equal(fast.response_ids, slow.response_ids)


# ---- mixture-of-experts models on the fast path ---------------------------------------------------------------
# the three MoE families, a Qwen2-MoE with a dense layer among its sparse ones (`mlp_only_layers`), and a Mixtral
# with an 8-token window on every layer
MOE_CASES = [
    ("qwen2-moe", {}),
    ("qwen3-moe", {}),
    ("mixtral", {}),
    ("qwen2-moe", {"num_hidden_layers": 3, "mlp_only_layers": [1]}),
    ("mixtral", {"sliding_window": 8}),
]
MOE_IDS = ["qwen2-moe", "qwen3-moe", "mixtral", "qwen2-moe-dense-layer", "mixtral-window"]


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "layered"])
@pytest.mark.parametrize(("name", "overrides"), MOE_CASES, ids=MOE_IDS)
def test_moe_families_take_the_fast_path_with_their_blocks_called_as_modules(name, overrides, flat, monkeypatch):
    # sparse layers are not packed; the MoE block (router, experts, shared expert) runs as the model's module on
    # the prefill and on every decode step, in both step variants; a dense layer is packed as a dense family's
    from unison.archs import tiny_model
    from unison.rollout.native import DecodeWeights, _StaticDecode

    eng = NativeEngine(tiny_model(name, **overrides), torch.float32, "cpu", seed=0)
    assert eng.decode_path() == ("fast", "")
    layers = eng.model.model.layers
    sparse = [hasattr(layer.mlp, "experts") for layer in layers]
    assert sparse == [i not in overrides.get("mlp_only_layers", []) for i in range(len(layers))]
    packed = DecodeWeights(eng.model, eng.compute_dtype).layers
    assert [w["sparse"] for w in packed] == sparse
    assert all((w["gate_up"] is None) == s and (w["down"] is None) == s for w, s in zip(packed, sparse))
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    init = _StaticDecode.__init__

    def layered(self, *a, **k):
        init(self, *a, **k)
        self.flat = None

    if not flat:
        monkeypatch.setattr(_StaticDecode, "__init__", layered)
    eng.generate(PROMPTS, SamplingParams(max_new_tokens=6, stop_token_ids=()))
    assert calls == [1 + 5 if s else 0 for s in sparse], calls  # the prefill, then 5 steps


@pytest.mark.parametrize(("name", "overrides"), MOE_CASES, ids=MOE_IDS)
def test_moe_fast_path_equals_the_models_own_forward_in_every_layout(name, overrides, monkeypatch):
    # fp32, both step variants: rows of other prompt lengths (left padding), identical prompts (one prefill), rows
    # dropped; log-probs against the model's own forward, and against the fallback's sampling the same tokens
    from unison.archs import tiny_model
    from unison.conformance import MAX_TOL, MEAN_TOL, reference_logprobs

    prompts = [list(range(5, 5 + n)) for n in (3, 9, 14, 6)] * 2
    for flat in decode_variants(monkeypatch):
        eng = NativeEngine(tiny_model(name, **overrides), torch.float32, "cpu", seed=2)
        r = eng.generate(prompts, SamplingParams(max_new_tokens=20, stop_token_ids=tuple(range(100, 120))))
        d = (r.logprobs - reference_logprobs(tiny_model(name, **overrides), r)).abs()[r.mask]
        assert d.mean() <= MEAN_TOL and d.max() <= MAX_TOL and r.lengths.max() > 8, (flat, d.mean(), d.max())
        assert (r.lengths < 20).sum() >= 2  # some rows stopped early: the batch was compacted
        p = SamplingParams(max_new_tokens=16, stop_token_ids=())  # no row dropped: both paths draw alike
        fast = NativeEngine(tiny_model(name, **overrides), torch.float32, "cpu", seed=3).generate(prompts, p)
        slow_engine = NativeEngine(tiny_model(name, **overrides), torch.float32, "cpu", seed=3)
        slow_engine.forced_fallback = "tested"
        slow = slow_engine.generate(prompts, p)
        assert torch.equal(fast.response_ids, slow.response_ids)
        assert (fast.logprobs - slow.logprobs).abs().mean() <= MEAN_TOL


@pytest.mark.parametrize("matmul", ["native", "fp32-accumulate"])
@pytest.mark.parametrize("name", ["qwen2-moe", "qwen3-moe", "mixtral"])
def test_moe_fast_path_mismatch_in_fp16_bf16_is_finite_and_within_the_dense_band(name, matmul):
    # the layer-by-layer step (native fp16/bf16 kernels) and the flat one (fp32-accumulate): the engine-learner
    # mismatch is above fp32's and inside the band a run's self-test allows every family (`SELF_TEST_BANDS`), which
    # the dense families' fast path meets
    from unison.archs import tiny_model
    from unison.conformance import SELF_TEST_BANDS, default_prompts

    prompts = [p for seed in range(3) for p in default_prompts(seed)]
    gaps = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        eng = NativeEngine(tiny_model(name), dtype, "cpu", seed=0, matmul=matmul)
        assert eng.decode_path() == ("fast", "")
        r = eng.generate(prompts, SamplingParams(max_new_tokens=24, stop_token_ids=()))
        lr = Learner(tiny_model(name), PrecisionPolicy(dtype, dtype), model_cfg=ModelConfig(matmul=matmul))
        gaps[dtype] = float((lr.recompute(r) - r.logprobs).abs()[r.mask].mean())
    for dtype in (torch.float16, torch.bfloat16):
        assert gaps[torch.float32] < gaps[dtype] < SELF_TEST_BANDS[dtype], gaps


def _random_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=272,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["builtin", "qwen3", "qwen2-window", "mistral-window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_flat_decode_step_computes_the_layerwise_forward(builtin_dir, arch, dtype):
    # the decode step with fp32 activations (fp32, and fp16/bf16 in fp32-accumulate mode) against the engine's
    # layer-by-layer forward: same roundings, so the same logits up to fp32 summation order (in fp32 the residual
    # add fused into the product changes it by a few units in the last place). Qwen3: grouped heads and q/k norms.
    from unison.archs import tiny_model
    from unison.rollout.native import _StaticDecode

    # fp32-accumulate: what `auto` gives on a CPU without fast fp16/bf16 units (fp32 runs the flat step either way)
    # (the windowed models: 8-token windows, which the 14 slots of this test pass)
    model = {"builtin": None, "qwen3": _random_qwen3}.get(arch, lambda: tiny_model(arch))
    eng = (
        NativeEngine.from_pretrained(builtin_dir, dtype, "cpu", matmul="fp32-accumulate")
        if arch == "builtin"
        else NativeEngine(model(), dtype, "cpu", matmul="fp32-accumulate")
    )
    prompts = [p + [5] * (8 - len(p)) for p in PROMPTS]  # a common length; rows still start at other positions
    ids = torch.tensor(prompts)
    pad_left = torch.tensor([0, 1, 2, 0, 3, 0, 1, 0])
    ids[torch.arange(8)[:, None] < pad_left[:, None].expand(8, 8)] = 0
    flat, layered = (_StaticDecode(eng, ids, pad_left, 6) for _ in range(2))
    assert flat.flat is not None
    layered.flat = None
    with torch.no_grad():
        torch.testing.assert_close(flat.prefill(), layered.prefill(), rtol=0, atol=0)
        for t in range(6):
            tok = torch.randint(5, 200, (8,), generator=torch.Generator().manual_seed(t))
            a, b = flat.step(t, tok), layered.step(t, tok).float()
            tol = {torch.float32: 16 * 2.0**-23, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}[dtype]
            assert (a - b).abs().max() <= tol * b.abs().max(), (t, (a - b).abs().max())


def test_finished_rows_dropped_mid_batch_keep_their_results(tiny_dir):
    # stop on many tokens so rows finish at different times and the batch is compacted along the way
    stops = tuple(range(20, 60))
    p = SamplingParams(max_new_tokens=30, stop_token_ids=stops)
    r = engine(tiny_dir, seed=11).generate(PROMPTS * 4, p)
    lr = Learner.from_pretrained(tiny_dir, PrecisionPolicy(torch.float32, torch.float32), "cpu")
    assert mismatch_metrics(lr.recompute(r), r.logprobs, r.mask)["abs_log_ratio_mean"] < 1e-5
    for row, n, fin in zip(r.response_ids, r.lengths, r.finished):
        assert bool(fin) == (int(row[n - 1]) in stops)


def test_identical_prompts_are_prefilled_once(tiny_dir, monkeypatch):
    # a group's samples share one prompt: the prefill runs each distinct prompt once and copies its keys, values and
    # last logits to every row of it. Prompts that pad to the same row but start at other positions (a prompt that
    # begins with the pad token) are different prompts.
    import unison.rollout.native as native

    eng = engine(tiny_dir)
    pad = eng.pad_token_id
    prompts = [[pad, 40, 41], [40, 41], [7, 8, 9], [40, 41], [pad, 40, 41], [7, 8, 9]]
    ids = torch.tensor([[pad] * (3 - len(p)) + p for p in prompts])
    pad_left = torch.tensor([3 - len(p) for p in prompts])
    rows_run = []
    forward = eng._forward
    monkeypatch.setattr(eng, "_forward", lambda w, x, *a: rows_run.append(len(x)) or forward(w, x, *a))
    shared = native._StaticDecode(eng, ids, pad_left, 4)
    with torch.no_grad():
        logits = shared.prefill()
    assert rows_run == [3]  # [pad, 40, 41] (x2), [40, 41] (x2), [7, 8, 9] (x2)
    monkeypatch.setattr(native, "distinct_rows", lambda x: (torch.arange(len(x)), torch.arange(len(x))))
    each = native._StaticDecode(eng, ids, pad_left, 4)
    with torch.no_grad():
        expected = each.prefill()
    assert rows_run == [3, 6]
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(shared.cache.kv[..., :3, :], each.cache.kv[..., :3, :])
    assert not torch.equal(logits[0], logits[1])  # the leading pad token is part of the first prompt
    with torch.no_grad():  # decoding goes on from the copied cache as from its own
        tok = torch.tensor([50, 51, 52, 53, 54, 55])
        torch.testing.assert_close(shared.step(0, tok), each.step(0, tok))


def test_released_weights_come_back_with_the_next_load(tiny_dir):
    # a synchronous run frees the engine's weights while the learner updates; the load that follows allocates them
    # again, and the engine then samples what an engine that kept its weights samples, to the bit
    from unison.models import load_model

    p = SamplingParams(max_new_tokens=10, stop_token_ids=())
    weights = [(n, t.to(torch.float16)) for n, t in load_model(tiny_dir).named_parameters()]
    kept, released = engine(tiny_dir, torch.float16, seed=3), engine(tiny_dir, torch.float16, seed=3)
    released.release_weights()
    assert all(q.numel() == 0 for q in released.model.parameters())
    with pytest.raises(RuntimeError, match="load_weights before generate"):
        released.generate(PROMPTS, p)
    with pytest.raises(ValueError, match="released parameters empty"):
        released.load_weights(weights[:1])
    released.load_weights(weights)
    kept.load_weights(weights)
    assert released.weights_checksum() == kept.weights_checksum()
    a, b = kept.generate(PROMPTS, p), released.generate(PROMPTS, p)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)


def test_a_released_engine_takes_the_tensors_it_is_given(tiny_dir):
    from unison.models import load_model

    e = engine(tiny_dir, torch.float32)
    weights = [(n, t.detach().clone()) for n, t in load_model(tiny_dir).named_parameters()]
    e.release_weights()
    e.load_weights(weights)
    held = dict(e.model.named_parameters())
    assert all(held[n].data_ptr() == t.data_ptr() for n, t in weights)  # no second copy during the sync
    assert not any(q.requires_grad for q in e.model.parameters())
