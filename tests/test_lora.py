"""LoRA through peft: what trains, what the engine receives, the gradient it takes, checkpoints, resume, export."""

import json

import pytest
import torch
from test_train import _group_rollouts, tiny_cfg

from unison.config import LoraConfig, ModelConfig, OptimConfig
from unison.learner import Learner, WeightSyncError
from unison.lora import adapt
from unison.precision import PrecisionPolicy
from unison.rollout.native import NativeEngine

FP16 = PrecisionPolicy(torch.float16, torch.float16)
FP32 = PrecisionPolicy(torch.float32, torch.float32)


def lora_learner(model_dir, policy, targets="auto", rank=4, alpha=8.0, adapter=None):
    from unison.models import load_model

    lora = LoraConfig(enabled=True, rank=rank, alpha=alpha, target_modules=targets)
    native = ModelConfig(matmul="native")
    model = adapt(load_model(model_dir), lora, adapter)
    return Learner(model, policy, optim=OptimConfig(lr=1e-2), model_cfg=native)


def one_update(learner, seed=0):
    """One optimizer step on random rollouts with a loss whose gradient reaches every adapter."""
    r = _group_rollouts([12, 9], group=2, T=8, seed=seed)
    weights = torch.linspace(-1, 1, r.mask.numel()).view_as(r.mask) / r.mask.sum()  # a per-token mean
    return learner.update(r, torch.arange(len(r)), lambda mb: (mb.logp * weights[mb.rows, : mb.logp.shape[1]]).sum())


def test_only_the_adapters_train_with_fp32_masters(tiny_dir):
    learner = lora_learner(tiny_dir, FP16)
    base = {n: p.detach().clone() for n, p in learner.model.named_parameters() if not p.requires_grad}
    assert base and all(p.dtype == torch.float16 for p in base.values())  # frozen, in the train dtype only
    assert learner.weights.names and all(".lora_" in n for n in learner.weights.names)
    assert all(p.dtype == torch.float32 for p in learner.weights.params)  # the masters
    assert sum(len(g["params"]) for g in learner.optimizer.param_groups) == len(learner.weights.names)
    before = {n: p.detach().clone() for n, p in learner.weights.named_master()}
    for seed in range(2):
        assert not one_update(learner, seed).skipped
    for n, p in learner.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    after = dict(learner.weights.named_master())
    assert all(not torch.equal(after[n], before[n]) for n in before if ".lora_B." in n)


def test_the_engine_holds_base_plus_adapter_to_the_bit(tiny_dir):
    from unison.models import load_model

    learner = lora_learner(tiny_dir, FP16)
    one_update(learner)
    engine = NativeEngine.from_pretrained(tiny_dir, torch.float16, "cpu", matmul="native")
    assert learner.sync(engine)["sync/checksum_ok"] == 1.0
    base = {n: p.detach() for n, p in load_model(tiny_dir).named_parameters()}
    masters = dict(learner.weights.named_master())
    held = dict(engine.model.named_parameters())
    assert set(held) == set(base)
    scale = 8.0 / 4
    adapted = 0
    for name, w in base.items():
        module = name.rsplit(".", 1)[0]
        a = masters.get(f"{module}.lora_A.default.weight")
        want = w.half().float()  # the base as the learner holds it (fp16)
        if a is not None and name.endswith(".weight"):
            b = masters[f"{module}.lora_B.default.weight"]
            want = want + (b @ a) * scale
            adapted += 1
        assert torch.equal(held[name].detach(), want.half()), name
    assert adapted == 4 * 7  # every linear layer of the 4 decoder blocks


def test_a_corrupted_adapter_sync_is_caught(tiny_dir):
    learner = lora_learner(tiny_dir, FP16, targets="q_proj,v_proj")
    one_update(learner)
    engine = NativeEngine.from_pretrained(tiny_dir, torch.float16, "cpu", matmul="native")
    original = engine.load_weights

    def corrupt(named):  # one bit of one merged weight lost on the way
        named = list(named)
        name, t = next((n, t) for n, t in named if n.endswith("q_proj.weight"))
        bad = t.clone()
        bad.view(torch.int16).view(-1)[3] ^= 1
        original([(n, bad if n == name else x) for n, x in named])

    engine.load_weights = corrupt
    with pytest.raises(WeightSyncError, match="checksum"):
        learner.sync(engine)


