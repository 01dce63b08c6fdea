"""precision.bitwise (`unison.exact`): the rollout engine's log-prob of every sampled token, the learner's recompute
and the learner's first update's forward are equal as fp32 bit patterns, for every architecture family unison
accepts, in fp32, fp16 and bf16, whatever the batch; swapping one op of the exact path for the ordinary one breaks
it; a training run in the mode shows no mismatch, and a divergence stops it with one line."""

import json

import pytest
import torch

from unison import exact
from unison.archs import ARCHS, tiny_model
from unison.batching import MicroBatch
from unison.config import ModelConfig, OptimConfig, PrecisionConfig
from unison.errors import UserError
from unison.learner import Learner
from unison.mismatch import bits_equal
from unison.precision import PrecisionPolicy
from unison.rollout.base import SamplingParams
from unison.rollout.native import NativeEngine
from unison.trainer import train

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
g = torch.Generator().manual_seed(1)
PROMPTS = [torch.randint(5, 260, (n,), generator=g).tolist() for n in (12, 20, 9)]


def pair(name: str, precision: str, matmul: str, **sections):
    dtype = DTYPES[precision]
    engine = NativeEngine(tiny_model(name, seed=3), dtype, "cpu", seed=0, matmul=matmul, bitwise=True)
    learner = Learner(
        tiny_model(name, seed=3),
        PrecisionPolicy(dtype, dtype),
        precision=PrecisionConfig(rollout=precision, train=precision, bitwise=True),
        model_cfg=ModelConfig(matmul=matmul),
        optim=OptimConfig(lr=1e-3, micro_batch_size=5),
        **sections,
    )
    learner.sync(engine)
    return engine, learner


def first_update_logprobs(learner, ro, sampling: dict) -> torch.Tensor:
    """log pi of every row at the forward of one update (its micro-batches of 5 rows), with gradient."""
    out = torch.zeros(ro.response_ids.shape)

    def loss_fn(mb: MicroBatch):
        out[mb.rows, : mb.logp.shape[1]] = mb.logp.detach().float()
        return -(mb.logp * mb.batch.mask).sum() * 1e-3

    learner.update(ro, torch.arange(len(ro)), loss_fn, micro_batch_size=5, **sampling)
    return out


def agree(engine, learner, rows: int = 3, tokens: int = 12, params: SamplingParams | None = None) -> dict:
    params = params or SamplingParams(tokens, 1.0)
    sampling = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p}
    ro = engine.generate([p for p in PROMPTS for _ in range(rows)], params)
    mu, mask = ro.logprobs, ro.mask
    pi_old = learner.recompute(ro, micro_batch_size=64, **sampling)
    shuffled = torch.randperm(len(ro), generator=torch.Generator().manual_seed(0))
    again = torch.zeros_like(pi_old)  # other micro-batches: other rows beside each row
    again[shuffled] = learner.recompute(ro.select(shuffled), micro_batch_size=3, **sampling)[:, : mu.shape[1]]
    first = first_update_logprobs(learner, ro, sampling)
    frac = {
        k: float(bits_equal(v, mu)[mask].float().mean())
        for k, v in {"pi_old": pi_old, "other batches": again, "first update": first}.items()
    }
    return {**frac, "tokens": int(mask.sum())}


CASES = [(name, p, "fp32-accumulate" if p != "fp32" else "native") for name in sorted(ARCHS) for p in DTYPES]
CASES += [(name, p, "native") for name in ("qwen2", "gemma2", "qwen3-moe", "gpt2") for p in ("fp16", "bf16")]


@pytest.mark.parametrize("name, precision, matmul", CASES)
def test_engine_recompute_and_first_update_agree_to_the_bit(name, precision, matmul):
    engine, learner = pair(name, precision, matmul)
    r = agree(engine, learner)
    assert r["tokens"] >= 3 * 3 * 6 and r == {**r, "pi_old": 1.0, "other batches": 1.0, "first update": 1.0}, r


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_temperature_top_k_and_top_p_keep_the_bits(precision):
    engine, learner = pair("llama", precision, "native")
    r = agree(engine, learner, params=SamplingParams(12, temperature=0.7, top_k=40, top_p=0.9))
    assert r == {**r, "pi_old": 1.0, "other batches": 1.0, "first update": 1.0}, r


def test_each_exact_op_is_needed():
    # the ordinary attention in the learner alone, or the ordinary products for single rows, and bits differ
    engine, learner = pair("qwen2", "fp32", "native")
    learner.model.config._attn_implementation = "eager"
    assert agree(engine, learner)["pi_old"] < 1.0
    engine, learner = pair("qwen2", "fp32", "native")
    exact.F.linear = exact._linear  # PyTorch's own products: a single row takes another kernel than a batch
    try:
        r = agree(engine, learner, rows=1)
    finally:
        exact.F.linear = exact._dispatch_linear
    assert r["pi_old"] < 1.0


def test_left_padded_rows_need_their_keys_realigned(monkeypatch):
    # prompts of 12, 20 and 9 tokens decode in one batch, padded on the left: with each row's keys left where the
    # padding puts them, a query meets other chunks of keys than in the learner's unpadded forward, and bits differ
    import contextlib

    import unison.rollout.native as native

    engine, learner = pair("llama", "fp32", "native")
    assert agree(engine, learner)["pi_old"] == 1.0
    monkeypatch.setattr(native, "left_padding", lambda pad: contextlib.nullcontext())
    engine, learner = pair("llama", "fp32", "native")
    assert agree(engine, learner, tokens=60)["pi_old"] < 1.0


