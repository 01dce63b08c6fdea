"""Reliability: a run killed with SIGKILL resumes bit for bit; checkpoints survive torn saves; FP16 activation
overflow is caught and named by layer in both engines; same seed, same run in every precision."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unison import checkpoint as ckpt
from unison.overflow import ActivationOverflowError, OverflowGuard, activation_stats, run_in_fp32

REWARD = f"{Path(__file__).parent / 'reward_fixture.py'}:even_length"  # varies, so the weights move every step


def train_args(model_dir, prompts, out, precision, steps):
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(prompts),
        "--out",
        str(out),
        "--precision",
        precision,
        "--steps",
        str(steps),
        f"data.reward={REWARD}",
        "data.template=plain",
        "run.eval_every=0",
        "run.eval_prompts=4",
        "run.save_every=1",
        "run.keep_checkpoints=2",
        "run.progress=false",
        "run.loggers=[jsonl]",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=24",
        "optim.train_batch_size=4",
        "optim.micro_batch_size=3",
        "optim.lr=1e-3",
        "data.max_prompts=8",
    ]


def cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # every run of a comparison uses the same thread count
    return subprocess.Popen(
        [sys.executable, "-m", "unison.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def comparable(run_dir: Path) -> dict:
    """Everything that must match bit for bit: final weights, metrics without timings, sample digests."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    samples = (run_dir / "samples.jsonl").read_text().splitlines()
    weights = ckpt.load_master(ckpt.latest_checkpoint(run_dir))
    return {"metrics": metrics, "samples": samples, "weights": weights}


def same(a: dict, b: dict) -> bool:
    return (
        a["metrics"] == b["metrics"]
        and a["samples"] == b["samples"]
        and a["weights"].keys() == b["weights"].keys()
        and all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"])
    )


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(f'{{"prompt": "{i}-3:", "answer": "0"}}\n' for i in range(10, 30)))
    return p


def test_sigkill_then_resume_is_bit_exact(tiny_dir, tmp_path, prompts):
    steps = 4
    ref = cli(train_args(tiny_dir, prompts, tmp_path / "ref", "fp16", steps))
    run = tmp_path / "killed"
    victim = cli(train_args(tiny_dir, prompts, run, "fp16", steps))
    first = run / "checkpoints" / "step-000001" / ckpt.MANIFEST
    deadline = time.monotonic() + 120
    while not first.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert ckpt.latest_checkpoint(run) is not None
    resumed = cli(train_args(tiny_dir, prompts, run, "fp16", steps) + ["--resume"])
    for p in (ref, resumed):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    a, b = comparable(tmp_path / "ref"), comparable(run)
    assert [r["step"] for r in b["metrics"]] == list(range(1, steps + 1))
    assert same(a, b)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_seed_same_run_every_precision(tiny_dir, tmp_path, prompts, precision):
    from unison.config import TrainConfig, load_config
    from unison.trainer import train

    def cfg(out):
        return load_config(
            TrainConfig,
            None,
            {
                "model.path": str(tiny_dir),
                "run.out": str(out),
                "run.steps": 2,
                "run.eval_every": 0,
                "run.eval_prompts": 4,
                "run.progress": False,
                "run.loggers": ["jsonl"],
                "rollout.prompts_per_step": 2,
                "rollout.group_size": 4,
                "rollout.max_new_tokens": 16,
                "optim.train_batch_size": 4,
                "optim.lr": 1e-3,
                "data.max_prompts": 8,
                "data.reward": REWARD,
                "data.source": str(prompts),
                "data.template": "plain",
                "precision.rollout": precision,
                "precision.train": precision,
            },
        )

    a, b = (comparable(train(cfg(tmp_path / f"r{i}"), quiet=True)) for i in range(2))
    assert same(a, b)


def test_resume_after_precision_change_uses_a_fresh_loss_scale(tiny_dir, tmp_path):
    from unison.config import TrainConfig, load_config
    from unison.trainer import train

    base = {
        "model.path": str(tiny_dir),
        "run.out": str(tmp_path / "r"),
        "run.eval_every": 0,
        "run.eval_prompts": 4,
        "run.progress": False,
        "run.loggers": ["jsonl"],
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 4,
        "rollout.max_new_tokens": 8,
        "optim.train_batch_size": 4,
        "data.max_prompts": 8,
    }
    train(load_config(TrainConfig, None, {**base, "run.steps": 1}), quiet=True)
    saved = (tmp_path / "r" / "config.yaml").read_text()
    changed = load_config(
        TrainConfig, None, {**base, "run.steps": 2, "precision.rollout": "bf16", "precision.train": "bf16"}
    )
    from unison.errors import UserError

    with pytest.raises(UserError, match="would change precision.rollout from 'fp16' to 'bf16'.*--allow-changes"):
        train(changed, resume=True, quiet=True)
    run = train(changed, resume=True, quiet=True, allow_changes=True)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 2 and row["precision/loss_scale"] == 1.0
    assert (run / "config.yaml").read_text() == saved  # the run's config as it was started
    logged = json.loads((run / "resumes.jsonl").read_text())
    assert logged == {
        "step": 1,
        "changes": {"precision.rollout": ["fp16", "bf16"], "precision.train": ["fp16", "bf16"]},
    }


