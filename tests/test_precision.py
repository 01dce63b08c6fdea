import math

import pytest
import torch

from unison.errors import UserError
from unison.matmul import set_matmul
from unison.precision import (
    LossScaleFloorError,
    LossScaler,
    MasterWeights,
    PrecisionPolicy,
    backward_and_step,
    cast_module,
    checksum,
    parse_precision,
    resolve_device,
)


def test_names_and_long_forms():
    assert parse_precision("fp32") is torch.float32
    assert parse_precision("float16") is torch.float16
    assert parse_precision("BF16") is torch.bfloat16
    assert parse_precision("half") is torch.float16
    with pytest.raises(UserError, match="choose one of: fp32, bf16, fp16"):
        parse_precision("fp8")


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_policy_separate_dtypes():
    p = PrecisionPolicy.from_names("fp32", "bf16")
    assert p.rollout is torch.float32 and p.train is torch.bfloat16 and p.master is torch.float32
    assert not p.needs_loss_scaling
    assert PrecisionPolicy.from_names("fp16", "fp16").needs_loss_scaling


def test_scaler_backs_off_and_skips_then_grows():
    s = LossScaler(init_scale=2.0**16, growth_interval=3)
    s.update(found_nonfinite=True)
    assert s.scale == 2.0**15 and s.skipped_steps == 1
    for _ in range(2):
        s.update(False)
    assert s.scale == 2.0**15  # not yet: 2 finite steps
    s.update(False)
    assert s.scale == 2.0**16  # grew x2 after 3 finite steps in a row
    s.update(True)
    s.update(False)
    s.update(False)
    assert s.scale == 2.0**15  # the interval restarts after an overflow


def test_scaler_floor_stops_with_message():
    s = LossScaler(init_scale=4.0, min_scale=1.0)
    s.update(True)
    s.update(True)
    with pytest.raises(LossScaleFloorError, match="below its floor"):
        s.update(True)


def test_scaler_default_matches_paper():
    s = LossScaler()
    assert s.scale == 65536.0 and s.growth_interval == 400 and s.backoff_factor == 0.5 and s.growth_factor == 2.0


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_grad_never_reaches_master(bad):
    model = _tiny()
    w = MasterWeights(model, torch.float16)
    opt = torch.optim.AdamW(w.params, lr=1e-1)
    scaler = LossScaler()
    before = [p.detach().clone() for p in w.params]
    x = torch.randn(2, 4, dtype=torch.float16)

    def loss():
        return model(x).float().sum() * bad

    res = backward_and_step([loss()], w, opt, scaler)
    assert res.skipped and scaler.skipped_steps == 1 and scaler.scale == 2.0**15
    for a, b in zip(before, w.params):
        assert torch.equal(a, b) and torch.isfinite(b).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_overflow_from_scaling_is_skipped_then_recovers():
    model = _tiny()
    w = MasterWeights(model, torch.float16)
    opt = torch.optim.AdamW(w.params, lr=1e-2)
    scaler = LossScaler(init_scale=2.0**30)  # scaled fp16 gradients overflow to inf
    x = torch.randn(8, 4, dtype=torch.float16)
    results = [backward_and_step([model(x).float().pow(2).sum()], w, opt, scaler) for _ in range(30)]
    assert results[0].skipped
    assert not results[-1].skipped  # backed off into range
    assert all(torch.isfinite(p).all() for p in w.params)
    assert scaler.skipped_steps == sum(r.skipped for r in results)


def test_master_weights_fp32_and_model_in_train_dtype():
    model = _tiny()
    w = MasterWeights(model, torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in w.params)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    opt = torch.optim.SGD(w.params, lr=0.5)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    scaler = LossScaler(enabled=False)
    backward_and_step([model(x).float().sum()], w, opt, scaler)
    for p, m in zip(model.parameters(), w.params):
        assert torch.equal(p, m.to(torch.bfloat16))  # compute copy re-cast from the updated master