def test_the_lora_gradient_is_the_full_gradient_projected_on_its_directions(tiny_dir):
    # for W' = W + s B A, dL/dB = s G A^T and dL/dA = s B^T G, with G = dL/dW' the full fine-tuning gradient at
    # the same weights: in fp32 the adapters' gradients are those projections of it
    from unison.learner import SequenceBatch
    from unison.models import load_model

    learner = lora_learner(tiny_dir, FP32, targets="q_proj,down_proj", rank=3, alpha=6.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0, so that A's gradient is not 0 either
        for n, p in learner.model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    merged = dict(learner.export_weights(torch.float32))
    full = Learner(load_model(tiny_dir), FP32, model_cfg=ModelConfig(matmul="native"))
    full.weights.load_master(merged)
    r = _group_rollouts([12, 9], group=2, T=8)
    weights = torch.linspace(-1, 1, r.mask.numel()).view_as(r.mask)
    for lr in (learner, full):
        lr.model.zero_grad()
        (lr.logprobs(SequenceBatch.from_rollouts(r, 0, "cpu")) * weights).sum().backward()
    grads = {n: p.grad for n, p in full.model.named_parameters()}
    params = dict(learner.model.named_parameters())
    checked = 0
    for n, p in params.items():
        if ".lora_A." not in n:
            continue
        module = n.split(".lora_A.")[0]
        a, b = p.detach(), params[f"{module}.lora_B.default.weight"]
        G = grads[f"{module.replace('.base_layer', '')}.weight"]
        torch.testing.assert_close(b.grad, 2.0 * G @ a.T, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(p.grad, 2.0 * b.detach().T @ G, rtol=1e-4, atol=1e-7)
        checked += 1
    assert checked == 8


def test_train_resume_probe_eval_and_export(tiny_dir, tmp_path):
    from peft import PeftModel

    from unison.checkpoint import latest_checkpoint
    from unison.cli import main
    from unison.models import load_model
    from unison.trainer import train

    extra = {
        "lora.enabled": True,
        "lora.rank": 4,
        "lora.alpha": 8.0,
        "precision.rollout": "fp16",
        "precision.train": "fp16",
        "run.save_every": 2,
    }
    full = train(tiny_cfg(tiny_dir, tmp_path / "full", **{**extra, "run.steps": 4}), quiet=True)
    part = tiny_cfg(tiny_dir, tmp_path / "part", **{**extra, "run.steps": 2})
    train(part, quiet=True)
    part.run.steps = 4
    resumed = train(part, resume=True, quiet=True)
    a, b = latest_checkpoint(full), latest_checkpoint(resumed)
    assert (a / "adapter_config.json").is_file() and not (a / "model.safetensors").exists()
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/accuracy"] for r in rows] == [r["rollout/accuracy"] for r in again]
    # the checkpoint is a model path for every command; export merged, or the adapter alone in peft's format
    assert main(["export", str(full), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", str(full), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    merged = dict(load_model(tmp_path / "merged").named_parameters())
    via_peft = PeftModel.from_pretrained(load_model(tiny_dir), str(tmp_path / "adapter")).merge_and_unload()
    for n, p in via_peft.named_parameters():
        assert torch.equal(p, merged[n]), n
    assert main(["eval", "--model", str(a), "--num-prompts", "4", "--n", "2", "--json", str(tmp_path / "e.json")]) == 0
    assert (
        main(
            [
                "probe",
                "--model",
                str(a),
                "--num-prompts",
                "4",
                "--precisions",
                "fp16",
                "--max-new-tokens",
                "16",
                "--out",
                str(tmp_path / "probe"),
                "probe.exact=false",
            ]
        )
        == 0
    )
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert probe  # the learner on the adapter, the engine on the merged weights


def test_training_goes_on_from_a_saved_adapter_of_the_same_shape(tiny_dir, tmp_path):
    from unison.checkpoint import latest_checkpoint
    from unison.trainer import train

    extra = {"lora.enabled": True, "lora.rank": 4, "lora.alpha": 8.0, "lora.target_modules": "q_proj,v_proj"}
    first = latest_checkpoint(train(tiny_cfg(tiny_dir, tmp_path / "a", **extra), quiet=True))
    learner = lora_learner(tiny_dir, FP32, targets="q_proj,v_proj", adapter=first)
    saved = json.loads((first / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tiny_dir.absolute())
    from safetensors.torch import load_file

    stored = load_file(str(first / "adapter_model.safetensors"))
    for n, p in learner.weights.named_master():
        assert torch.equal(p, stored["base_model.model." + n.replace(".default.", ".")]), n
    train(tiny_cfg(first, tmp_path / "b", **extra), quiet=True)


def test_adapter_dropout_only_where_asked(tiny_dir):
    r = _group_rollouts([12, 9], group=2, T=8)
    for dropout, same in ((0.0, True), (0.5, False)):
        from unison.models import load_model

        lora = LoraConfig(enabled=True, rank=4, alpha=8.0, dropout=dropout)
        learner = Learner(adapt(load_model(tiny_dir), lora), FP32, model_cfg=ModelConfig(matmul="native"))
        with torch.no_grad():  # B != 0: the adapters' input reaches the output
            for n, p in learner.model.named_parameters():
                if ".lora_B." in n:
                    p.fill_(0.05)
        a, b = learner.recompute(r), learner.recompute(r)
        assert torch.equal(a, b) == same
        assert not any(m.training for n, m in learner.model.named_modules() if "lora_dropout" not in n)
