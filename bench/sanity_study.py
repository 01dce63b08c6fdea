"""The sanity study in miniature: presets x precisions x seeds on the built-in perfectible set.

    python bench/sanity_study.py [--presets grpo,grpo-token-tis,grpo-seq-mis,pg-seq-is] [--precisions fp16,bf16]
                                 [--reference grpo] [--seeds 0,1,2] [--steps 50] [--out runs/sanity] [--quick]

`--reference` names the presets that also run in fp32 (the mismatch-free reference).

Each run is `unison train` with configs/sanity-builtin-<preset>.yaml, the precision and seed changed. Writes
docs/sanity.md (final training accuracy over the last 10 steps, peak accuracy, held-out accuracy, mismatch k3 at
the start, middle and end, skipped steps, whether the run collapsed: accuracy falling below half its peak after
the peak) and figures/sanity_<preset>.png beside it (accuracy and k3 against step for every precision and seed).
Ends with a line `RESULT ...`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from docsection import count, joined, listed  # noqa: E402

from unison.config import TrainConfig, load_config  # noqa: E402
from unison.report import plot_runs, read_metrics  # noqa: E402
from unison.trainer import train  # noqa: E402

PRESETS = sorted(p.stem.removeprefix("sanity-builtin-") for p in (ROOT / "configs").glob("sanity-builtin-*.yaml"))


def run_one(preset: str, precision: str, seed: int, steps: int, out: Path) -> Path:
    run_dir = out / f"{preset}-{precision}-s{seed}"
    if (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= steps:
        return run_dir
    cfg = load_config(
        TrainConfig,
        ROOT / "configs" / f"sanity-builtin-{preset}.yaml",
        {
            "precision.rollout": precision,
            "precision.train": precision,
            "run.seed": seed,
            "run.steps": steps,
            "run.out": str(run_dir),
            "run.progress": False,
            "run.loggers": ["jsonl"],
            "run.save_every": steps,
            "run.eval_every": steps,
        },
    )
    train(cfg, overwrite=True, quiet=True)
    return run_dir


def summarize(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    acc = [r["rollout/accuracy"] for r in rows]
    k3 = [r["mismatch/k3"] for r in rows]
    smooth = [statistics.mean(acc[max(0, i - 4) : i + 1]) for i in range(len(acc))]
    peak_i = max(range(len(smooth)), key=smooth.__getitem__)
    collapsed = any(v < 0.5 * smooth[peak_i] for v in smooth[peak_i:]) and smooth[peak_i] > 0.2
    return {
        "final_acc": statistics.mean(acc[-10:]),
        "peak_acc": smooth[peak_i],
        "first_acc": statistics.mean(acc[:5]),
        "heldout": next((r["eval/avg@1"] for r in reversed(rows) if "eval/avg@1" in r), float("nan")),
        "k3_start": statistics.mean(k3[:5]),
        "k3_mid": statistics.mean(k3[len(k3) // 2 - 2 : len(k3) // 2 + 3]),
        "k3_end": statistics.mean(k3[-5:]),
        "k3_mean": statistics.mean(k3),
        "skipped": rows[-1]["precision/skipped_steps"],
        "collapsed": collapsed,
        "seconds": sum(r["perf/step_seconds"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", type=listed(PRESETS), default=["grpo", "grpo-token-tis", "grpo-seq-mis", "pg-seq-is"])
    ap.add_argument("--precisions", type=listed(["fp16", "bf16", "fp32"]), default=["fp16", "bf16"])
    ap.add_argument(
        "--reference",
        type=listed(PRESETS, allow_empty=True),
        default=["grpo"],
        help="presets also run in fp32 ('' for none)",
    )
    ap.add_argument("--seeds", type=listed(kind=int), default=[0, 1, 2])
    ap.add_argument("--steps", type=count, default=50)
    ap.add_argument("--out", default=str(ROOT / "runs" / "sanity"))
    ap.add_argument(
        "--doc",
        default=None,
        help="the document to write (default: docs/sanity.md; none for --quick, "
        "so a quick run leaves the study's document and figures as they are)",
    )
    ap.add_argument("--quick", action="store_true", help="one preset, fp16 and bf16, one seed, 5 steps")
    args = ap.parse_args()
    if args.doc is None and not args.quick:
        args.doc = str(ROOT / "docs" / "sanity.md")
    if args.quick:
        args.presets, args.precisions, args.seeds, args.steps, args.reference = ["grpo"], ["fp16", "bf16"], [0], 5, []
    presets, precisions, seeds, reference = args.presets, args.precisions, args.seeds, args.reference
    out = Path(args.out)
    results = {}

    def precisions_of(preset: str) -> list[str]:
        return precisions + (["fp32"] if preset in reference and "fp32" not in precisions else [])

    for seed in seeds:
        for preset in presets:
            for precision in precisions_of(preset):
                run_dir = run_one(preset, precision, seed, args.steps, out)
                results[(preset, precision, seed)] = summarize(run_dir)
                r = results[(preset, precision, seed)]
                print(
                    f"{preset:16s} {precision:5s} seed {seed}: final acc {r['final_acc']:.3f} "
                    f"peak {r['peak_acc']:.3f} k3 {r['k3_start']:.1e} -> {r['k3_end']:.1e} skipped {r['skipped']:.0f}"
                    f"{' COLLAPSED' if r['collapsed'] else ''}  ({r['seconds']:.0f}s)",
                    flush=True,
                )
    figs = figures_dir(Path(args.doc)) if args.doc else None
    for preset in presets if figs else []:
        keys = [(p, s) for p in precisions_of(preset) for s in seeds]
        runs = [out / f"{preset}-{p}-s{s}" for p, s in keys]
        plot_runs(
            runs,
            ["rollout/accuracy", "mismatch/k3"],
            figs / f"sanity_{preset}.png",
            labels=[f"{p} seed {s}" for p, s in keys],
            smooth=5,
            log_scale=["mismatch/k3"],
        )
    if args.doc:
        write_doc(Path(args.doc), results, args)
    fp16 = [r["final_acc"] for (_, p, _), r in results.items() if p == "fp16"]
    bf16 = [r["final_acc"] for (_, p, _), r in results.items() if p == "bf16"]
    print(
        f"RESULT runs={len(results)} fp16_final_acc_mean={statistics.mean(fp16) if fp16 else float('nan'):.3f} "
        f"bf16_final_acc_mean={statistics.mean(bf16) if bf16 else float('nan'):.3f} "
        f"collapsed={sum(r['collapsed'] for r in results.values())}"
    )


def figures_dir(doc: Path) -> Path:
    """Where the figures go: a `figures` folder beside the document (docs/figures for docs/sanity.md)."""
    return doc.parent / "figures"


def write_doc(path: Path, results: dict, args) -> None:
    def spread(values: list[float], fmt: str) -> str:
        if len(values) < 2:
            return format(values[0], fmt)
        return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"

    presets = args.presets
    rank = {p: i for i, p in enumerate(["fp16", "bf16", "fp32"])}
    ordered = sorted(
        results.items(),
        key=lambda kv: (presets.index(kv[0][0]) if kv[0][0] in presets else 99, rank.get(kv[0][1], 9), kv[0][2]),
    )
    groups: dict[tuple[str, str], list[dict]] = {}
    for (preset, precision, _), r in ordered:
        groups.setdefault((preset, precision), []).append(r)
    lines = [
        "# Sanity study on the built-in perfectible set",
        "",
        (
            f"Command: `python bench/sanity_study.py --presets {joined(args.presets)} --precisions "
            f"{joined(args.precisions)} --reference {joined(args.reference)} --seeds {joined(args.seeds)} "
            f"--steps {args.steps}` "
            f"({sum(r['seconds'] for r in results.values()) / 60:.0f} minutes of training steps in all, one run at a "
            "time on one core of this 2-core CPU)."
        ),
        "",
        "Over seeds (mean ± standard deviation):",
        "",
        "| preset | precision | seeds | final acc (last 10) | peak acc | held-out | k3 mean over the run | collapsed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (preset, precision), rs in groups.items():
        lines.append(
            f"| {preset} | {precision} | {len(rs)} | {spread([r['final_acc'] for r in rs], '.3f')} | "
            f"{spread([r['peak_acc'] for r in rs], '.3f')} | {spread([r['heldout'] for r in rs], '.3f')} | "
            f"{spread([r['k3_mean'] for r in rs], '.1e')} | {sum(r['collapsed'] for r in rs)} of {len(rs)} |"
        )
    lines += [
        "",
        "Every run:",
        "",
        "| preset | precision | seed | first acc | peak acc | final acc (last 10) | held-out | k3 start | k3 mid "
        "| k3 end | skipped | collapsed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (preset, precision, seed), r in ordered:
        lines.append(
            f"| {preset} | {precision} | {seed} | {r['first_acc']:.3f} | {r['peak_acc']:.3f} | {r['final_acc']:.3f} | "
            f"{r['heldout']:.3f} | {r['k3_start']:.1e} | {r['k3_mid']:.1e} | {r['k3_end']:.1e} | {r['skipped']:.0f} | "
            f"{'yes' if r['collapsed'] else 'no'} |"
        )
    shown = figures_dir(path).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    lines += ["", "Figures: " + ", ".join(f"`{shown / f'sanity_{p}.png'}`" for p in args.presets)]
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else ""
    marker = "<!-- analysis -->"
    analysis = existing[existing.index(marker) :] if marker in existing else marker + "\n"
    path.write_text("\n".join(lines) + "\n\n" + analysis)
    (path.with_suffix(".json")).write_text(json.dumps({"/".join(map(str, k)): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
