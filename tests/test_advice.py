"""The precision advice on hand-made probe results, the gradient-underflow measure, and `probe --advise`."""

from __future__ import annotations

import json

import pytest

from unison.advice import advise, gradient_stats


def layers(peaks, where="residual", at=()):
    """Hand-made activation rows: layer i's largest |activation| peaks[i], in `where` for the layers `at` (the
    residual stream elsewhere)."""
    return [{"layer": i, "max_abs": v, "where": where if i in at else "residual"} for i, v in enumerate(peaks)]


GRADS_OK = {"underflow_frac": 1e-5, "max_abs": 0.02, "scale": 65536.0}
MISMATCH = {"fp16": {"exact_kl_mu_pi": 1e-6}, "bf16": {"exact_kl_mu_pi": 1e-4}}


def test_fp16_throughout_when_everything_fits():
    a = advise(layers([80, 120, 95, 60]), GRADS_OK, MISMATCH)
    assert a["recommendation"] == "fp16" and a["settings"] == {"precision.rollout": "fp16", "precision.train": "fp16"}
    assert any("100x" in r for r in a["reasons"]) and all(c["ok"] for c in a["checks"])


def test_named_layers_in_fp32_when_a_few_mlps_come_near_the_limit():
    peaks = [80, 30000, 95, 60, 70, 50, 40, 20]  # 65504 / 30000 = 2.2x < 4x
    a = advise(layers(peaks, "mlp_hidden", at=[1]), GRADS_OK, MISMATCH)
    assert a["recommendation"] == "fp16 + fp32 layers" and a["layers_near_limit"] == [1]
    assert a["settings"]["precision.on_activation_overflow"] == "fp32_layers"
    assert "layer 1 (mlp_hidden)" in a["reasons"][0]


@pytest.mark.parametrize("where", ["attention", "residual", "mlp_out"])
def test_bf16_when_a_block_fp32_layers_cannot_cure_comes_near_the_limit(where):
    # fp32 layers recompute an MLP's inner activation in fp32; an attention block (Gemma-style), the residual stream
    # or an MLP's output near 65504 stays in fp16: only bf16 holds them
    a = advise(layers([80, 30000, 95, 60, 70, 50, 40, 20], where, at=[1]), GRADS_OK, MISMATCH)
    assert a["recommendation"] == "bf16 + correction" and a["settings"]["precision.rollout"] == "bf16"
    assert any(f"layer 1 ({where}, 2.2x)" in r and "cannot keep" in r for r in a["reasons"]), a["reasons"]


def test_a_short_activation_sample_is_said():
    short = advise(layers([80, 120]), GRADS_OK, MISMATCH, tokens=40)
    assert short["recommendation"] == "fp16"  # what was measured fits, but the advice says how little that was
    assert any("measured on 40 tokens only: too few to rely on" in r for r in short["reasons"])
    assert {"check": "activation sample", "measured": "40 tokens", "limit": ">= 1024 tokens", "ok": False} in short[
        "checks"
    ]
    enough = advise(layers([80, 120]), GRADS_OK, MISMATCH, tokens=5000)
    assert not any("too few" in r for r in enough["reasons"])


def test_bf16_with_a_correction_when_fp16_range_does_not_hold():
    many = advise(layers([70000, 30000, 95, 60]), GRADS_OK, MISMATCH)  # half the layers near or past the limit
    assert many["recommendation"] == "bf16 + correction"
    assert many["settings"]["algorithm.preset"] == "grpo-seq-mis" and many["settings"]["precision.lm_head"] == "fp32"
    under = advise(layers([80, 90]), {"underflow_frac": 0.02, "max_abs": 1e-9, "scale": 65536.0}, MISMATCH)
    assert under["recommendation"] == "bf16 + correction" and "flush to zero" in under["reasons"][0]


@pytest.mark.parametrize("scale, expected", [(1e-30, 1.0), (1e30, 0.0)])
def test_gradient_underflow_share(scale, expected):
    import torch

    from unison.learner import Learner
    from unison.models import load_model, load_tokenizer, resolve_model_dir
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    path = resolve_model_dir("builtin")
    tok = load_tokenizer(path)
    fp32 = PrecisionPolicy(torch.float32, torch.float32)
    learner = Learner(load_model(path, device="cpu", dtype=torch.float32), fp32)
    engine = NativeEngine(load_model(path, device="cpu", dtype=torch.float32), torch.float32, "cpu")
    ro = engine.generate([tok("12+34=")["input_ids"]] * 4, SamplingParams(max_new_tokens=8))
    g = gradient_stats(learner, ro, scale=scale, passes=1)
    assert g["underflow_frac"] == expected and g["max_abs"] > 0


def test_probe_advise_writes_its_advice(tmp_path, capsys):
    from unison.cli import main

    code = main(
        [
            "probe",
            "--advise",
            "--precisions",
            "fp16,bf16",
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
    advice = json.loads((tmp_path / "probe.json").read_text())["advice"]
    assert code == 0 and "recommendation: " + advice["recommendation"] in out
    assert {c["check"].split(" (")[0] for c in advice["checks"]} >= {"fp16 activation headroom", "mismatch bf16 / fp16"}
