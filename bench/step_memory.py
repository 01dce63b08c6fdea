"""Peak resident memory of an RL step, against 20 bytes per parameter plus one micro-batch's activations.

Each measurement runs in a process of its own (this script with `--one`): `unison train`'s step (built as
bench/real_step_profile.py builds it, on bench/real_task.py's questions) for `--steps` steps on `--model`, in one
precision, full fine-tuning or LoRA, after which one micro-batch of the last step (the one with the most tokens) is
run forward with gradient to measure what its activations and logits hold. Read from /proc/self/status (VmHWM, the
peak resident set, reset between parts through /proc/self/clear_refs):

    baseline      the process after its imports, before any weight is loaded
    build         the peak while the learner and the engine are built
    rollout       the peak of the engine's generate (its decode weights, KV cache, logits)
    update        the peak of the optimizer step (activations, gradients, AdamW's moments)
    sync          the peak of the weight sync and its checksums
    micro-batch   the resident memory a micro-batch's forward adds (its activations and logits, kept for backward)

bytes/param is (the step's peak - baseline) / parameters. What full fine-tuning needs, per parameter: fp32 master 4,
AdamW's two moments 8, fp32 gradient 4, the learner's 16-bit copy 2 and the engine's 16-bit copy 2 (fp16/bf16; in
fp32 the model is its master and the engine holds fp32: 4 + 8 + 4 + 4), so the budget is 20 x parameters plus the
micro-batch. A synchronous run frees the engine's copy from the end of sampling to the sync (`release_weights`), so
the update itself holds 18 (fp16/bf16) or 16 (fp32) of those bytes per parameter.

    python bench/step_memory.py [--runs smollm2-135m-instruct:fp32,smollm2-135m-instruct:fp16]
        [--prompts 4] [--group 4] [--new-tokens 128] [--steps 2]
    python bench/step_memory.py --runs /tmp/qwen2-0.5b:fp16,/tmp/qwen2-1.5b:fp16:lora --prompts 2 --group 4 \\
        --new-tokens 48

A run is MODEL:PRECISION[:lora]. Writes its table into docs/benchmarks.md (section `step-memory`; --quick prints
it) and ends with a line `RESULT <model>_<precision>[_lora]_bytes_per_param=...`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from docsection import bench_parser, count, listed, machine_description, parse_bench_args, write_section  # noqa: E402
from real_step_profile import build  # noqa: E402

from unison.step import release_free_memory  # noqa: E402

GIB = 2**30


def peak_reset() -> int:
    """The peak resident set since the last reset (bytes), then reset it."""
    with open("/proc/self/status") as f:
        peak = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peaks:
    """The peak resident memory of each named part (`part(name)` starts one, ending the one before)."""

    def __init__(self):
        self.peaks: dict[str, int] = {}
        self.current = "baseline"
        peak_reset()

    def part(self, name: str) -> None:
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak_reset())
        self.current = name

    def around(self, owner, attr: str, name: str) -> None:
        """Count calls of owner.attr as part `name` (the part before resumes after)."""
        f = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            was = self.current
            self.part(name)
            try:
                return f(*args, **kwargs)
            finally:
                self.part(was)

        setattr(owner, attr, wrapper)


def micro_batch(learner, rollouts, cfg) -> tuple[int, int]:
    """(resident bytes a forward with gradient of the largest micro-batch adds, its tokens)"""
    import torch

    rows = torch.arange(len(rollouts))
    parts = learner.batcher.plan(rollouts, cfg.optim.micro_batch_size, rows)
    sizes = [
        int(rollouts.select(rows[p]).lengths.sum()) + sum(len(rollouts.prompt_ids[i]) for i in p.tolist())
        for p in parts
    ]
    part = rollouts.select(rows[parts[max(range(len(parts)), key=sizes.__getitem__)]])
    release_free_memory()
    before = resident()
    logp = learner.logprobs(learner.batch(part))
    added = resident() - before
    del logp
    return added, max(sizes)


def one(args) -> dict:
    """One measurement, in this process."""
    peaks = Peaks()  # the baseline: after the imports
    peaks.part("build")
    model, precision, *lora = args.one.split(":")
    args.model = model
    args.settings = ["lora.enabled=true", f"lora.rank={args.rank}", f"lora.alpha={2 * args.rank}"] if lora else []
    with tempfile.TemporaryDirectory() as folder:
        step, stream, shuffle, learner, engine = build(args, precision, folder)
        params = sum(p.numel() for p in learner.model.parameters())
        trained = sum(p.numel() for p in learner.weights.params)
        peaks.around(engine, "generate", "rollout")
        peaks.around(learner, "update", "update")
        peaks.around(learner, "sync", "sync")
        peaks.part("step")
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            m = step(i, stream, shuffle)
            times.append(time.perf_counter() - t0)
        peaks.part("micro-batch")
        added, tokens = micro_batch(learner, step.update.batch.rollouts, step.cfg)
        peaks.part("end")
    return {
        "params": params,
        "trained": trained,
        "peaks": peaks.peaks,
        "micro_batch": added,
        "micro_batch_tokens": tokens,
        "step_seconds": times,
        "length": m["rollout/response_length_mean"],
    }


def measure(run: str, args) -> dict:
    """One measurement in a fresh process (this script with --one)."""
    cmd = [sys.executable, __file__, "--one", run, "--prompts", str(args.prompts), "--group", str(args.group)]
    cmd += ["--new-tokens", str(args.new_tokens), "--steps", str(args.steps), "--threads", str(args.threads or 1)]
    cmd += ["--rank", str(args.rank)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(f"{run} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(run: str, r: dict) -> str:
    p, base = r["peaks"], r["peaks"]["baseline"]
    peak = max(p[k] for k in ("build", "rollout", "update", "sync", "step"))
    model, precision, *lora = run.split(":")
    budget = None if lora else 20 * r["params"] + r["micro_batch"]
    within = "-" if budget is None else f"{(peak - base) / budget:.2f}"
    return (
        f"| {Path(model).name} | {precision} | {'LoRA' if lora else 'full'} | {r['params'] / 1e6:.1f}M "
        f"({r['trained'] / 1e6:.2f}M trained) | {peak / GIB:.2f} | {base / GIB:.2f} | "
        f"{(peak - base) / r['params']:.1f} | "
        + " | ".join(f"{(p.get(k, base) - base) / r['params']:.1f}" for k in ("build", "rollout", "update", "sync"))
        + f" | {r['micro_batch'] / GIB:.2f} ({r['micro_batch_tokens']} tokens) | {within} | "
        f"{sorted(r['step_seconds'])[len(r['step_seconds']) // 2]:.0f} |"
    )


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--runs", type=listed(), default=["smollm2-135m-instruct:fp32", "smollm2-135m-instruct:fp16"])
    ap.add_argument("--prompts", type=count, default=4)
    ap.add_argument("--group", type=count, default=4)
    ap.add_argument("--new-tokens", type=count, default=128)
    ap.add_argument("--steps", type=count, default=2)
    ap.add_argument("--rank", type=count, default=16, help="LoRA rank (alpha twice it)")
    ap.add_argument("--one", default=None, help=argparse_hidden())
    args = parse_bench_args(ap, {"runs": ["smollm2-135m-instruct:fp16"], "new_tokens": 16, "steps": 1})
    if args.one:
        args.threads, args.warmup = args.threads or 1, 0
        print(json.dumps(one(args)))
        return
    machine = machine_description()
    lines = [
        "| model | precision | fine-tuning | parameters | peak GiB | baseline GiB | bytes/param | build | rollout | "
        "update | sync | one micro-batch's activations and logits, GiB | peak / (20 B/param + micro-batch) | "
        "s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary = []
    for run in args.runs:
        r = measure(run, args)
        lines.append(row(run, r))
        p = r["peaks"]
        peak = max(p[k] for k in ("build", "rollout", "update", "sync", "step"))
        summary.append(
            f"{Path(run.split(':')[0]).name}_{'_'.join(run.split(':')[1:])}_bytes_per_param="
            f"{(peak - p['baseline']) / r['params']:.1f}"
        )
        print(lines[-1], flush=True)
    intro = [
        f"Command: `python bench/step_memory.py --runs {','.join(args.runs)} --prompts {args.prompts} --group "
        f"{args.group} --new-tokens {args.new_tokens} --steps {args.steps}` (one thread, model.matmul=auto, "
        "model.gemm=auto; each run in a process of its own).",
        "",
        f"`unison train`'s step, {args.prompts} questions x {args.group} samples of at most {args.new_tokens} tokens, "
        f"{args.steps} steps. bytes/param: (peak - baseline) / parameters; build, rollout, update, sync: each part's "
        "peak in bytes per parameter over the baseline (the process after its imports).",
        "",
    ]
    write_section(args.doc, "step-memory", "Peak memory of an RL step", intro + lines, machine)
    print("RESULT " + " ".join(summary))


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
