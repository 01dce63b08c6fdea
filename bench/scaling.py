"""How the RL step time grows with model size and response length, against this machine's floor.

For each model (the built-in 0.8M model, and random Qwen2 models of about 30M and 120M parameters with the built-in
tokenizer) and each response length, one step of the work an RL step does: the native engine samples `--batch`
responses of exactly N tokens (no stop token), then the learner runs one optimizer step over them (forward,
backward, update) — recompute and update share the same kernels, so one update stands for both.

The floor of each figure is its matrix-product FLOPs over the matrix-product rate measured on this machine in the
same precision and mode (`F.linear` on a [4096, hidden] x [hidden, 4 hidden] product, the learner's typical
shape): sampling 2 x (non-embedding parameters + LM head) per token plus attention 4 x layers x hidden x context;
an update three times the forward. `efficiency` = floor / measured.

    python bench/scaling.py [--models builtin,30m,120m] [--lengths 64,256] [--batch 16] [--precisions fp32,bf16]
    python bench/scaling.py --quick        # built-in and 30m models, 64 tokens, fp32

Writes its table into docs/benchmarks.md (section `scaling`; a --quick run prints it instead), keeping the rows of
earlier runs it did not redo (bench/results/scaling.json), and ends with a line `RESULT ...`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_models import NAMES  # noqa: E402
from bench_models import build as build_model  # noqa: E402
from docsection import bench_parser, count, joined, listed, machine_description, parse_bench_args, write_section  # noqa: E402
from flops import forward_flops, sampling_flops  # noqa: E402
from flops import matmul_rate as cpu_matmul_rate  # noqa: E402

from unison.precision import parse_precision  # noqa: E402

SHORT = ["fp32", "fp16", "bf16"]


def build(name: str):
    return build_model(name) if name == "builtin" else build_model(name, max_position_embeddings=2048)


def matmul_rate(hidden: int, precision: str) -> float:
    """FLOP/s of the CPU's matrix products as the engines run them in `precision` (fp16/bf16 in fp32-accumulate mode
    share the fp32 figure)."""
    from unison.matmul import compute_dtype, matmul_mode

    dtype = parse_precision(precision)
    cpu = torch.device("cpu")
    return cpu_matmul_rate(cpu, compute_dtype(matmul_mode("auto", cpu, dtype), dtype), hidden)


def flops(model, batch: int, prompt: int, new: int) -> tuple[float, float]:
    """Matrix-product FLOPs of sampling `new` tokens for `batch` rows, and of one update over the sequences (three
    forwards: the backward costs two)."""
    return sampling_flops(model, batch, prompt, new), 3 * forward_flops(model, batch, prompt + new, new)


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--models", type=listed(NAMES), default=["builtin", "30m", "120m"])
    ap.add_argument("--lengths", type=listed(kind=count), default=[64, 256])
    ap.add_argument("--batch", type=count, default=16)
    ap.add_argument("--precisions", type=listed(SHORT), default=["fp32", "bf16"])
    args = parse_bench_args(ap, {"models": ["builtin", "30m"], "lengths": [64], "precisions": ["fp32"]})
    from learner import step

    from unison.config import OptimConfig
    from unison.learner import Learner
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    machine = machine_description()
    store = ROOT / "bench" / "results" / "scaling.json"  # rows of every run, so a rerun of some rows keeps the rest
    kept = json.loads(store.read_text()) if store.exists() and not args.quick else []
    rows = []
    prompt = 8
    for precision in args.precisions:
        dtype = parse_precision(precision)
        for name in args.models:
            model = build(name)
            params = sum(p.numel() for p in model.parameters())
            rate = matmul_rate(model.config.hidden_size, precision)
            engine = NativeEngine(build(name), dtype=dtype, device="cpu")
            learner = Learner(model, PrecisionPolicy(dtype, dtype), optim=OptimConfig(lr=1e-6))
            prompts = [[5 + (7 * i + j) % 250 for j in range(prompt)] for i in range(args.batch)]
            engine.generate(prompts[:2], SamplingParams(max_new_tokens=4, stop_token_ids=[]))  # warm-up
            for new in args.lengths:
                t0 = time.perf_counter()
                r = engine.generate(prompts, SamplingParams(max_new_tokens=new, stop_token_ids=[]))
                t_sample = time.perf_counter() - t0
                t0 = time.perf_counter()
                step(learner, r, micro=args.batch)
                t_update = time.perf_counter() - t0
                f_sample, f_update = flops(model, args.batch, prompt, new)
                row = dict(
                    precision=precision,
                    model=name,
                    params=params,
                    new=new,
                    rate=rate,
                    t_sample=t_sample,
                    t_update=t_update,
                    floor_sample=f_sample / rate,
                    floor_update=f_update / rate,
                )
                rows.append(row)
                print(
                    f"{precision} {name} ({params / 1e6:.1f}M) {new} tokens: sample {t_sample:.2f}s "
                    f"(floor {row['floor_sample']:.2f}s), update {t_update:.2f}s (floor {row['floor_update']:.2f}s), "
                    f"matmul rate {rate / 1e9:.0f} GFLOP/s",
                    flush=True,
                )
    done = {(w["precision"], w["model"], w["new"]) for w in rows}
    rows = [w for w in kept if (w["precision"], w["model"], w["new"]) not in done] + rows
    order = {p: i for i, p in enumerate(SHORT)}
    rows.sort(key=lambda w: (order[w["precision"]], w["params"], w["new"]))
    if not args.quick:
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(rows, indent=1))
    lines = [
        f"Command: `python bench/scaling.py --models {joined(args.models)} --lengths {joined(args.lengths)} "
        f"--batch {args.batch} --precisions {joined(args.precisions)}"
        f"{f' --threads {args.threads}' if args.threads else ''}` "
        f"(PyTorch threads: {torch.get_num_threads()}).",
        "",
        f"{args.batch} sequences, {prompt}-token prompts, N new tokens each; step = sampling + one update. Floor = "
        "matrix-product FLOPs / the measured matrix-product rate in that precision (fp16/bf16 run fp32-accumulate "
        "here, so their rate is the fp32 rate); efficiency = floor / measured. Rows this command did not redo are "
        "kept from earlier runs of the script (bench/results/scaling.json), each with the rate measured in its run.",
        "",
        "| precision | model | parameters | N | matmul GFLOP/s | sample s | sample floor s | update s | update floor s "
        "| step s | step efficiency |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in rows:
        step_s = w["t_sample"] + w["t_update"]
        eff = (w["floor_sample"] + w["floor_update"]) / step_s
        lines.append(
            f"| {w['precision']} | {w['model']} | {w['params'] / 1e6:.1f}M | {w['new']} | {w['rate'] / 1e9:.0f} | "
            f"{w['t_sample']:.2f} | {w['floor_sample']:.2f} | {w['t_update']:.2f} | {w['floor_update']:.2f} | "
            f"{step_s:.2f} | {eff:.0%} |"
        )
    write_section(args.doc, "scaling", "Scaling with model size and response length", lines, machine)
    print(
        "RESULT "
        + " ".join(
            f"{w['precision']}_{w['model']}_{w['new']}_step_s={w['t_sample'] + w['t_update']:.3f} "
            f"{w['precision']}_{w['model']}_{w['new']}_efficiency="
            f"{(w['floor_sample'] + w['floor_update']) / (w['t_sample'] + w['t_update']):.3f}"
            for w in rows
        )
    )


if __name__ == "__main__":
    main()
