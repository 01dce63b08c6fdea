"""Data-parallel training under torchrun (gloo on the CPU, 2 ranks): the same weights as 1 rank on the same global
batch, the fp16 overflow decision shared by the ranks, a corrupted engine copy caught on its own rank, SIGKILL and
resume bit-exact, and the bad input `--nproc` refuses before any rank starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_dist_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def ranks(n: int, mode: str, out: Path) -> dict:
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(WORKER)]
        if n > 1
        else [sys.executable, str(WORKER)]
    )
    done = subprocess.run([*cmd, mode, str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    if done.returncode and "terminate called without an active exception" in done.stderr:
        # a rank aborted by gloo's threads as the processes end (seen about once in a few full runs, never
        # reproduced alone): run the same world once more, which must then end cleanly
        done = subprocess.run([*cmd, mode, str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_ranks_end_with_the_weights_of_one_on_the_same_global_batch(tmp_path):
    one, two = ranks(1, "same", tmp_path / "one.pt")["master"], ranks(2, "same", tmp_path / "two.pt")["master"]
    from unison.models import load_model, resolve_model_dir

    model = load_model(resolve_model_dir("builtin"), device="cpu", dtype=torch.float32)
    start = {n: p.detach() for n, p in model.named_parameters()}
    assert max(float((a - start[n]).abs().max()) for n, a in one.items()) > 1e-4  # the steps moved the weights
    diff = torch.cat([(two[n] - a).reshape(-1) for n, a in one.items()])
    norm = torch.cat([a.reshape(-1) for a in one.values()])
    assert float(diff.norm() / norm.norm()) < 1e-5  # the weights to 1e-5 relative
    for name, a in one.items():  # and each tensor to 1e-4 (Adam's step is lr-sized wherever a gradient is ~0)
        assert float((two[name] - a).norm() / a.norm()) < 1e-4, name


def test_lora_on_two_ranks_ends_with_the_adapters_and_merged_weights_of_one(tmp_path):
    one, two = ranks(1, "lora", tmp_path / "one.pt"), ranks(2, "lora", tmp_path / "two.pt")
    assert set(one["master"]) == set(two["master"]) and all(".lora_" in n for n in one["master"])
    for what in ("master", "merged"):
        a, b = one[what], two[what]
        diff = torch.cat([(b[n] - t).reshape(-1) for n, t in a.items()])
        assert float(diff.norm() / torch.cat([t.reshape(-1) for t in a.values()]).norm()) < 1e-5, what
    assert any(float(t.abs().max()) > 0 for n, t in one["master"].items() if ".lora_B." in n)  # B moved off 0


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    r = ranks(2, "overflow", tmp_path / "o.pt")
    assert r["skipped"] == [True, True]
    assert r["scale"][1] == r["scale"][0] / 2  # backed off once
    assert r["finite"] == [True, True] and r["checksums"][0] == r["checksums"][1]


def test_a_corrupted_engine_copy_is_caught_by_its_own_rank(tmp_path):
    caught = ranks(2, "corrupt", tmp_path / "c.pt")["caught"]
    assert caught[0] == "" and "checksum" in caught[1]


TRAIN = [
    "data.subset=builtin",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=32",
    "optim.train_batch_size=16",
    "run.progress=false",
    "run.save_every=1",
    "run.steps=4",
]


def unison(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "unison", "train", *TRAIN, *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=400,
        **kw,
    )


def finals(run: Path):
    from safetensors.torch import load_file

    weights = load_file(run / "checkpoints/step-000004/model.safetensors")
    rows = [
        {k: v for k, v in json.loads(x).items() if not k.startswith("perf/")}
        for x in (run / "metrics.jsonl").read_text().splitlines()
    ]
    return weights, rows, (run / "samples.jsonl").read_text()


def test_sigkill_and_resume_with_two_ranks_is_bit_exact(tmp_path):
    ref = unison("--nproc", "2", f"run.out={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "unison", "train", *TRAIN, "--nproc", "2", f"run.out={killed}"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints/step-000002/manifest.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher (the ranks, in groups of their own, die with it)
    proc.wait()
    resumed = unison("--nproc", "2", f"run.out={killed}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (wa, ma, sa), (wb, mb, sb) = finals(tmp_path / "ref"), finals(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and ma == mb and sa == sb


def test_the_ranks_end_when_the_launcher_is_killed_alone(tmp_path):
    from unison.runfolder import RunLock

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "unison", "train", *TRAIN, "--nproc", "2", "run.steps=40", f"run.out={run}"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoints/step-000001/manifest.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()  # the launcher alone
    proc.wait()
    deadline = time.monotonic() + 15
    while RunLock(run).holder() is not None:  # rank 0 holds the lock while it runs
        assert time.monotonic() < deadline, "rank 0 went on without its launcher"
        time.sleep(0.1)
    size = (run / "metrics.jsonl").stat().st_size
    time.sleep(3)
    assert (run / "metrics.jsonl").stat().st_size == size  # no rank is still training


@pytest.mark.parametrize(
    "args, says",
    [
        (["--nproc", "64"], "more ranks than"),
        (["--nproc", "2", "--backend", "nccl"], "NCCL backend needs CUDA"),
        (["--nproc", "2", "optim.train_batch_size=4"], "cannot share the 1 groups"),
        (
            ["--nproc", "2", "rollout.prompts_per_step=3", "optim.train_batch_size=12"],
            "cannot share rollout.prompts_per_step=3",
        ),
    ],
)
def test_bad_world_settings_refused_before_any_rank_starts(tmp_path, args, says):
    out = tmp_path / "run"
    done = unison(*args, f"run.out={out}")
    assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not out.exists()


def test_resume_with_another_world_size_is_refused(tmp_path):
    out = tmp_path / "run"
    first = unison("--nproc", "2", f"run.out={out}", "run.steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.name for p in out.rglob("*"))
    for args in (["--resume"], ["--resume", "--nproc", "1"]):
        done = unison(*args, f"run.out={out}", "run.steps=2")
        assert done.returncode == 2 and "saved by 2 rank(s)" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.rglob("*")) == before


RAISES_ON_RANK_1 = f"{Path(__file__).parent / 'reward_fixture.py'}:rank1_raises"


def test_an_error_on_one_rank_is_the_one_line_one_rank_prints(tmp_path):
    # the reward raises on rank 1 alone: rank 0 meets a closed connection in its next collective; the user sees the
    # reward's own line (not gloo's traceback or the launcher's), with its exit code
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{i}-3:", "answer": "0"}}\n' for i in range(10, 30)))
    done = unison(
        "--nproc",
        "2",
        f"run.out={tmp_path / 'run'}",
        f"data.source={prompts}",
        "data.subset=",
        "data.template=plain",
        f"data.reward={RAISES_ON_RANK_1}",
        "rollout.stop=[a, e, i, o, u, t, n, s, '0', '1', '2', '3']",
        "rollout.max_new_tokens=8",
        "run.loggers=[jsonl]",
    )
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"unison train: error: reward function '{RAISES_ON_RANK_1}' raised ValueError: bad ")


def test_sigterm_to_the_launcher_is_one_line_naming_the_resume_on_as_many_ranks(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "unison", "train", *TRAIN, "--nproc", "2", "run.steps=40", f"run.out={run}"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (run / "checkpoints/step-000001/manifest.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [x for x in err.splitlines() if x.strip()]
    assert proc.returncode == 143, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("unison train: stopped: terminated (SIGTERM) during step "), lines
    assert lines[0].endswith(f"resume with: unison train --config {run / 'config.yaml'} --resume --nproc 2"), lines


def test_the_launcher_says_the_first_ranks_ending_or_what_it_saw(tmp_path, capsys):
    # rank 1 failed first (the cause); rank 0's end follows from it; a rank killed before it could say anything
    # (the OOM killer's SIGKILL) is said by the launcher
    from unison import distributed

    (tmp_path / "rank-00000.json").write_text(
        json.dumps({"rank": 0, "code": 1, "text": "gloo: peer gone", "time": 2.0})
    )
    (tmp_path / "rank-00001.json").write_text(json.dumps({"rank": 1, "code": 2, "text": "the cause", "time": 1.0}))
    assert distributed._said(str(tmp_path), 1, "rank 0 ended with exit code 1") == 2
    assert capsys.readouterr().err == "the cause\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert distributed._said(str(empty), 137, "rank 1 killed by SIGKILL") == 137
    assert capsys.readouterr().err == "unison train: stopped: rank 1 killed by SIGKILL\n"


@pytest.mark.parametrize("precision, extra", [("fp16", []), ("bf16", ["lora.enabled=true", "optim.lr=1e-2"])])
def test_precision_bitwise_holds_on_two_ranks(tmp_path, precision, extra):
    # each rank's engine and its shard of the learner: log mu == log pi_old (its own pass, two updates a step) ==
    # log pi at the first update's forward, to the bit, for the rows of both ranks (with LoRA: the merged weights
    # from the adapters in the train dtype, as FSDP2 casts them for the forward)
    out = tmp_path / "run"
    done = unison(
        *extra,
        "--nproc",
        "2",
        f"--precision={precision}",
        "precision.bitwise=true",
        "model.matmul=fp32-accumulate",
        "optim.train_batch_size=8",
        "run.steps=2",
        "run.save_every=0",
        f"run.out={out}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["perf/ranks"] == 2 and r["learner/updates"] == 2 for r in rows)
    assert all(r["mismatch/bit_equal_frac"] == 1.0 and r["mismatch/max_abs_log_ratio"] == 0.0 for r in rows)


def test_a_rank_s_first_update_divergence_is_every_rank_s_numbered_in_the_gathered_batch():
    from unison.step import Divergence, first_of_ranks

    class Ranks:  # what `World.gather` gives on every rank: each rank's value, in rank order
        def __init__(self, values):
            self.values = values

        def gather(self, obj):
            return self.values

    d = Divergence(3, 7, "log pi_old and log pi at the first update's forward", (-1.0, -1.5))
    assert first_of_ranks(Ranks([(None, 8), (d, 8)]), None, 8) == Divergence(11, 7, d.what, d.values)
    assert first_of_ranks(Ranks([(d, 8), (None, 8)]), d, 8) == d
    assert first_of_ranks(Ranks([(None, 8), (None, 8)]), None, 8) is None