def test_16bit_gradients_go_into_the_fp32_ones_as_the_backward_pass_finishes_each():
    # no 16-bit gradient is left beside the fp32 ones (the step's memory), and the sum over micro-batches is the
    # one the fp16 gradients would give added after each backward pass
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    w = MasterWeights(model, torch.float16)
    assert all(m.data_ptr() != p.data_ptr() for m, p in zip(w.params, model.parameters()))
    seen = []
    model[2].weight.register_hook(lambda g: seen.append([p.grad is None for p in model.parameters()]))
    xs = [torch.randn(3, 4, dtype=torch.float16) for _ in range(2)]
    want = [torch.zeros_like(m) for m in w.params]
    for x in xs:
        ref = torch.nn.Sequential(*[torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)]).half()
        ref.load_state_dict(model.state_dict())
        ref(x).float().sum().backward()
        for acc, p in zip(want, ref.parameters()):
            acc.add_(p.grad)
        model(x).float().sum().backward()
        assert all(p.grad is None for p in model.parameters())
    assert seen and all(all(flags) for flags in seen)
    for m, acc in zip(w.params, want):
        assert torch.equal(m.grad, acc)


def test_micro_batches_sum_like_one_batch():
    x = torch.randn(8, 4)
    m1, m2 = _tiny(), _tiny()
    w1, w2 = MasterWeights(m1, torch.float32), MasterWeights(m2, torch.float32)
    o1, o2 = torch.optim.SGD(w1.params, lr=0.1), torch.optim.SGD(w2.params, lr=0.1)
    s = LossScaler(enabled=False)
    backward_and_step([m1(x).sum()], w1, o1, s, max_grad_norm=None)
    backward_and_step([m2(x[:4]).sum(), m2(x[4:]).sum()], w2, o2, s, max_grad_norm=None)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b)


def test_clip_uses_unscaled_norm():
    model = _tiny()
    w = MasterWeights(model, torch.float32)
    opt = torch.optim.SGD(w.params, lr=1.0)
    x = torch.randn(4, 4)
    res = backward_and_step([model(x).sum() * 1e3], w, opt, LossScaler(init_scale=1024.0), max_grad_norm=1.0)
    assert res.grad_norm > 1.0 and res.loss_scale == 1024.0  # the reported norm is unscaled and before clipping


def test_checksum_catches_one_bit():
    a = {"w": torch.randn(5, 3, dtype=torch.float16), "b": torch.randn(3)}
    c1 = checksum(a.items())
    b = {k: v.clone() for k, v in a.items()}
    b["w"].view(-1).view(torch.int16)[7] ^= 1
    assert checksum(b.items()) != c1
    assert checksum(list(a.items())[::-1]) == c1  # order of the pairs does not matter


def test_cast_keeps_rotary_frequencies_fp32():
    from unison.models import random_model

    m = cast_module(random_model(), torch.float16)
    bufs = dict(m.named_buffers())
    inv = [v for k, v in bufs.items() if k.endswith("inv_freq")]
    assert inv and all(b.dtype == torch.float32 for b in inv)
    assert m.model.embed_tokens.weight.dtype == torch.float16


def test_fp32_accumulate_matches_rounded_fp32_product():
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    set_matmul(lin, "fp32-accumulate")
    want = (x.float() @ lin.weight.float().T + lin.bias.float()).to(torch.bfloat16)
    assert torch.equal(lin(x), want)
    set_matmul(lin, "native")
    assert "forward" not in lin.__dict__


def test_auto_is_native_only_for_a_dtype_the_cpu_has_instructions_for():
    from unison.matmul import cpu_has_instructions_for

    zen4 = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}  # AVX-512 BF16, no FP16
    sapphire_rapids = {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}
    avx2 = {"avx2", "fma", "f16c"}
    assert cpu_has_instructions_for(torch.bfloat16, zen4) and not cpu_has_instructions_for(torch.float16, zen4)
    assert all(cpu_has_instructions_for(d, sapphire_rapids) for d in (torch.float16, torch.bfloat16))
    assert not any(cpu_has_instructions_for(d, avx2) for d in (torch.float16, torch.bfloat16))


