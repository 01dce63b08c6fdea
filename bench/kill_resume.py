"""Kill `unison train` with SIGKILL at random moments, resume it, and compare with the uninterrupted run.

    OMP_NUM_THREADS=1 python bench/kill_resume.py --kills 20

For each precision (fp32, fp16, bf16) one uninterrupted reference run; then `--kills` runs spread over the three
precisions, each killed at a random moment: after checkpoint k (k drawn from 1..steps-1) appears, a delay drawn
uniformly within one step's duration (as timed on the reference), so the kill lands inside step k+1 or its checkpoint
save, then resumed with `--resume`. A resumed run is bit-exact when its final weights, its metrics (all but the
timings, perf/*) and its per-step sample digests (samples.jsonl) equal the reference's. Also reported: whether the kill
tore a checkpoint (a .tmp folder or a step folder without manifest left behind), and the mismatch (mismatch/k3) of
the first step after the resume against the same step of the reference and the last step before the kill.
Writes the section `kill_resume` of docs/notes/reliability.md (the long tables of docs/reliability.md) and the
raw results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from docsection import count, replace_section  # noqa: E402

from unison import checkpoint as ckpt  # noqa: E402
from unison.models import build_tokenizer, random_model, save_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REWARD = f"{ROOT / 'tests' / 'reward_fixture.py'}:even_length"


def args_for(model, prompts, out, precision, steps):
    return [
        "train",
        "--model",
        str(model),
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
        "run.eval_every=3",
        "run.eval_prompts=4",
        "run.save_every=1",
        "run.progress=false",
        "run.loggers=[jsonl]",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=32",
        "optim.train_batch_size=4",
        "optim.micro_batch_size=3",
        "optim.lr=1e-3",
        "data.max_prompts=8",
    ]


SNAPSHOT: Path | None = None  # a copy of src/ taken at the start, so edits to the tree during the bench change nothing


def start(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SNAPSHOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "unison.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p):
    _, err = p.communicate(timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"run failed ({p.returncode}): {err[-2000:]}")


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def comparable(run):
    metrics = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows(run)]
    samples = (run / "samples.jsonl").read_text().splitlines()
    return metrics, samples, ckpt.load_master(ckpt.latest_checkpoint(run))


def same(a, b):
    return (
        a[0] == b[0]
        and a[1] == b[1]
        and a[2].keys() == b[2].keys()
        and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=count, default=20)
    ap.add_argument("--steps", type=count, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "kill_resume.json"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(a.work or tempfile.mkdtemp(prefix="unison-kill-"))
    global SNAPSHOT
    SNAPSHOT = work / "src"
    import shutil

    shutil.copytree(ROOT / "src" / "unison", SNAPSHOT / "unison", ignore=shutil.ignore_patterns("__pycache__"))
    model = save_model(random_model(seed=1), build_tokenizer(), work / "model")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{i}-3:", "answer": "0"}}\n' for i in range(10, 30)))
    precisions = ["fp32", "fp16", "bf16"]
    refs = {}
    for prec in precisions:
        out = work / f"ref-{prec}"
        t0 = time.monotonic()
        p = start(args_for(model, prompts, out, prec, a.steps))
        first = out / "checkpoints" / "step-000001" / ckpt.MANIFEST
        while not first.exists() and p.poll() is None:
            time.sleep(0.01)
        t_first = time.monotonic() - t0
        last = out / "checkpoints" / f"step-{a.steps:06d}" / ckpt.MANIFEST
        while not last.exists() and p.poll() is None:
            time.sleep(0.01)
        t_last = time.monotonic() - t0
        finish(p)
        refs[prec] = {"dir": out, "t_first": t_first, "t_last": t_last, "data": comparable(out)}
        print(f"reference {prec}: first checkpoint at {t_first:.1f}s, last at {t_last:.1f}s", flush=True)
    results = []
    for i in range(a.kills):
        prec = precisions[i % 3]
        ref = refs[prec]
        out = work / f"kill-{i:02d}-{prec}"
        p = start(args_for(model, prompts, out, prec, a.steps))
        target = rng.randint(1, a.steps - 1)  # kill during step target+1 or its save, at a random moment of it
        mark = out / "checkpoints" / f"step-{target:06d}" / ckpt.MANIFEST
        while not mark.exists() and p.poll() is None:
            time.sleep(0.005)
        delay = rng.uniform(0.0, (ref["t_last"] - ref["t_first"]) / (a.steps - 1))
        time.sleep(delay)
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
        p.wait()
        root = out / "checkpoints"
        torn = (
            [q.name for q in root.iterdir() if q.name.startswith(".tmp-") or not ckpt.is_complete(q)]
            if root.is_dir()
            else []
        )
        latest = ckpt.latest_checkpoint(out)
        at_step = int(latest.name.split("-")[1]) if latest else 0
        logged = rows(out) if (out / "metrics.jsonl").exists() else []
        before = next((r for r in logged if r.get("step") == at_step), None)
        finish(start(args_for(model, prompts, out, prec, a.steps) + ["--resume"]))
        got = comparable(out)
        exact = same(got, ref["data"])
        after = next((r for r in rows(out) if r["step"] == at_step + 1), None)
        ref_after = next((r for r in rows(ref["dir"]) if r["step"] == at_step + 1), None)
        res = {
            "precision": prec,
            "kill_after_s": round(delay, 3),
            "killed": killed,
            "resumed_from_step": at_step,
            "torn_left_behind": torn,
            "bit_exact": exact,
            "k3_before_kill": before and before["mismatch/k3"],
            "k3_first_after_resume": after and after["mismatch/k3"],
            "k3_reference_same_step": ref_after and ref_after["mismatch/k3"],
        }
        results.append(res)
        print(json.dumps(res), flush=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1))
    write_doc(results, a)


def write_doc(results, a):
    n_exact = sum(r["bit_exact"] for r in results)
    lines = [
        f"Command: `OMP_NUM_THREADS=1 python bench/kill_resume.py --kills {a.kills} --steps {a.steps} --seed {a.seed}` "
        f"(tiny random model, CPU, {a.steps} steps, a checkpoint every step, evaluation every 3 steps).",
        "",
        f"**{n_exact} of {len(results)} killed-and-resumed runs were bit-exact** (final weights, metrics without "
        "timings, and per-step sample digests equal to the uninterrupted run's).",
        "",
        "| # | precision | killed (s after checkpoint k) | resumed from step | torn checkpoint left | bit-exact "
        "| k3 last step before kill | k3 first step after resume | k3 same step, uninterrupted |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.3e}"  # noqa: E731
    for i, r in enumerate(results):
        lines.append(
            f"| {i} | {r['precision']} | {r['kill_after_s']:.2f}{'' if r['killed'] else ' (had ended)'} | "
            f"{r['resumed_from_step']} | {', '.join(r['torn_left_behind']) or '-'} | "
            f"{'yes' if r['bit_exact'] else 'NO'} | "
            f"{fmt(r['k3_before_kill'])} | {fmt(r['k3_first_after_resume'])} | "
            f"{fmt(r['k3_reference_same_step'])} |"
        )
    higher = [
        r
        for r in results
        if r["k3_first_after_resume"] is not None
        and r["k3_reference_same_step"] is not None
        and r["k3_first_after_resume"] > r["k3_reference_same_step"]
    ]
    lines += [
        "",
        "First step after a resume with a higher mismatch than the uninterrupted run's same step: "
        f"{len(higher)} of {len(results)} (a resume changes nothing the sampler or learner computes, so no "
        "mismatch spike).",
    ]
    replace_section("kill_resume", "\n".join(lines))


if __name__ == "__main__":
    main()
