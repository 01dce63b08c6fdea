"""LoRA against full fine-tuning: time per step, peak memory, trainable parameters, and accuracy after the demo.

    python bench/lora.py [--models builtin,30m] [--steps 5] [--rounds 2] [--demo]

Timing (every model of --models: the built-in model, the random 25M-parameter Qwen2 `30m` of bench/bench_models.py,
or the fetched SmolLM2-135M-Instruct on the word problems, `smollm2-135m-instruct`, written to its own section):
`unison train` full and with LoRA (lora.rank / lora.alpha, every linear layer of the decoder blocks), in fp16 and
bf16 (rollout and training alike), taking turns, `--rounds` times; `--prompts` x `--group` samples of at most
`--new-tokens` tokens, one update a step, one thread, model.matmul=auto. A run's step time is the median of its steps
after the first; peak memory is the process's peak resident set (engine, learner and everything else).

With --demo: `unison demo` (fp16 against bf16, the demo's defaults, 120 steps) full and with LoRA at --demo-lr on the
built-in model; its final training accuracy (the mean of the last five steps) and held-out accuracy per precision.

Writes its tables into docs/lora.md (sections `lora-cost` and `lora-demo`) and ends with a line `RESULT ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import build  # noqa: E402
from docsection import replace_section  # noqa: E402
from ranks import model_dir, train_rows  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs/lora.md"


# fetched real models, and the data settings they train on
REAL = {"smollm2-135m-instruct": ["data.source=word-problems", "data.subset="]}


def model_path(name: str) -> str:
    from unison.models import resolve_model_dir

    return str(resolve_model_dir(name)) if name in REAL else model_dir(name)


def trainable(name: str, rank: int, alpha: float) -> tuple[int, int]:
    """(parameters, of which LoRA trains) of model `name`."""
    from unison.lora import resolve_targets, wrap
    from unison.models import load_model

    model = load_model(model_path(name)) if name in REAL else build(name)
    total = sum(p.numel() for p in model.parameters())
    wrapped = wrap(model, rank, alpha, resolve_targets(model, "auto"))
    return total, sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def lora_args(args) -> list[str]:
    return ["lora.enabled=true", f"lora.rank={args.rank}", f"lora.alpha={args.alpha}"]


def timing(path: str, precision: str, lora: bool, args, data: list[str] = ()) -> dict:
    extra = [f"precision.rollout={precision}", f"precision.train={precision}", *(lora_args(args) if lora else [])]
    extra += list(data)
    rows = train_rows(path, args, *extra)
    return {
        "step": statistics.median(r["perf/step_seconds"] for r in rows[1:]),
        "learn": statistics.median(r["perf/learn_seconds"] for r in rows[1:]),
        "rss": max(r["perf/peak_rss_mib"] for r in rows),
    }


def demo(lora: bool, args) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-lora-demo-")) / "demo"
    extra = [*lora_args(args), f"optim.lr={args.demo_lr}"] if lora else []
    cmd = [
        sys.executable,
        "-m",
        "unison",
        "demo",
        f"run.out={out}",
        "run.progress=false",
        f"run.steps={args.demo_steps}",
        *extra,
    ]
    subprocess.run(cmd, env={**os.environ}, check=True, capture_output=True, text=True)
    return json.loads((out / "summary.json").read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="builtin,30m")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--demo-steps", type=int, default=120)
    ap.add_argument("--demo-lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]  # --models '': the demo alone
    lines = [
        "| model | precision | parameters trained | step, full (s) | step, LoRA (s) | LoRA / full | "
        "learner, full (s) | learner, LoRA (s) | peak memory, full (MiB) | peak memory, LoRA (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = []
    for name in models:
        path = model_path(name)
        total, lora_params = trainable(name, args.rank, args.alpha)
        runs: dict = {}
        for _ in range(args.rounds):
            for precision in ("fp16", "bf16"):
                for lora in (False, True):  # taking turns
                    runs.setdefault((precision, lora), []).append(
                        timing(path, precision, lora, args, REAL.get(name, []))
                    )
        for precision in ("fp16", "bf16"):
            full, lo = (
                {k: statistics.median(r[k] for r in runs[(precision, flag)]) for k in ("step", "learn", "rss")}
                for flag in (False, True)
            )
            label = "built-in (0.8M)" if name == "builtin" else f"{name} ({total / 1e6:.0f}M)"
            lines.append(
                f"| {label} | {precision} | {lora_params:,} of {total:,} ({lora_params / total:.1%}) | "
                f"{full['step']:.2f} | {lo['step']:.2f} | {lo['step'] / full['step']:.2f} | "
                f"{full['learn']:.2f} | {lo['learn']:.2f} | {full['rss']:.0f} | {lo['rss']:.0f} |"
            )
            summary.append(f"{name}/{precision}={lo['step'] / full['step']:.2f}x")
            print(lines[-1], flush=True)
    command = (
        f"python bench/lora.py --models {args.models} --steps {args.steps} --rounds {args.rounds} --prompts "
        f"{args.prompts} --group {args.group} --new-tokens {args.new_tokens} --rank {args.rank} --alpha "
        f"{args.alpha:g}"
    )
    if models:  # a real model's table is a section of its own
        section = "lora-cost" + "".join(f"-{m}" for m in models if m in REAL)
        replace_section(section, "\n".join([*lines, "", f"    {command}"]), DOC)
    if args.demo:
        from unison.demo import DemoConfig

        # (no time column: the two demos run one after the other, under whatever else the machine runs; the timing
        # table above takes turns)
        rows = [
            "| fine-tuning | precision | final training accuracy | held-out accuracy | mismatch k3 (mean) | "
            "skipped steps |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for lora in (False, True):
            got = demo(lora, args)
            what = f"LoRA r{args.rank}, lr {args.demo_lr:g}" if lora else f"full, lr {DemoConfig().optim.lr:g}"
            for precision, s in got.items():
                rows.append(
                    f"| {what} | {precision} | {s['final_train_accuracy']:.3f} | {s['heldout_accuracy']:.3f} "
                    f"| {s['mismatch_k3_mean']:.2e} | {s['skipped_steps']:.0f} |"
                )
                summary.append(f"{'lora' if lora else 'full'}/{precision}/acc={s['final_train_accuracy']:.3f}")
                print(rows[-1], flush=True)
        threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        command = (
            f"{threads}python bench/lora.py --models '{args.models}' --demo --demo-steps {args.demo_steps} "
            f"--demo-lr {args.demo_lr:g} --rank {args.rank} --alpha {args.alpha:g}"
        )
        replace_section("lora-demo", "\n".join([*rows, "", f"    {command}"]), DOC)
    print("RESULT " + " ".join(summary))


if __name__ == "__main__":
    main()