def test_gemm_auto_is_onednn_only_on_avx512_cpus_not_made_by_intel():
    from unison.matmul import gemm_kernel, onednn_is_faster

    zen5 = {"avx2", "avx512f", "avx512_bf16"}
    assert onednn_is_faster("AuthenticAMD", zen5)
    assert not onednn_is_faster("GenuineIntel", zen5 | {"amx_bf16"})  # MKL has its AVX-512 kernels there
    assert not onednn_is_faster("AuthenticAMD", {"avx2", "fma"})
    assert gemm_kernel("torch", "cpu") == "torch" and gemm_kernel("auto", "cpu") in ("torch", "onednn")
    with pytest.raises(UserError, match="choose one of: auto, torch, onednn"):
        gemm_kernel("mkl", "cpu")


def _composite(x, w, b):
    return torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


def _run_linear(f, lin, x0):
    lin.zero_grad()
    x = x0.clone().requires_grad_()
    y = f(x, lin.weight, lin.bias)
    (y.float() * torch.arange(y.numel()).view(y.shape).float().sin()).sum().backward()
    return [y, x.grad, lin.weight.grad, lin.bias.grad if lin.bias is not None else torch.zeros(())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_linear_is_autograd_through_the_upcasts_to_the_bit_with_torch_kernels(dtype, bias):
    # the fp32-accumulate linear keeps its 16-bit operands for the backward pass instead of fp32 copies; with
    # PyTorch's kernels it computes what autograd computes through x.float() and W.float(), bit for bit
    from unison.matmul import Fp32Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160, bias=bias).to(dtype)
    for shape in ((37, 96), (3, 11, 96)):
        x0 = torch.randn(*shape).to(dtype)
        want = _run_linear(_composite, lin, x0)
        got = _run_linear(lambda x, w, b: Fp32Linear.apply(x, w, b, "torch"), lin, x0)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(want, got))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp32_linear_with_onednn_agrees_with_torch_to_fp32_rounding_and_is_deterministic(dtype):
    from unison.matmul import Fp32Linear, set_matmul

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160).to(dtype)
    x0 = torch.randn(5, 7, 96).to(dtype)
    want = _run_linear(lambda x, w, b: Fp32Linear.apply(x, w, b, "torch"), lin, x0)
    got = _run_linear(lambda x, w, b: Fp32Linear.apply(x, w, b, "onednn"), lin, x0)
    again = _run_linear(lambda x, w, b: Fp32Linear.apply(x, w, b, "onednn"), lin, x0)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for a, b, c in zip(want, got, again):
        assert torch.equal(b, c) and b.dtype == a.dtype
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)
    set_matmul(lin, "native" if dtype == torch.float32 else "fp32-accumulate", "onednn")
    assert lin.gemm == "onednn" and torch.equal(lin(x0), got[0])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_large_16_bit_weight_backward_by_row_chunks_agrees_with_the_whole(dtype, monkeypatch):
    # an LM head's backward upcasts the incoming gradient and the weight a chunk of output rows at a time; the
    # chunks' input gradients are summed in fp32, so the result is the unchunked one to fp32 rounding, rounded
    from unison import matmul
    from unison.matmul import Fp32Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160).to(dtype)
    x0 = torch.randn(5, 7, 96).to(dtype)
    want = _run_linear(lambda x, w, b: Fp32Linear.apply(x, w, b, "torch"), lin, x0)
    monkeypatch.setattr(matmul, "GRAD_CHUNK_VALUES", 4096)  # 160 x 96 weight: 4 chunks of 42 rows
    calls, add = [], matmul.onednn_linear_add
    monkeypatch.setattr(matmul, "onednn_linear_add", lambda *a: calls.append(1) or add(*a))
    got = _run_linear(lambda x, w, b: Fp32Linear.apply(x, w, b, "onednn"), lin, x0)
    assert len(calls) == 3  # the chunks after the first, added into the input's gradient
    for a, b in zip(want, got):
        assert b.dtype == a.dtype and torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)
