"""The paper's sanity test on a real model: GRPO in fp16 against bf16 (and bf16 with its corrections) on word problems.

    python bench/real_sanity.py [--arms grpo:fp16,grpo:bf16,grpo-seq-mis:bf16,grpo-token-tis:bf16] [--steps 200]
                                [--chunk 10] [--jobs 1] [--lr 5e-6] [--out /work/runs/real-sanity] [--report]

Each arm is `unison train` on SmolLM2-135M-Instruct (`--model`) with the shipped word problems
(`data.source=word-problems`), the same seed, rollout and learner in the arm's precision: `--prompts` x `--group`
responses of at most `--new-tokens` tokens a step at temperature 1, `--train-batch` sequences per optimizer step,
constant lr `--lr`, the mismatch estimators every step (with `--exact`, also the exact divergences from both
engines' whole distributions: about a fifth more time a step and 4 GB more memory on this model), held-out avg@1
on `--eval-prompts` prompts of the test split every `--chunk` steps. The arms advance in turns of `--chunk` steps
(`--jobs` at a time, one thread each), so that at any time they stand within one chunk of each other; each turn is
one `unison train --resume` with `run.steps` raised to the turn's end, which goes on from the arm's newest
checkpoint (every `--save-every` steps and at each turn's end). So the script, stopped anywhere and started again
with the same arguments, goes on where the runs stopped; `--report` writes the report from whatever steps have
completed and samples nothing.

After every turn it writes the section `real-sanity` of `--doc` (the table, the held-out accuracy at each
evaluation, the number of steps behind them) and docs/figures/real_sanity.png (training accuracy, held-out
accuracy, k3 and the mean |sequence log-ratio| against step), and `summary.json` in `--out`. Ends with `RESULT ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from docsection import count, replace_section  # noqa: E402

PRESETS = ["grpo", "grpo-seq-mis", "grpo-token-tis", "gspo", "dr-grpo", "pg-seq-is", "pg-seq-mis", "pg-token-is"]


def arm_list(text: str) -> list[tuple[str, str]]:
    """`preset:precision,...` as pairs, each checked."""
    arms = []
    for item in text.split(","):
        preset, _, precision = item.strip().partition(":")
        if preset not in PRESETS or precision not in ("fp32", "fp16", "bf16"):
            raise argparse.ArgumentTypeError(f"{item!r}: give preset:precision, e.g. grpo:fp16 ({', '.join(PRESETS)})")
        arms.append((preset, precision))
    return arms


def overrides(preset: str, precision: str, args) -> list[str]:
    """The `unison train` settings of one arm (all but run.steps)."""
    return [
        f"model.path={args.model}",
        "data.source=word-problems",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"optim.train_batch_size={args.train_batch}",
        f"optim.micro_batch_size={args.micro_batch}",
        f"optim.lr={args.lr}",
        f"algorithm.preset={preset}",
        f"precision.rollout={precision}",
        f"precision.train={precision}",
        f"metrics.exact_divergence={str(args.exact).lower()}",
        f"run.eval_every={args.chunk}",
        f"run.eval_prompts={args.eval_prompts}",
        f"run.save_every={args.save_every}",
        "run.keep_checkpoints=1",
        "run.threads=1",
        "run.progress=false",
        "run.loggers=[jsonl]",
        f"run.seed={args.seed}",
        f"run.out={run_dir(preset, precision, args)}",
    ]


def run_dir(preset: str, precision: str, args) -> Path:
    return Path(args.out) / f"{preset}-{precision}"


def steps_done(path: Path) -> int:
    """The step of the run's newest complete checkpoint (0: none yet)."""
    from unison.checkpoint import latest_intact_checkpoint

    latest = latest_intact_checkpoint(path) if path.is_dir() else None
    return int(latest.name.split("-")[-1]) if latest is not None else 0


