"""Learner throughput per precision, and what fp16 loss scaling costs.

On the built-in model (or `--model 30m`: a random Qwen2 of 30M parameters), with `--batch` sequences of a
`--prompt`-token prompt and a `--response`-token response (random tokens, no padding), it measures

    recompute   tokens/s of `Learner.recompute` (forward without gradient, log-probs of the response tokens)
    step        tokens/s of one optimizer step: forward and backward of a token-mean policy-gradient loss through
                `backward_and_step` (fp32 master weights, gradient clipping, AdamW), then the copy back into the
                train-dtype model
    fp16 scaler the same fp16 step with the dynamic loss scaler (scale, unscale, inf/NaN check) against the same step
                with loss scaling turned off; and against the bf16 step
    shared      with `--group G`, each prompt given to G rows in a row (an RL step's groups): the fp32 learner that
                runs each distinct prompt once (`optim.share_prompts`, the default) against one that runs every
                row's prompt (`fp32 prompt per row`)

Variants take turns (`--repeats` rounds, after a warm-up); the table gives medians.

    python bench/learner.py [--model builtin|30m] [--batch 32] [--prompt 8] [--response 120] [--repeats 5]
    python bench/learner.py --quick     # batch 8, 2 rounds
    python bench/learner.py --batch 64 --group 8 --prompt 256 --response 256   # groups of long prompts

Writes its table into docs/benchmarks.md (section `learner-<model>`, `learner-<model>-g<G>` with `--group`; a
--quick run prints it instead) and ends with
a line `RESULT fp16_scaler_overhead=<fraction> ...`.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_models import NAMES, build  # noqa: E402
from docsection import bench_parser, count, machine_description, parse_bench_args, write_section  # noqa: E402
from flops import timed  # noqa: E402


def rollouts(batch: int, prompt: int, response: int, seed: int = 0, group: int = 1):
    """`batch` rows of random tokens, a `prompt`-token prompt (each one given to `group` rows in a row) and a
    `response`-token response."""
    from unison.rollout.base import Rollouts

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 261, (batch, prompt + response), generator=g)
    ids[:, :prompt] = ids[torch.arange(batch) // group * group, :prompt]
    return Rollouts(
        prompt_ids=[row[:prompt].tolist() for row in ids],
        response_ids=ids[:, prompt:].clone(),
        logprobs=torch.zeros(batch, response),
        mask=torch.ones(batch, response, dtype=torch.bool),
        lengths=torch.full((batch,), response),
        finished=torch.ones(batch, dtype=torch.bool),
    )


def learner_of(name: str, precision: str, scaling: bool | None = None, share_prompts: bool = True):
    from unison.config import OptimConfig, PrecisionConfig
    from unison.learner import Learner
    from unison.precision import PrecisionPolicy

    scaling = "auto" if scaling is None else ("on" if scaling else "off")
    return Learner(
        build(name),
        PrecisionPolicy.from_names(precision, precision),
        precision=PrecisionConfig(loss_scaling=scaling),
        optim=OptimConfig(lr=1e-6, share_prompts=share_prompts),
    )


def step(learner, r, micro: int) -> None:
    total = int(r.mask.sum())

    learner.update(r, torch.arange(len(r)), lambda mb: -(mb.logp * mb.batch.mask).sum() / total, micro)


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin", choices=NAMES)
    ap.add_argument("--batch", type=count, default=32)
    ap.add_argument("--prompt", type=count, default=8)
    ap.add_argument("--response", type=count, default=120)
    ap.add_argument("--micro", type=count, default=32, help="sequences per forward/backward")
    ap.add_argument("--repeats", type=count, default=5)
    ap.add_argument("--group", type=count, default=1, help="rows given each prompt, in a row (an RL step's group)")
    args = parse_bench_args(ap, {"batch": 8, "repeats": 2})
    machine = machine_description()
    r = rollouts(args.batch, args.prompt, args.response, group=args.group)
    tokens = int(r.mask.sum())
    variants = {
        "fp32": learner_of(args.model, "fp32"),
        "bf16": learner_of(args.model, "bf16"),
        "fp16": learner_of(args.model, "fp16"),
        "fp16 no scaler": learner_of(args.model, "fp16", scaling=False),
    }
    if args.group > 1:
        variants["fp32 prompt per row"] = learner_of(args.model, "fp32", share_prompts=False)
    rec = {k: [] for k in ("fp32", "bf16", "fp16")}
    stp = {k: [] for k in variants}
    for learner in variants.values():  # warm-up, long enough for the fp16 scaler to settle below any overflow
        learner.recompute(r, args.micro)
        for _ in range(3):
            step(learner, r, args.micro)
    skipped_before = {k: v.scaler.skipped_steps for k, v in variants.items()}
    for _ in range(args.repeats):
        for name, learner in variants.items():
            if name in rec:
                rec[name].append(tokens / timed(lambda learner=learner: learner.recompute(r, args.micro)))
            stp[name].append(tokens / timed(lambda learner=learner: step(learner, r, args.micro)))
    med = {k: statistics.median(v) for k, v in stp.items()}
    skipped = sum(v.scaler.skipped_steps - skipped_before[k] for k, v in variants.items())
    # per-round ratios of step times (fp16 with scaler over fp16 without), median over rounds
    overhead = statistics.median(b / a - 1 for a, b in zip(stp["fp16"], stp["fp16 no scaler"]))
    vs_bf16 = statistics.median(b / a - 1 for a, b in zip(stp["fp16"], stp["bf16"]))
    params = sum(p.numel() for p in variants["fp32"].model.parameters())
    group = ""
    if args.group > 1:
        shared = statistics.median(a / b for a, b in zip(stp["fp32"], stp["fp32 prompt per row"]))  # tok/s
        group = (
            f" Each prompt is given to {args.group} rows in a row; running each distinct prompt once (and cutting "
            "micro-batches without the token budget where that saves a fifth of the tokens) makes the fp32 step "
            f"{shared:.2f}x as fast as running every row's prompt (median of the per-round ratios)."
        )
    scalers = {k: v.scaler.scale if v.scaler.enabled else None for k, v in variants.items()}
    lines = [
        f"Command: `python bench/learner.py --model {args.model} --batch {args.batch} --prompt {args.prompt} "
        f"--response {args.response} --micro {args.micro} --repeats {args.repeats}"
        f"{f' --group {args.group}' if args.group > 1 else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}` (PyTorch threads: {torch.get_num_threads()}).",
        "",
        f"Model `{args.model}` ({params / 1e6:.1f}M parameters), {args.batch} sequences of {args.prompt} + "
        f"{args.response} tokens ({tokens} response tokens), micro-batches of at most {args.micro} rows and "
        f"{variants['fp32'].micro_batch_tokens} padded tokens (the learner's default budget here); median of "
        f"{args.repeats} rounds, variants taking turns. fp16/bf16 use `model.matmul=auto` (here: fp32-accumulate)."
        f"{group}",
        "",
        "| precision | recompute tok/s | step tok/s (forward + backward + update) |",
        "| --- | --- | --- |",
    ]
    for name in variants:
        recompute = (
            f"{statistics.median(rec[name]):.0f}" if name in rec else "(same as fp16)" if "fp16" in name else "-"
        )
        lines.append(f"| {name} | {recompute} | {med[name]:.0f} |")
    lines += [
        "",
        f"fp16 loss scaling adds {overhead * 100:+.1f}% to a step over the same fp16 step without a scaler (median of "
        f"the per-round ratios; scale {scalers['fp16']:g} after the warm-up's overflow skips, {skipped} steps "
        f"skipped in the timed rounds); the fp16 step with the scaler takes {vs_bf16 * 100:+.1f}% against the bf16 "
        "step.",
    ]
    section = f"learner-{args.model}" + (f"-g{args.group}" if args.group > 1 else "")
    title = f"Learner throughput ({args.model} model" + (f", groups of {args.group}" if args.group > 1 else "") + ")"
    write_section(args.doc, section, title, lines, machine)
    if args.doc:  # (without a document, write_section printed the table)
        print("\n".join(lines))
    print(
        f"RESULT fp16_scaler_overhead={overhead:.4f} fp16_vs_bf16={vs_bf16:.4f} "
        + " ".join(f"step_{k.replace(' ', '_')}_tok_s={v:.0f}" for k, v in med.items())
        + " "
        + " ".join(f"recompute_{k}_tok_s={statistics.median(v):.0f}" for k, v in rec.items())
    )


if __name__ == "__main__":
    main()
