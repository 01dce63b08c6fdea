"""The sanity test at length: fp16 against bf16 with responses of 300 to 1,300 tokens (the `countdown-long` task).

    python bench/long_study.py [--model builtin-long] [--presets grpo,grpo-seq-mis] [--precisions fp16,bf16]
                               [--steps 40] [--prompts 4] [--group 8] [--jobs 2] [--out runs/long-study] [--reuse]

Two parts, both on the long warm start (`builtin-long`, made by `python -m unison.warmstart --long`):

1. The sequence-level mismatch against response length. The native engine samples `--probe-prompts` x `--group`
   long responses in each precision (rollout and learner alike) and the learner recomputes its whole distributions;
   each sequence's exact KL(mu || pi) (the sum of the per-position KLs) is binned by response length, beside the
   same measurement on the built-in model (responses of 15 to 170 tokens).
2. RL at length. `unison train` for each preset x precision, `--steps` steps of `--prompts` x `--group` samples of
   at most `--new-tokens` tokens (one update a step, lr `--lr`, the exact divergences logged every step), `--jobs`
   runs at a time with one thread each. The table gives the training accuracy at the start and end (means of the
   first and last five steps), its peak and whether the run collapsed (accuracy falling below half its peak after
   it), the exact sequence KL, k3 and, for grpo-seq-mis, the share of sequences its mask drops.

Writes docs/long.md (sections `long-length` and `long-rl`) and docs/figures/long_*.png, and ends with `RESULT ...`.
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
from docsection import replace_section  # noqa: E402

DOC = ROOT / "docs" / "long.md"
FIGURES = ROOT / "docs" / "figures"
BINS = [(0, 100), (100, 200), (300, 600), (600, 900), (900, 1400)]


def length_table(model: str, task: str, args, max_new_tokens: int) -> dict:
    """Per precision: [(length, exact sequence KL)] of every sampled response."""
    import torch

    from unison.config import DataConfig, ModelConfig, RolloutConfig
    from unison.mismatch import token_divergences
    from unison.precision import PrecisionPolicy, parse_precision
    from unison.setup import build

    torch.manual_seed(0)
    s = build(ModelConfig(path=model), DataConfig(source=task), RolloutConfig(max_new_tokens=max_new_tokens), seed=0)
    examples = s.examples("test", n=args.probe_prompts, subset=False)
    prompts = [p for p in s.encode(examples) for _ in range(args.group)]
    out = {}
    for name in args.precisions.split(","):
        dtype = parse_precision(name)
        with s.engine(dtype, seed=0) as engine:
            learner = s.learner(PrecisionPolicy(dtype, dtype))
            learner.sync(engine)
            ro = engine.generate(prompts, s.sampling(), keep_distributions=True)
            logq = learner.distributions(ro, micro_batch_size=16)
            kl = torch.where(ro.mask, token_divergences(logq, ro.distributions)[0], 0.0).sum(1)
            out[name] = list(zip(ro.lengths.tolist(), kl.tolist()))
    return out


def run_one(preset: str, precision: str, args) -> Path:
    run_dir = Path(args.out) / f"{preset}-{precision}"
    done = run_dir / "metrics.jsonl"
    if args.reuse and done.exists() and len(done.read_text().splitlines()) >= args.steps:
        return run_dir  # a finished run of an earlier call
    cmd = [
        sys.executable,
        "-m",
        "unison",
        "train",
        f"model.path={args.model}",
        "data.source=countdown-long",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"optim.train_batch_size={args.prompts * args.group}",
        f"optim.lr={args.lr}",
        f"algorithm.preset={preset}",
        f"precision.rollout={precision}",
        f"precision.train={precision}",
        f"run.steps={args.steps}",
        f"run.save_every={args.steps}",
        "run.eval_every=0",
        "run.progress=false",
        "metrics.exact_divergence=true",
        f"run.seed={args.seed}",
        f"run.out={run_dir}",
        "--overwrite",
    ]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{preset} {precision}: {done.stderr[-2000:]}")
    return run_dir


def summarize(run_dir: Path) -> dict:
    from unison.report import read_metrics

    rows = read_metrics(run_dir)
    acc = [r["rollout/accuracy"] for r in rows]
    smooth = [statistics.mean(acc[max(0, i - 4) : i + 1]) for i in range(len(acc))]
    peak = max(range(len(smooth)), key=smooth.__getitem__)
    mean = lambda key: statistics.mean(r.get(key, 0.0) for r in rows)  # noqa: E731
    return {
        "first": statistics.mean(acc[:5]),
        "last": statistics.mean(acc[-5:]),
        "peak": smooth[peak],
        "collapsed": any(v < 0.5 * smooth[peak] for v in smooth[peak:]) and smooth[peak] > 0.2,
        "length": mean("rollout/response_length_mean"),
        "seq_kl": mean("mismatch/exact_seq_kl_mu_pi"),
        "seq_kl_last": statistics.mean(r["mismatch/exact_seq_kl_mu_pi"] for r in rows[-5:]),
        "heldout": next((r["eval/avg@1"] for r in reversed(rows) if "eval/avg@1" in r), float("nan")),
        "k3": mean("mismatch/k3"),
        "masked": mean("is/masked_frac"),
        "skipped": rows[-1]["precision/skipped_steps"],
        "step_s": statistics.median(r["perf/step_seconds"] for r in rows),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin-long")
    ap.add_argument("--presets", default="grpo,grpo-seq-mis")
    ap.add_argument("--precisions", default="fp16,bf16")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=1400)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--probe-prompts", type=int, default=8)
    ap.add_argument("--skip-length", action="store_true")
    ap.add_argument("--skip-rl", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="keep the finished runs found in --out")
    ap.add_argument("--out", default="runs/long-study")
    args = ap.parse_args(argv)
    result = []
    if not args.skip_length:
        t0 = time.perf_counter()
        seqs = {
            "built-in": length_table("builtin", "builtin", args, 192),
            "long": length_table(args.model, "countdown-long", args, args.new_tokens),
        }
        names = args.precisions.split(",")
        lines = [
            "| model | responses (tokens) | "
            + " | ".join(f"{p}: mean seq KL (n)" for p in names)
            + f" | {names[-1]} / {names[0]} |",
            "| --- | --- |" + " --- |" * (len(names) + 1),
        ]
        for model, per in seqs.items():
            for lo, hi in BINS:
                cells, means = [], []
                for name in args.precisions.split(","):
                    got = [kl for n, kl in per[name] if lo <= n < hi]
                    means.append(statistics.mean(got) if got else float("nan"))
                    cells.append(f"{means[-1]:.2e} ({len(got)})" if got else "-")
                if all(c == "-" for c in cells):
                    continue
                ratio = means[-1] / means[0] if len(means) > 1 and means[0] > 0 else float("nan")
                lines.append(f"| {model} | {lo}-{hi} | " + " | ".join(cells) + f" | {ratio:.0f} |")
        command = (
            f"OMP_NUM_THREADS=1 python bench/long_study.py --skip-rl --probe-prompts {args.probe_prompts} "
            f"--group {args.group} "
            f"--new-tokens {args.new_tokens}"
        )
        replace_section(
            "long-length", "\n".join([*lines, "", f"    {command}", f"({time.perf_counter() - t0:.0f} s)"]), DOC
        )
        print("\n".join(lines), flush=True)
        for model, per in seqs.items():
            for name, rows in per.items():
                result.append(f"{model}/{name}/seq_kl={statistics.mean(kl for _, kl in rows):.2e}")
    if not args.skip_rl:
        from unison.report import plot_runs

        runs = [(p, q) for p in args.presets.split(",") for q in args.precisions.split(",")]
        with ThreadPoolExecutor(args.jobs) as pool:
            dirs = list(pool.map(lambda pq: run_one(*pq, args), runs))
        lines = [
            "| preset | precision | accuracy, first 5 steps | last 5 | peak | collapsed | held-out at the end | "
            "response length | exact seq KL (mean) | last 5 | k3 (mean) | masked by seq-MIS | skipped steps | "
            "s/step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]

        total = 0.0
        for (preset, precision), d in zip(runs, dirs):
            s = summarize(d)
            total += s["step_s"] * args.steps
            lines.append(
                f"| {preset} | {precision} | {s['first']:.3f} | {s['last']:.3f} | {s['peak']:.3f} | "
                f"{'yes' if s['collapsed'] else 'no'} | {s['heldout']:.3f} | {s['length']:.0f} | "
                f"{s['seq_kl']:.2e} | "
                f"{s['seq_kl_last']:.2e} | {s['k3']:.2e} | "
                f"{s['masked']:.3f} | {s['skipped']:.0f} | {s['step_s']:.1f} |"
            )
            result.append(f"{preset}/{precision}/acc={s['last']:.3f}")
        FIGURES.mkdir(parents=True, exist_ok=True)
        fig = plot_runs(
            dirs,
            ["rollout/accuracy", "mismatch/exact_seq_kl_mu_pi", "rollout/response_length_mean"],
            FIGURES / "long_rl.png",
            labels=[f"{p} {q}" for p, q in runs],
            smooth=3,
            log_scale=["mismatch/exact_seq_kl_mu_pi"],
        )
        command = (
            f"python bench/long_study.py --skip-length --presets {args.presets} --precisions {args.precisions} "
            f"--steps {args.steps} --prompts {args.prompts} --group {args.group} --new-tokens "
            f"{args.new_tokens} --lr {args.lr:g} --jobs {args.jobs}"
        )
        text = "\n".join(
            [
                *lines,
                "",
                f"![accuracy, exact sequence KL and length against step](figures/{fig.name})",
                "",
                f"    {command}",
                f"({total / 60:.0f} min of steps over the {len(runs)} runs, {args.jobs} at a time, one "
                "thread each; the machine also ran other work meanwhile, so s/step is indicative)",
            ]
        )
        replace_section("long-rl", text, DOC)
        print("\n".join(lines), flush=True)
        json.dump(
            {f"{p}-{q}": summarize(d) for (p, q), d in zip(runs, dirs)},
            open(Path(args.out) / "summary.json", "w"),
            indent=1,
        )
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