def advance(arm: tuple[str, str], target: int, args) -> None:
    """Run one arm on to step `target` (`unison train --resume`), its output appended to `<out>/<arm>.log`."""
    preset, precision = arm
    if steps_done(run_dir(preset, precision, args)) >= target:
        return
    cmd = [sys.executable, "-m", "unison", "train", *overrides(preset, precision, args), f"run.steps={target}"]
    log = Path(args.out) / f"{preset}-{precision}.log"
    with open(log, "a") as f:
        f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} to step {target}: {' '.join(cmd)} --resume\n")
        f.flush()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([*cmd, "--resume"], env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{preset} {precision}: unison train exited with {done.returncode}; see {log}")


def summarize(path: Path) -> dict | None:
    """One arm's numbers from its metrics.jsonl, or None before its first step."""
    from unison.report import read_metrics

    rows = read_metrics(path) if (path / "metrics.jsonl").exists() else []
    if not rows:
        return None
    acc = [r["rollout/accuracy"] for r in rows]
    smooth = [statistics.mean(acc[max(0, i - 4) : i + 1]) for i in range(len(acc))]
    peak = max(range(len(smooth)), key=smooth.__getitem__)
    mean = lambda key, part=rows: statistics.mean(r.get(key, float("nan")) for r in part)  # noqa: E731
    evals = [(r["step"], r["eval/avg@1"]) for r in rows if "eval/avg@1" in r]
    return {
        "steps": len(rows),
        "first": statistics.mean(acc[:5]),
        "last": statistics.mean(acc[-5:]),
        "peak": smooth[peak],
        "collapsed": any(v < 0.5 * smooth[peak] for v in smooth[peak:]) and smooth[peak] > 0.2,
        "evals": evals,
        "length": mean("rollout/response_length_mean"),
        "k3": mean("mismatch/k3"),
        "k3_last": mean("mismatch/k3", rows[-5:]),
        "seq_abs": mean("mismatch/seq_log_ratio_abs_mean"),
        "seq_abs_last": mean("mismatch/seq_log_ratio_abs_mean", rows[-5:]),
        "seq_kl": mean("mismatch/exact_seq_kl_mu_pi"),
        "masked": mean("is/masked_frac"),
        "skipped": rows[-1].get("precision/skipped_steps", 0),
        "step_s": statistics.median(r["perf/step_seconds"] for r in rows),
    }


def plot(arms: list[tuple[str, str]], args, path: Path, note: str) -> None:
    """Training accuracy (5-step mean), held-out avg@1, k3 and the mean |sequence log-ratio| against step, one line an
    arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unison.report import read_metrics

    panels = [
        ("rollout/accuracy", "training accuracy (5-step mean)", 5, False),
        ("eval/avg@1", f"held-out avg@1 ({args.eval_prompts} test prompts)", 1, False),
        ("mismatch/k3", "k3 (per token)", 1, True),
        ("mismatch/seq_log_ratio_abs_mean", "mean |log pi(y) - log mu(y)| per sequence", 1, True),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 3.9))
    for preset, precision in arms:
        d = run_dir(preset, precision, args)
        rows = read_metrics(d) if (d / "metrics.jsonl").exists() else []
        for ax, (key, _, smooth, _) in zip(axes, panels):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            ys = [statistics.mean(ys[max(0, j - smooth + 1) : j + 1]) for j in range(len(ys))]
            ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, ms=3, label=f"{preset} {precision}")
    for ax, (_, title, _, log) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log" if log else "linear")
        ax.grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(arms: list[tuple[str, str]], results: dict) -> list[str]:
    """The summary table, and the held-out accuracy at each evaluation."""
    lines = [
        "| preset | precision | steps | accuracy, first 5 steps | last 5 | peak (5-step mean) | collapsed | "
        "held-out, last evaluation | response length | k3 (mean) | last 5 | mean \\|seq log-ratio\\| | last 5 | "
        "masked by seq-MIS | skipped steps | s/step |",
        "| --- | --- |" + " ---: |" * 14,
    ]
    for arm in arms:
        s = results.get(arm)
        if s is None:
            lines.append(f"| {arm[0]} | {arm[1]} | 0 |" + " - |" * 13)
            continue
        held = f"{s['evals'][-1][1]:.3f} (step {s['evals'][-1][0]})" if s["evals"] else "-"
        lines.append(
            f"| {arm[0]} | {arm[1]} | {s['steps']} | {s['first']:.3f} | {s['last']:.3f} | {s['peak']:.3f} | "
            f"{'yes' if s['collapsed'] else 'no'} | {held} | {s['length']:.0f} | {s['k3']:.2e} | "
            f"{s['k3_last']:.2e} | {s['seq_abs']:.2e} | {s['seq_abs_last']:.2e} | {s['masked']:.3f} | "
            f"{s['skipped']:.0f} | {s['step_s']:.0f} |"
        )
    steps = sorted({st for s in results.values() if s for st, _ in s["evals"]})
    if steps:
        lines += ["", "| held-out avg@1 at step | " + " | ".join(map(str, steps)) + " |"]
        lines.append("| --- |" + " ---: |" * len(steps))
        for arm in arms:
            got = dict(results[arm]["evals"]) if results.get(arm) else {}
            cells = [f"{got[st]:.3f}" if st in got else "-" for st in steps]
            lines.append(f"| {arm[0]} {arm[1]} | " + " | ".join(cells) + " |")
    return lines


def command_line(args) -> str:
    """The command that runs (or resumes) this study with these settings."""
    arms = ",".join(f"{p}:{q}" for p, q in args.arms)
    return (
        f"nohup nice -n 19 python bench/real_sanity.py --arms {arms} --steps {args.steps} --chunk {args.chunk} "
        f"--jobs {args.jobs} --prompts {args.prompts} --group {args.group} --new-tokens {args.new_tokens} "
        f"--train-batch {args.train_batch} --micro-batch {args.micro_batch} --lr {args.lr:g} "
        f"--eval-prompts {args.eval_prompts}{' --exact' if args.exact else ''} --out {args.out} &"
    )


def report(args, started: float | None = None) -> dict:
    """The section `real-sanity` of the doc and its figure, from whatever steps have completed."""
    from real_length import matmul_mode

    results = {arm: summarize(run_dir(*arm, args)) for arm in args.arms}
    note = f"{args.model}, word problems, {args.prompts} x {args.group} a step; {matmul_mode('cpu')}"
    figure = (Path(args.doc).parent / "figures" if args.doc else Path(args.out)) / "real_sanity.png"
    plot(args.arms, args, figure, note)
    done = [s["steps"] for s in results.values() if s]
    counts = ", ".join(f"{p} {q} {s['steps'] if s else 0}" for (p, q), s in results.items())
    hours = sum(s["step_s"] * s["steps"] for s in results.values() if s) / 3600
    text = [
        f"Steps completed: {counts} "
        f"(of {args.steps}; about {hours:.1f} hours of steps in all, from the median step time).",
        "",
        *table(args.arms, results),
        "",
        "![training accuracy, held-out accuracy, k3 and mean sequence log-ratio against step](figures/real_sanity.png)",
        "",
        f"    {command_line(args)}",
        "",
        f"(fp16/bf16 products: {matmul_mode('cpu')}; one thread a run, {args.jobs} run(s) at a time, at low "
        "priority on a machine shared with other work, so s/step is indicative)",
    ]
    if args.doc:
        replace_section("real-sanity", "\n".join(text), Path(args.doc))
    print("\n".join(text), flush=True)
    (Path(args.out) / "summary.json").write_text(json.dumps({f"{p}-{q}": s for (p, q), s in results.items()}, indent=1))
    return {"min_steps": min(done) if len(done) == len(args.arms) else 0, "results": results}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--arms", type=arm_list, default=arm_list("grpo:fp16,grpo:bf16,grpo-seq-mis:bf16,grpo-token-tis:bf16")
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=count, default=200, help="the steps each arm runs to")
    ap.add_argument("--chunk", type=count, default=10, help="steps an arm runs in one turn (and between evaluations)")
    ap.add_argument("--save-every", type=count, default=5)
    ap.add_argument("--jobs", type=count, default=1, help="arms run at a time (one thread each)")
    ap.add_argument("--prompts", type=count, default=8)
    ap.add_argument("--group", type=count, default=8)
    ap.add_argument("--new-tokens", type=count, default=160)
    ap.add_argument("--train-batch", type=count, default=32)
    ap.add_argument("--micro-batch", type=count, default=8, help="sequences per forward/backward (memory only)")
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--eval-prompts", type=count, default=200)
    ap.add_argument("--exact", action="store_true", help="also the exact divergences every step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/work/runs/real-sanity")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "real.md"), help="'' for none")
    ap.add_argument("--report", action="store_true", help="only write the report from the steps completed")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.report:
        targets = [*range(args.chunk, args.steps, args.chunk), args.steps]
        for target in targets:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(advance, args.arms, [target] * len(args.arms), [args] * len(args.arms)))
            report(args)
    got = report(args)["results"]
    print(
        "RESULT "
        + " ".join(f"{p}/{q}/steps={s['steps']}/acc={s['last']:.3f}" for (p, q), s in got.items() if s is not None)
    )


if __name__ == "__main__":
    main()
