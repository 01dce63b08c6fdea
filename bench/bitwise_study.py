"""The question the paper leaves open: is BF16's trouble the mismatch, or BF16 itself? {fp16, bf16} x {ordinary,
precision.bitwise} on the demo's setup (and, with `--long`, on countdown-long), several seeds.

    OMP_NUM_THREADS=1 python bench/bitwise_study.py [--seeds 0,1,2] [--steps 120] [--out /work/runs/bitwise-study]
                                                    [--long] [--jobs 1]

Each run is `unison train` with configs/demo.yaml's settings (or `--long`: the built-in long warm start on
countdown-long, 4 prompts x 8 samples of up to 1,600 tokens), the precision, the mode and the seed changed; held-out
evaluation every 20 steps. Runs are resumable: one stopped is continued with --resume, one finished is kept, so the
script can be started again at any time (in the background, across sessions) and goes on where it stopped. Writes
the section `bitwise-study` of docs/exact.md (per arm: first, final and peak training accuracy, held-out accuracy,
the gradient norm and the mismatch, means over the seeds finished, with their number) and
docs/figures/bitwise_study.png (accuracy and gradient norm against step, every arm and seed; with `--long`, the
section `bitwise-study-long` and docs/figures/bitwise_study_long.png).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from docsection import machine_description, replace_section  # noqa: E402

from unison.report import plot_runs, read_metrics  # noqa: E402

DOC = ROOT / "docs" / "exact.md"
FIGURE = ROOT / "docs" / "figures" / "bitwise_study.png"
ARMS = [(p, b) for p in ("fp16", "bf16") for b in (False, True)]
# configs/demo.yaml's settings (the defaults of `unison demo`)
DEMO = [
    "data.subset=builtin",
    "rollout.prompts_per_step=8",
    "rollout.group_size=8",
    "rollout.max_new_tokens=192",
    "optim.lr=5e-5",
    "optim.train_batch_size=32",
    "optim.micro_batch_size=64",
]
LONG = [
    "--model",
    "builtin-long",
    "data.source=countdown-long",
    "data.subset=",
    "rollout.prompts_per_step=4",
    "rollout.group_size=8",
    "rollout.max_new_tokens=1600",
    "optim.train_batch_size=32",
]


def name(precision: str, bitwise: bool, seed: int) -> str:
    return f"{precision}-{'bitwise' if bitwise else 'ordinary'}-s{seed}"


def run_one(arm: tuple[str, bool], seed: int, args) -> Path:
    precision, bitwise = arm
    run_dir = Path(args.out) / name(precision, bitwise, seed)
    done = len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
    if done >= args.steps:
        return run_dir
    cmd = [
        sys.executable,
        "-m",
        "unison",
        "train",
        *DEMO,
        "--steps",
        str(args.steps),
        "--seed",
        str(seed),
        "--precision",
        precision,
        f"precision.bitwise={str(bitwise).lower()}",
        f"run.out={run_dir}",
        "run.eval_every=20",
        "run.save_every=5",
        "run.progress=false",
        "run.threads=1",
        *(LONG if args.long else []),
        # a run stopped before its first checkpoint starts over
        *(["--resume"] if (run_dir / "checkpoints").exists() else ["--overwrite"] if run_dir.exists() else []),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{run_dir.name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
    return run_dir


def summary(run_dir: Path) -> dict | None:
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    if not rows:
        return None
    acc = [r["rollout/accuracy"] for r in rows]
    smooth = [statistics.mean(acc[max(0, i - 4) : i + 1]) for i in range(len(acc))]
    return {
        "steps": len(rows),
        "first": statistics.mean(acc[:5]),
        "final": statistics.mean(acc[-10:]),
        "peak": max(smooth),
        "heldout": next((r["eval/avg@1"] for r in reversed(rows) if "eval/avg@1" in r), float("nan")),
        "grad_norm": statistics.mean(r["learner/grad_norm"] for r in rows),
        "k3": statistics.mean(r["mismatch/k3"] for r in rows),
        "bits": statistics.mean(r.get("mismatch/bit_equal_frac", float("nan")) for r in rows),
    }


def write(args, seeds: list[int]) -> None:
    head = (
        "| arm | seeds | steps | first acc | final acc | peak acc | held-out | grad norm | k3 | bit-equal |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    lines, runs = [head], []
    for precision, bitwise in ARMS:
        found = [s for s in (summary(Path(args.out) / name(precision, bitwise, seed)) for seed in seeds) if s]
        runs += [Path(args.out) / name(precision, bitwise, seed) for seed in seeds]
        if not found:
            continue
        mean = {k: statistics.mean(s[k] for s in found) for k in found[0]}
        lines.append(
            f"| {precision} {'bitwise' if bitwise else 'ordinary'} | {len(found)} | {mean['steps']:.0f} | "
            f"{mean['first']:.3f} | {mean['final']:.3f} | {mean['peak']:.3f} | {mean['heldout']:.3f} | "
            f"{mean['grad_norm']:.3f} | {mean['k3']:.2e} | {mean['bits']:.3f} |"
        )
    present = [r for r in runs if (r / "metrics.jsonl").exists()]
    figure = FIGURE.with_name(f"{FIGURE.stem}_long.png") if args.long else FIGURE
    if present:
        plot_runs(
            [str(r) for r in present],
            ["rollout/accuracy", "learner/grad_norm"],
            figure,
            labels=[r.name for r in present],
            smooth=5,
        )
    where = "countdown-long (builtin-long)" if args.long else "the demo's setup (configs/demo.yaml)"
    text = (
        f"Command: `OMP_NUM_THREADS=1 python bench/bitwise_study.py --seeds {','.join(map(str, seeds))} --steps "
        f"{args.steps}{' --long' if args.long else ''}`, on {where}; means over the seeds finished so far. "
        f"Machine: {machine_description()}. Figure: figures/{figure.name}.\n\n" + "\n".join(lines)
    )
    replace_section("bitwise-study-long" if args.long else "bitwise-study", text, DOC)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--out", default="/work/runs/bitwise-study")
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--write-only", action="store_true", help="only rewrite the doc from the runs so far")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.write_only:
        jobs = [(arm, seed) for seed in seeds for arm in ARMS]
        with ThreadPoolExecutor(args.jobs) as pool:
            for run_dir in pool.map(lambda j: run_one(*j, args), jobs):
                print(
                    f"{run_dir.name}: {len(read_metrics(run_dir)) if (run_dir / 'metrics.jsonl').exists() else 0} "
                    "steps",
                    flush=True,
                )
                write(args, seeds)
    write(args, seeds)


if __name__ == "__main__":
    main()
