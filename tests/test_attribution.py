"""Attribution: with every component in fp32 in both engines the mismatch falls to the fp32 floor; with none,
nothing changes; the probe's --attribute table; what cannot be attributed is refused."""

from __future__ import annotations

import json

import pytest
import torch

from unison.attribution import COMPONENTS, upcast
from unison.config import ModelConfig
from unison.errors import UserError


def pair(dtype, components):
    from unison.learner import Learner
    from unison.models import load_model, load_tokenizer, resolve_model_dir
    from unison.precision import PrecisionPolicy
    from unison.rollout.native import NativeEngine

    path = resolve_model_dir("builtin")
    tok = load_tokenizer(path)
    learner = Learner(
        load_model(path, device="cpu", dtype=torch.float32),
        PrecisionPolicy(dtype, dtype),
        model_cfg=ModelConfig(matmul="native"),
    )
    engine = NativeEngine(load_model(path, device="cpu", dtype=torch.float32), dtype, "cpu", seed=0, matmul="native")
    learner.sync(engine)
    engine.upcast_components(components)
    upcast(learner.model, dtype, components)
    return tok, learner, engine


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_component_in_fp32_reaches_the_fp32_floor(dtype):
    from unison.rollout.base import SamplingParams

    gaps = {}
    for comps in ((), COMPONENTS):
        tok, learner, engine = pair(dtype, comps)
        assert engine.decode_path()[0] == "fallback"  # both engines run the model's own modules
        ro = engine.generate(
            [tok("12+34=")["input_ids"], tok("40+2=")["input_ids"]] * 4, SamplingParams(max_new_tokens=32)
        )
        gaps[comps] = (learner.recompute(ro) - ro.logprobs)[ro.mask].abs().mean().item()
    assert gaps[()] > 1e-5  # the precision's own mismatch
    assert gaps[COMPONENTS] < 1e-6  # fp32's floor (about 1e-7 on this model)


def test_no_component_changes_nothing():
    from unison.models import load_model, resolve_model_dir

    path = resolve_model_dir("builtin")
    a, b = (load_model(path, device="cpu", dtype=torch.float16) for _ in range(2))
    upcast(b, torch.float16, ())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_one_component_is_fp32_and_the_rest_is_not():
    from unison.models import load_model, resolve_model_dir

    m = load_model(resolve_model_dir("builtin"), device="cpu", dtype=torch.float16)
    upcast(m, torch.float16, ["mlp"])
    layer = m.model.layers[0]
    assert layer.mlp.up_proj.weight.dtype == torch.float32 and layer.self_attn.q_proj.weight.dtype == torch.float16
    with pytest.raises(UserError, match="unknown component 'kv'"):
        upcast(m, torch.float16, ["kv"])


def test_probe_attribute_table(tmp_path, capsys):
    from unison.cli import main

    code = main(
        [
            "probe",
            "--attribute",
            "--precisions",
            "fp32,bf16",
            "--num-prompts",
            "2",
            "--samples",
            "2",
            "--max-new-tokens",
            "16",
            "--out",
            str(tmp_path),
            "run.progress=false",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "bf16/bf16:" in out and "lm_head+attention+mlp+norms+residual" in out
    (setting,) = json.loads((tmp_path / "probe.json").read_text())["attribution"]  # fp32 has nothing to attribute
    names = [r["components"] for r in setting["runs"]]
    assert names == ["baseline", *COMPONENTS, "+".join(COMPONENTS)]
    assert setting["runs"][-1]["abs_log_ratio_mean"] < 1e-6