# ---- checkpoints ---------------------------------------------------------------------------------------------
class _Model:
    """Just enough of a model for save_checkpoint."""

    def save_pretrained(self, path, state_dict, safe_serialization, max_shard_size=None):
        from safetensors.torch import save_file

        save_file(state_dict, str(Path(path) / "model.safetensors"))
        (Path(path) / "config.json").write_text("{}")


class _Tok:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")


def _save(run, step, value=1.0, keep=2):
    return ckpt.save_checkpoint(run, step, _Model(), _Tok(), {"w": torch.full((3,), value)}, {"step": step}, keep=keep)


def test_incomplete_and_stale_checkpoints_are_ignored_then_removed(tmp_path):
    _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000002").mkdir()  # killed while writing
    torn = root / "step-000003"
    torn.mkdir()  # killed between the rename and the manifest
    (torn / "model.safetensors").write_bytes(b"partial")
    bad = root / "step-000004"
    bad.mkdir()  # a manifest that disagrees with the files
    (bad / ckpt.MANIFEST).write_text(json.dumps({"step": 4, "files": {"model.safetensors": 99}}))
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"
    _save(tmp_path, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]
    assert ckpt.read_weights(ckpt.latest_checkpoint(tmp_path))["w"].tolist() == [1.0] * 3


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    first = _save(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(OSError):
        _save(tmp_path, 2, value=2.0)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before


def test_truncate_jsonl_drops_later_rows_and_torn_lines(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4, "a"')
    ckpt.truncate_jsonl(log, 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]


# ---- activation overflow -------------------------------------------------------------------------------------
def _overflowing_model(layer: int, factor: float):
    """The tiny model with layer `layer`'s MLP input projections scaled so that its hidden activation exceeds fp16,
    and its output projection scaled back so that the MLP output fits (curable by fp32)."""
    from unison.models import random_model

    model = random_model(seed=1)
    mlp = model.model.layers[layer].mlp
    with torch.no_grad():
        mlp.gate_proj.weight.mul_(factor)
        mlp.up_proj.weight.mul_(factor)
        mlp.down_proj.weight.div_(factor)
    return model


def _prompts(n=3, length=12):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(5, 200, (length,), generator=g).tolist() for _ in range(n)]


def test_stats_name_the_overflowing_layer(tiny_dir):
    model = _overflowing_model(2, 1000.0)
    rows = activation_stats(model, [torch.tensor(_prompts())])
    assert [r["fp16_safe"] for r in rows] == [True, True, False, True]
    assert rows[2]["where"] == "mlp_hidden" and rows[2]["max_abs"] > 65504


@pytest.mark.parametrize("engine", ["learner", "native"])
def test_fp16_overflow_stops_naming_the_layer(engine):
    from unison.learner import Learner
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import Rollouts, SamplingParams
    from unison.rollout.native import NativeEngine

    model = _overflowing_model(2, 1000.0)
    prompts = _prompts()
    if engine == "native":
        eng = NativeEngine(model, torch.float16, "cpu")
        guard = eng.overflow_guard("stop", "rollout engine (decode)")
        with pytest.raises(ActivationOverflowError, match=r"rollout engine .* layer 2 \(MLP block"):
            eng.generate(prompts, SamplingParams(max_new_tokens=4))
    else:
        learner = Learner(model, PrecisionPolicy(torch.float16, torch.float16))
        guard = OverflowGuard.attach(learner.model, "stop", "learner (full-sequence forward)")
        ro = Rollouts(
            prompts,
            torch.ones(3, 2, dtype=torch.long) * 7,
            torch.zeros(3, 2),
            torch.ones(3, 2, dtype=torch.bool),
            torch.full((3,), 2),
            torch.ones(3, dtype=torch.bool),
        )
        with pytest.raises(ActivationOverflowError, match=r"learner .* layer 2 \(MLP block.*bf16 or fp32"):
            learner.recompute(ro)
    assert guard is not None


def test_fp16_overflow_in_the_learners_shared_prompt_pass_is_named():
    # the learner runs each distinct prompt once (through the LM head at its last position), then the responses on its
    # keys and values: an overflow in the prompt pass is caught at the end of that pass and named where it happened
    # (the responses' pass would run on healed weights, and could only see the prompt pass's inf/NaN downstream)
    from unison.learner import Learner
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import Rollouts

    learner = Learner(_overflowing_model(2, 1000.0), PrecisionPolicy(torch.float16, torch.float16))
    guard = OverflowGuard.attach(learner.model, "stop", "learner (full-sequence forward)")
    mlp, passes = learner.model.model.layers[2].mlp, []

    def heal(module, args):
        passes.append(len(args[0]))
        if len(passes) == 2:
            with torch.no_grad():
                mlp.gate_proj.weight.div_(1000.0)
                mlp.up_proj.weight.div_(1000.0)
                mlp.down_proj.weight.mul_(1000.0)

    learner.model.model.embed_tokens.register_forward_pre_hook(heal)
    rows = [p for p in _prompts(2, 40) for _ in range(4)]
    ro = Rollouts(
        rows,
        torch.full((8, 3), 7),
        torch.zeros(8, 3),
        torch.ones(8, 3, dtype=torch.bool),
        torch.full((8,), 3),
        torch.ones(8, dtype=torch.bool),
    )
    batch = learner.batch(ro)
    assert batch.shared is not None and guard is not None
    with pytest.raises(ActivationOverflowError, match=r"learner .* layer 2 \(MLP block"):
        learner.logprobs(batch)
    assert passes == [2]  # the 2 distinct prompts; the 8 responses never ran


def test_fp32_layers_cures_an_mlp_overflow_in_the_engine():
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    params = SamplingParams(max_new_tokens=6)
    eng = NativeEngine(_overflowing_model(2, 1000.0), torch.float16, "cpu", seed=3)
    guard = eng.overflow_guard("fp32_layers", "rollout engine (decode)")
    out = eng.generate(_prompts(), params)
    assert guard.upcast == [2]
    assert torch.isfinite(out.logprobs).all()
    # weights keep their dtype, so weight sync and its checksum are unaffected
    assert all(p.dtype == torch.float16 for p in eng.model.parameters())


def test_run_in_fp32_keeps_gradients_flowing():
    from unison.models import random_model

    model = random_model(seed=1).half()
    mlp = model.model.layers[0].mlp
    run_in_fp32(mlp)
    x = torch.randn(2, 3, 128).half()
    y = mlp(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert mlp.up_proj.weight.grad is not None and mlp.up_proj.weight.grad.dtype == torch.float16


def test_guard_is_off_for_bf16_and_when_switched_off():
    from unison.models import random_model

    assert OverflowGuard.attach(random_model(seed=1).to(torch.bfloat16), "stop", "x") is None
    assert OverflowGuard.attach(random_model(seed=1).half(), "off", "x") is None


@pytest.fixture(scope="module")
def overflowing_dir(tmp_path_factory):
    from unison.models import build_tokenizer, save_model

    return save_model(_overflowing_model(2, 1000.0), build_tokenizer(), tmp_path_factory.mktemp("ovf") / "model")


def test_probe_activations_reports_each_layer(overflowing_dir, tmp_path, capsys):
    from unison.cli import main

    code = main(
        [
            "probe",
            "--model",
            str(overflowing_dir),
            "--precisions",
            "fp32",
            "--activations",
            "--num-prompts",
            "2",
            "--samples",
            "1",
            "--max-new-tokens",
            "8",
            "--out",
            str(tmp_path),
            "run.progress=false",
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "probe.json").read_text())["activations"]
    assert [r["fp16_safe"] for r in rows] == [True, True, False, True]
    out = capsys.readouterr().out
    assert "max/65504" in out and "at layer 2 (mlp_hidden): exceeds FP16" in out


def _train_argv(model_dir, out, *extra):
    return [
        "train",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--precision",
        "fp16",
        "--steps",
        "1",
        "run.eval_every=0",
        "run.eval_prompts=4",
        "run.progress=false",
        "run.loggers=[jsonl]",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=8",
        "optim.train_batch_size=4",
        "data.max_prompts=8",
        *extra,
    ]


def test_train_stops_on_activation_overflow_exit_1(overflowing_dir, tmp_path, capsys):
    from unison.cli import main

    assert main(_train_argv(overflowing_dir, tmp_path / "run")) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err[-1].startswith("unison train: stopped: activations left the FP16 range")
    assert "layer 2 (MLP block" in err[-1] and "bf16 or fp32" in err[-1]


def test_train_with_fp32_layers_runs_finite(overflowing_dir, tmp_path):
    from unison.cli import main

    out = tmp_path / "run"
    assert main(_train_argv(overflowing_dir, out, "precision.on_activation_overflow=fp32_layers")) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["precision/fp32_layers"] == 2  # layer 2's MLP, in the engine and in the learner
    state = ckpt.load_trainer_state(ckpt.latest_checkpoint(out))
    assert state["overflow"] == {"learner": {"upcast": [2]}, "engine": {"upcast": [2]}}
    assert all(torch.isfinite(t).all() for t in ckpt.load_master(ckpt.latest_checkpoint(out)).values())


# ---- overflow beyond the MLPs: attention (Gemma-style), the final norm, the LM head ---------------------------------
def _gemma_attention_overflow(factor: float):
    """A tiny random Gemma3 whose layer-1 attention output projection is scaled by `factor`: its output leaves fp16's
    range (1e5: about 2.2e5), while its post-attention norm keeps the model's fp32 forward in range, as a real
    Gemma's is; 2e4 comes within 1.5-2x of the limit (by the tokens sampled) and fits."""
    from unison.archs import tiny_model

    model = tiny_model("gemma3", seed=0)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def gemma_overflow_dir(tmp_path_factory):
    from unison.models import build_tokenizer, save_model

    return save_model(_gemma_attention_overflow(1e5), build_tokenizer(), tmp_path_factory.mktemp("gem") / "model")


ATTENTION_STOP = (
    "activations left the FP16 range (|x| > 65504, or inf/NaN) in the rollout engine (decode) at layer 1 "
    "(attention block, model.layers.1); run this model in bf16 or fp32 (e.g. --precision bf16): "
    "precision.on_activation_overflow=fp32_layers computes only MLPs in fp32 and cannot cure overflow in an "
    "attention block"
)
SMALL = ["run.progress=false", "rollout.max_new_tokens=8"]


@pytest.mark.parametrize(
    "command, argv",
    [
        ("probe", ["--precisions", "fp16", "--num-prompts", "2", "--samples", "2", "--out", "{tmp}/p"]),
        ("eval", ["--precision", "fp16", "--num-prompts", "2", "--n", "1"]),
        ("filter", ["precision.rollout=fp16", "--num-prompts", "2", "--k", "2", "--out", "{tmp}/f.jsonl"]),
        (
            "demo",
            ["--steps", "1", "compare=fp16", "side_by_side=false", "--out", "{tmp}/demo", *_train_argv("", "")[9:]],
        ),
        ("train", _train_argv("", "{tmp}/run")[3:]),
    ],
)
def test_fp16_attention_overflow_stops_every_command_with_one_named_line(
    gemma_overflow_dir, tmp_path, capsys, command, argv
):
    from unison.cli import main

    args = [command, "--model", str(gemma_overflow_dir), *[a.format(tmp=tmp_path) for a in argv], *SMALL]
    assert main(args) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith("unison: warning")]
    assert err[-1] == f"unison {command}: stopped: {ATTENTION_STOP}", err[-1]


def test_bf16_cures_the_attention_overflow(gemma_overflow_dir, tmp_path):
    from unison.cli import main

    argv = _train_argv(gemma_overflow_dir, tmp_path / "run")
    argv[argv.index("--precision") + 1] = "bf16"
    assert main(argv) == 0


def test_fp32_layers_names_an_attention_overflow_as_attention():
    # fp32_layers recomputes an overflowing MLP hidden from its input; where that input is already non-finite the
    # attention block before it overflowed, and is named (it was named as the MLP)
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    eng = NativeEngine(_gemma_attention_overflow(1e5), torch.float16, "cpu")
    guard = eng.overflow_guard("fp32_layers", "rollout engine (decode)")
    with pytest.raises(ActivationOverflowError, match=r"layer 1 \(attention block.*cannot cure overflow in an atten"):
        eng.generate(_prompts(), SamplingParams(max_new_tokens=4))
    assert guard.upcast == []


def _tied_head_overflow(factor: float = 3e4):
    """The tiny (tied) model with its embeddings scaled: the residual stream stays small after each norm, and the
    tied LM head's logits reach about 9e4, beyond fp16."""
    from unison.models import random_model

    model = random_model(seed=1)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(factor)
    return model


def test_fp16_logits_beyond_range_at_a_tied_head_are_named_and_an_fp32_head_cures_them(tmp_path):
    # the sampler had drawn from NaN probabilities: "index 272 is out of bounds", a traceback
    from unison.cli import main
    from unison.models import build_tokenizer, save_model

    model_dir = save_model(_tied_head_overflow(), build_tokenizer(), tmp_path / "model")
    for matmul in ("native", "fp32-accumulate"):
        from unison.rollout.base import SamplingParams
        from unison.rollout.native import NativeEngine

        eng = NativeEngine(_tied_head_overflow(), torch.float16, "cpu", matmul=matmul)
        eng.overflow_guard("stop", "rollout engine (decode)")
        with pytest.raises(ActivationOverflowError, match=r"at the LM head \(its logits\); set precision.lm_head=fp32"):
            eng.generate(_prompts(), SamplingParams(max_new_tokens=4))
    assert main(_train_argv(model_dir, tmp_path / "fp32-head", "precision.lm_head=fp32")) == 0


@pytest.mark.parametrize("engine", ["learner", "native"])
def test_an_overflow_in_the_final_norm_is_named_so(engine):
    # a residual stream in range whose final norm (its weight scaled) leaves fp16's range: it was named as the last
    # layer's MLP block
    from unison.learner import Learner
    from unison.models import random_model
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import Rollouts, SamplingParams
    from unison.rollout.native import NativeEngine

    model = random_model(seed=1)
    with torch.no_grad():
        model.model.norm.weight.mul_(1e6)
    match = r"at the final norm \(model.norm, after the last layer\); run this model in bf16 or fp32"
    if engine == "native":
        eng = NativeEngine(model, torch.float16, "cpu")
        eng.overflow_guard("stop", "rollout engine (decode)")
        with pytest.raises(ActivationOverflowError, match=match):
            eng.generate(_prompts(), SamplingParams(max_new_tokens=4))
        return
    learner = Learner(model, PrecisionPolicy(torch.float16, torch.float16))
    OverflowGuard.attach(learner.model, "stop", "learner (full-sequence forward)")
    ro = Rollouts(
        _prompts(),
        torch.ones(3, 2, dtype=torch.long) * 7,
        torch.zeros(3, 2),
        torch.ones(3, 2, dtype=torch.bool),
        torch.full((3,), 2),
        torch.ones(3, dtype=torch.bool),
    )
    with pytest.raises(ActivationOverflowError, match=match):
        learner.recompute(ro)


def test_activations_near_the_limit_on_a_short_sample_warn_and_advise_bf16(tmp_path, capsys):
    # the new user's Gemma3-270M: 59% of the limit on 2 prompts x 8 tokens was "fits FP16"
    from unison.cli import main
    from unison.models import build_tokenizer, save_model

    model_dir = save_model(_gemma_attention_overflow(2e4), build_tokenizer(), tmp_path / "model")
    argv = ["probe", "--model", str(model_dir), "--precisions", "fp32", "--activations", "--advise"]
    argv += ["--num-prompts", "2", "--samples", "1", "--max-new-tokens", "8", "--out", str(tmp_path / "p")]
    assert main(argv + ["run.progress=false"]) == 0
    out = capsys.readouterr().out
    verdict = [line for line in out.splitlines() if line.startswith("largest |activation|")][-1]
    assert re.search(r"at layer 1 \(attention\): within [\d.]+x of the FP16 limit, under the 4x margin", verdict)
    assert "run it in bf16 (fp32 layers compute only MLPs" in verdict and "warning: measured on " in verdict
    advice = json.loads((tmp_path / "p" / "probe.json").read_text())["advice"]
    assert advice["recommendation"] == "bf16 + correction"
    assert any(
        re.search(r"layer 1 \(attention, [\d.]+x\).*cannot keep an attention block", r) for r in advice["reasons"]
    )
    assert any("too few to rely on" in r for r in advice["reasons"])


def test_every_train_setting_is_a_resume_key_or_free_and_documented():
    # a new setting must be decided: does changing it on --resume change what the run computes?
    from unison.config import TrainConfig, to_dict
    from unison.report import flatten
    from unison.runfolder import RESUME_FREE, RESUME_KEYS

    keys = set(flatten(to_dict(TrainConfig())))
    assert not set(RESUME_KEYS) & set(RESUME_FREE)
    assert set(RESUME_KEYS) | set(RESUME_FREE) == keys, keys ^ (set(RESUME_KEYS) | set(RESUME_FREE))
    docs = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    assert [k for k in sorted(keys) if f"`{k}`" not in docs] == []
