"""Sampling while learning (rollout.max_staleness k) against sampling then learning (k = 0), on the same seeds.

    python bench/async_study.py throughput [--models builtin,30m,smollm2-135m-instruct] [--ks 0,1,2] [--rounds 2]
    python bench/async_study.py accuracy [--seeds 0,1,2] [--steps 120] [--out runs/async]
    python bench/async_study.py phantom [--models builtin,smollm2-135m-instruct] [--steps 3]

throughput   `unison train` steps per second, each k in turn within a round (a shared machine moves 10-40% from run
             to run, so only ratios within a round are compared): the demo's step on the built-in model and on the
             random 25M Qwen2 of bench/bench_models.py, and a smaller step on SmolLM2-135M-Instruct (word problems)
accuracy     the demo (configs/demo.yaml, fp16) for --steps steps with k = 0 and k = 1 (staleness_correction
             rollout), 3 seeds: final training accuracy (mean of the last 10 steps), held-out avg@1 (the 64 held-out
             prompts at the run's end), and the split of the off-policy gap over the run (a figure)
phantom      the phantom-clip fraction (tokens the PPO clip of pi_old / mu would cut at the first update, where only
             the mismatch moves the ratio) in fp32, fp16 and bf16, on the built-in model and SmolLM2

Each writes its section of docs/async.md (--doc to write elsewhere, --quick for a short run that writes nothing).
Runs are kept under --out; a run whose metrics are complete is read back instead of run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from docsection import listed, machine_description, write_section  # noqa: E402

DEMO = ROOT / "configs" / "demo.yaml"
MODELS = {
    # the model's settings for a throughput step: the demo's step, or a smaller one on the real model
    "builtin": ["model.path=builtin"],
    "30m": ["rollout.max_new_tokens=64"],
    "smollm2-135m-instruct": [
        "model.path=smollm2-135m-instruct",
        "data.source=word-problems",
        "data.subset=",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=96",
        "optim.train_batch_size=8",
        "optim.micro_batch_size=8",
        "optim.lr=5e-6",
    ],
}
KS = {0: [], 1: ["algorithm.staleness_correction=rollout"], 2: ["algorithm.staleness_correction=rollout"]}


def demo_config(out: Path) -> Path:
    """configs/demo.yaml without its `compare` line (a `unison demo` key), for `unison train`."""
    path = out / "demo-train.yaml"
    path.write_text("".join(x for x in DEMO.read_text().splitlines(True) if not x.startswith("compare")))
    return path


def model_settings(name: str, out: Path) -> list[str]:
    if name == "30m":
        folder = out / "model-30m"
        if not (folder / "config.json").exists():
            from bench_models import build

            from unison.models import build_tokenizer, save_model

            save_model(build("30m"), build_tokenizer(), folder)
        return [f"model.path={folder}", *MODELS[name]]
    return MODELS[name]


def train(run: Path, config: Path, settings: list[str], steps: int, threads: str = "") -> list[dict]:
    """`unison train` into `run` (read back where it already holds `steps` rows)."""
    metrics = run / "metrics.jsonl"
    if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
        return [json.loads(x) for x in metrics.read_text().splitlines()]
    cmd = [sys.executable, "-m", "unison.cli", "train", "--config", str(config), f"run.out={run}", f"run.steps={steps}"]
    cmd += ["run.progress=false", "run.save_every=0", *settings, "--overwrite"]
    env = {**os.environ, **({"OMP_NUM_THREADS": threads} if threads else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{run} failed:\n{done.stderr[-3000:]}")
    return [json.loads(x) for x in metrics.read_text().splitlines()]


def joined(values, digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def staleness_settings(k: int) -> list[str]:
    return [f"rollout.max_staleness={k}", *KS[k]]


# ---- throughput ------------------------------------------------------------------------------------------------------
def throughput(args, out: Path, config: Path) -> list[str]:
    lines = [
        "| model | k | s/step (median, each round) | steps/s against k = 0 (each round) | engine wait s | learn s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in args.models:
        settings = model_settings(name, out)
        steps = args.steps if name != "smollm2-135m-instruct" else args.real_steps
        per_k: dict[int, list[dict]] = {k: [] for k in args.ks}
        for r in range(args.rounds):
            for k in args.ks:
                run = out / "throughput" / f"{name}-k{k}-round{r}"
                rows = train(run, config, settings + staleness_settings(k), steps)[args.warmup :]
                per_k[k].append(
                    {
                        "step": statistics.median(x["perf/step_seconds"] for x in rows),
                        "wait": statistics.median(x["perf/rollout_seconds"] for x in rows),
                        "learn": statistics.median(x["perf/learn_seconds"] for x in rows),
                    }
                )
                print(f"{name} k={k} round {r}: {per_k[k][-1]['step']:.2f} s/step", flush=True)
        for k in args.ks:
            ratios = [base["step"] / m["step"] for base, m in zip(per_k[args.ks[0]], per_k[k])]
            lines.append(
                f"| {name} | {k} | {joined(m['step'] for m in per_k[k])} | "
                f"{', '.join(f'{x:.2f}x' for x in ratios)} | "
                f"{statistics.median(m['wait'] for m in per_k[k]):.2f} | "
                f"{statistics.median(m['learn'] for m in per_k[k]):.2f} |"
            )
    return lines


# ---- accuracy --------------------------------------------------------------------------------------------------------
def accuracy(args, out: Path, config: Path) -> list[str]:
    settings = ["precision.rollout=fp16", "precision.train=fp16", "run.eval_every=0"]
    results: dict[int, list[dict]] = {0: [], 1: []}
    runs = {}
    for seed in args.seeds:
        for k in (0, 1):
            run = out / "accuracy" / f"k{k}-seed{seed}"
            rows = train(run, config, settings + staleness_settings(k) + [f"run.seed={seed}"], args.steps, "1")
            runs[(k, seed)] = rows
            last = rows[-10:]
            results[k].append(
                {
                    "acc": statistics.mean(x["rollout/accuracy"] for x in last),
                    "held": next((x["eval/avg@1"] for x in reversed(rows) if "eval/avg@1" in x), float("nan")),
                    "seconds": sum(x["perf/step_seconds"] for x in rows),
                }
            )
            print(f"accuracy k={k} seed {seed}: {results[k][-1]}", flush=True)
    lines = [
        "| k | final accuracy (last 10 steps), per seed | mean | held-out avg@1 (64 prompts), per seed | mean |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k in (0, 1):
        r = results[k]
        lines.append(
            f"| {k} | {joined((x['acc'] for x in r), 3)} | {statistics.mean(x['acc'] for x in r):.3f} | "
            f"{joined((x['held'] for x in r), 3)} | {statistics.mean(x['held'] for x in r):.3f} |"
        )
    if args.doc:
        split_figure(runs, Path(args.doc).parent / "figures" / "async_split.png")
        lines += ["", "![the split of the off-policy gap over the k = 1 runs](figures/async_split.png)"]
    return lines


def split_figure(runs: dict, path: Path) -> None:
    """|log pi_now - log mu| of the k = 1 runs over their steps, with its two parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    keys = [("policy", "policy change"), ("mismatch", "engine mismatch"), ("total", "total |log pi_now - log mu|")]
    for (part, label), color in zip(keys, ("tab:blue", "tab:red", "black")):
        key = f"staleness/{part}_abs_log_ratio_mean"
        for i, rows in enumerate(rows for (k, _), rows in sorted(runs.items()) if k == 1):
            xs = [x["step"] for x in rows if x.get(key, 0) > 0]  # (the first step's policy change is 0)
            ys = [x[key] for x in rows if x.get(key, 0) > 0]
            style = {"ls": ":", "lw": 1.2, "alpha": 0.9} if part == "total" else {"lw": 1, "alpha": 0.6}
            ax.plot(xs, ys, color=color, label=label if i == 0 else None, **style)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean |log-ratio| per token")
    ax.set_title("k = 1, fp16: the off-policy gap and its two parts (one line per seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ---- phantom clipping ------------------------------------------------------------------------------------------------
def phantom(args, out: Path, config: Path) -> list[str]:
    lines = [
        "| model | precision (both engines) | phantom-clip fraction, per step | mean | mean abs log-ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in args.models:
        for precision in ("fp32", "fp16", "bf16"):
            run = out / "phantom" / f"{name}-{precision}"
            p = [f"precision.rollout={precision}", f"precision.train={precision}"]
            rows = train(run, config, model_settings(name, out) + p, args.steps, "2")
            fr = [x["mismatch/phantom_clip_frac"] for x in rows]
            gap = statistics.mean(x["mismatch/abs_log_ratio_mean"] for x in rows)
            lines.append(
                f"| {name} | {precision} | {', '.join(f'{x:.4f}' for x in fr)} | {statistics.mean(fr):.4f} | "
                f"{gap:.2e} |"
            )
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["throughput", "accuracy", "phantom"])
    ap.add_argument("--models", type=listed(list(MODELS)), default=None)
    ap.add_argument("--ks", type=listed(kind=int), default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--real-steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seeds", type=listed(kind=int), default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "runs" / "async"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "async.md"))
    ap.add_argument("--quick", action="store_true", help="a short run that writes no document")
    args = ap.parse_args()
    defaults = {"throughput": (["builtin", "30m", "smollm2-135m-instruct"], 10), "accuracy": (None, 120)}
    models, steps = defaults.get(args.what, (["builtin", "smollm2-135m-instruct"], 3))
    args.models = args.models or models
    args.steps = args.steps or steps
    if args.quick:
        args.doc, args.models, args.steps, args.real_steps, args.rounds, args.seeds = None, ["builtin"], 3, 2, 1, [0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = demo_config(out)
    t0 = time.time()
    lines = {"throughput": throughput, "accuracy": accuracy, "phantom": phantom}[args.what](args, out, config)
    command = "python bench/async_study.py " + " ".join(sys.argv[1:])
    intro = [f"Command: `{command}` ({time.time() - t0:.0f} s; model.matmul=auto, model.gemm=auto).", ""]
    titles = {
        "throughput": "Steps per second",
        "accuracy": "Accuracy after the demo's steps",
        "phantom": "Phantom clipping",
    }
    write_section(args.doc, f"async-{args.what}", titles[args.what], intro + lines, machine_description())


if __name__ == "__main__":
    main()