TRAIN = [
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=32",
    "run.progress=false",
    "run.eval_prompts=4",
    "run.steps=2",
    "data.subset=builtin",
    "precision.bitwise=true",
]


def run_cfg(tmp_path, *extra):
    from unison.config import TrainConfig, load_config

    return load_config(TrainConfig, None, [*TRAIN, f"run.out={tmp_path}", *extra])


@pytest.mark.parametrize(
    "extra",
    [
        ["precision.rollout=fp16", "precision.train=fp16", "optim.train_batch_size=8"],
        ["precision.rollout=bf16", "precision.train=bf16", "optim.train_batch_size=4", "optim.epochs=2"],
    ],
)
def test_a_bitwise_run_has_no_mismatch(tmp_path, extra):
    # one update a step (pi_old from the update's forward), and two updates (its own pass, checked against the
    # first update's forward) over two epochs
    run = train(run_cfg(tmp_path, *extra, "model.matmul=fp32-accumulate"), quiet=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mismatch/bit_equal_frac"] == 1.0 and r["mismatch/k3"] == 0.0 for r in rows)
    assert len(rows) == 2 and rows[-1]["learner/updates"] >= 1


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_a_bitwise_lora_run_has_no_mismatch(tmp_path, precision):
    # the learner computes each adapted layer with the merged weight W + scale * B A, as the engine that holds it
    # does: log mu, log pi_old (its own pass, two updates a step) and the first update's forward agree to the bit
    extra = [f"precision.rollout={precision}", f"precision.train={precision}", "optim.train_batch_size=4"]
    run = train(run_cfg(tmp_path, *extra, "lora.enabled=true", "lora.rank=4", "optim.lr=1e-2"), quiet=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["learner/updates"] == 2 for r in rows)
    assert all(r["mismatch/bit_equal_frac"] == 1.0 and r["mismatch/max_abs_log_ratio"] == 0.0 for r in rows)


def test_the_merged_forward_gives_the_adapter_s_gradient():
    # exact mode's LoRA layer (one product with W + s B A) and peft's (W x + s B A x) compute the same function:
    # the same output and gradients of A and B to fp32 rounding
    from peft import LoraConfig, get_peft_model

    from unison.lora import merge_in_forward

    grads = []
    for merged in (False, True):
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(24, 40))
        torch.manual_seed(1)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
        if merged:
            merge_in_forward(model)
        x = torch.randn(7, 24, generator=torch.Generator().manual_seed(2))
        y = model(x)
        (y * torch.arange(y.numel()).view(y.shape).float().cos()).sum().backward()
        layer = model.base_model.model[0]
        grads.append((y.detach(), layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_divergence_stops_the_run_naming_step_row_token_and_module(tmp_path, monkeypatch):
    import unison.learner as learner_module

    def almost(model):  # exact, but the learner's last attention's output is off by a part in a thousand
        exact.make_exact(model)
        model.model.layers[-1].self_attn.register_forward_hook(lambda m, a, out: (out[0] * 1.001, *out[1:]))
        return model

    monkeypatch.setattr(learner_module, "make_exact", almost)
    with pytest.raises(
        exact.BitwiseMismatchError,
        match=r"at step 1, row \d+ .* response token \d+, log mu .*"
        r"differ .*first module whose output differs there: model\.layers\.3\.self_attn",
    ):
        train(
            run_cfg(tmp_path, "precision.rollout=fp32", "precision.train=fp32", "optim.train_batch_size=8"), quiet=True
        )
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["mismatch/bit_equal_frac"] < 1.0  # its metrics written first


@pytest.mark.parametrize(
    "extra, says",
    [
        (["precision.rollout=fp16", "precision.train=bf16"], "needs one dtype in both engines"),
        (["lora.enabled=true", "lora.dropout=0.1"], "with LoRA needs lora.dropout=0"),
        (["rollout.engine=vllm"], "computes with the learner's kernels"),
    ],
)
def test_what_cannot_be_exact_is_refused(tmp_path, extra, says):
    with pytest.raises(UserError, match=says):
        run_cfg(tmp_path, *extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blocked_product_s_gradient_is_the_ordinary_linear_gradient(dtype):
    # the forward runs on blocks of 32 rows; the backward needs no blocks and is PyTorch's own, to the bit
    torch.manual_seed(0)
    x0, w0, b0 = torch.randn(3, 45, 24).to(dtype), torch.randn(40, 24).to(dtype), torch.randn(40).to(dtype)
    grads = []
    for f in (exact.blocked_linear, exact._linear):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        (f(x, w, b).float() * torch.arange(3 * 45 * 40).view(3, 45, 40).float().cos()).sum().backward()
        grads.append((x.grad, w.grad, b.grad))
    (bx, bw, bb), (ox, ow, ob) = grads
    assert torch.equal(bx, ox) and torch.equal(bw, ow) and torch.allclose(bb.float(), ob.float(), rtol=1e-2)
