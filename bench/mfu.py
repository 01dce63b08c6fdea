"""Learner model-FLOPs utilisation (MFU) per precision, against the device's measured matrix-product rate.

On a CUDA GPU (or the CPU with `--device cpu`, or where no GPU is visible), for each precision:

    matmul rate  FLOP/s of one large matrix product in the precision the learner multiplies in (a square 8192
                 product on a GPU; on a CPU the learner's [4096, hidden] x [hidden, 4 hidden] shape, and fp16/bf16
                 in fp32-accumulate mode multiply in fp32), by the library the learner's products use
                 (`model.gemm`: oneDNN where it is the faster, else PyTorch's BLAS)
    recompute    tokens/s and MFU of `Learner.recompute` (forward without gradient, log-probs of the responses)
    step         tokens/s and MFU of one optimizer step: forward and backward of a token-mean policy-gradient loss
                 through `backward_and_step` (fp32 master weights, fp16 loss scaling, clipping, AdamW), then the
                 copy back into the train-dtype model

MFU = model FLOPs / seconds / matmul rate (the best rate measured, before the warm-up and in every round). Model
FLOPs count the matrix products of the model on the tokens it processes (2 x weights per token, attention over the
causal context, the LM head on the response tokens only, as the learner runs it); a step counts three forwards (the
backward costs two). Embedding lookups, norms, the loss and the optimizer are work that MFU does not credit.
Sequences are `--batch` rows of a `--prompt`-token prompt and a `--response`-token response of random tokens; the
default model is `120m` (104M parameters, the built-in tokenizer); `--model smollm2-135m-instruct` a real one.

    python bench/mfu.py [--device auto|cuda|cpu] [--model 120m] [--precisions bf16,fp16,fp32] [--repeats 5]
    python bench/mfu.py --quick       # the built-in model, 8 rows of 8 + 56 tokens, 2 rounds

Writes its table into docs/benchmarks.md (section `mfu-<device>`; a --quick run prints it instead) and ends with a
line `RESULT step_mfu_<precision>=... ...`.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_models import NAMES, build  # noqa: E402
from docsection import bench_parser, count, joined, listed, machine_description, parse_bench_args, write_section  # noqa: E402
from flops import forward_flops, matmul_rate, timed, use_cpu_clock  # noqa: E402
from learner import rollouts, step  # noqa: E402

REAL = ["smollm2-135m-instruct"]  # trained models, fetched (`unison fetch NAME`)


def checkpoint(name: str):
    """The model `name` (bench_models', or a fetched real one) in fp32."""
    from unison.models import load_model, resolve_model_dir

    return load_model(resolve_model_dir(name)) if name in REAL else build(name)


# rows, prompt and response tokens per device when not given: a GPU wants big batches; on a CPU a 104M-model step
# over 1024 tokens already takes seconds
SHAPES = {"cuda": (64, 64, 448), "cpu": (8, 8, 120)}


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--model", default="120m", choices=[*NAMES, *REAL])
    ap.add_argument("--precisions", type=listed(["fp32", "fp16", "bf16"]), default=["bf16", "fp16", "fp32"])
    ap.add_argument("--batch", type=count, default=None, help="rows (default: 64 on a GPU, 8 on a CPU)")
    ap.add_argument("--prompt", type=count, default=None, help="prompt tokens (default: 64 on a GPU, 8 on a CPU)")
    ap.add_argument(
        "--response", type=count, default=None, help="response tokens (default: 448 on a GPU, 120 on a CPU)"
    )
    ap.add_argument("--micro", type=count, default=None, help="rows per forward/backward (default: all)")
    ap.add_argument("--repeats", type=count, default=5)
    ap.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="time in wall-clock or CPU seconds (a shared CPU)"
    )
    args = parse_bench_args(ap, {"model": "builtin", "batch": 8, "prompt": 8, "response": 56, "repeats": 2})
    from unison.config import OptimConfig
    from unison.errors import UserError
    from unison.learner import Learner
    from unison.matmul import compute_dtype
    from unison.precision import PrecisionPolicy, parse_precision, resolve_device

    machine = machine_description()
    if args.clock == "cpu":
        use_cpu_clock()
    try:
        device = resolve_device(args.device)
    except UserError as exc:
        ap.error(str(exc))  # one line, exit code 2
    rows, prompt, response = (
        given or default for given, default in zip((args.batch, args.prompt, args.response), SHAPES[device.type])
    )
    micro = args.micro or rows
    r = rollouts(rows, prompt, response)
    tokens = rows * response
    learners, modes, computes = {}, {}, {}
    for name in args.precisions:
        dtype = parse_precision(name)
        learner = Learner(checkpoint(args.model).to(device), PrecisionPolicy(dtype, dtype), optim=OptimConfig(lr=1e-6))
        learners[name] = learner
        modes[name] = learner.matmul if learner.gemm == "torch" else f"{learner.matmul}, {learner.gemm}"
        computes[name] = (compute_dtype(learner.matmul, dtype), learner.gemm)
    hidden = next(iter(learners.values())).model.config.hidden_size

    def best_rates(again: bool = False) -> dict:  # the best product rate measured so far, per precision
        return {k: matmul_rate(device, c, hidden, again=again, gemm=g) for k, (c, g) in computes.items()}

    for name, rate in best_rates().items():
        print(f"{name}: {modes[name]} products, measured rate {rate / 1e12:.3f} TFLOP/s", flush=True)

    model = next(iter(learners.values())).model
    params = sum(p.numel() for p in model.parameters())
    forward = forward_flops(model, rows, prompt + response, response)
    for learner in learners.values():  # warm-up: kernels chosen, the fp16 scaler settled below any overflow
        learner.recompute(r, micro)
        for _ in range(3):
            step(learner, r, micro)
    skipped_before = {k: v.scaler.skipped_steps for k, v in learners.items()}
    rec = {k: [] for k in learners}
    stp = {k: [] for k in learners}
    for _ in range(args.repeats):
        best_rates(again=True)  # measured in every round too, so a slow moment at the start does not set the peak
        for name, learner in learners.items():
            rec[name].append(timed(lambda learner=learner: learner.recompute(r, micro), device))
            stp[name].append(timed(lambda learner=learner: step(learner, r, micro), device))
            print(f"{name}: recompute {rec[name][-1]:.3f}s, step {stp[name][-1]:.3f}s", flush=True)
    rates = best_rates()
    t_rec = {k: statistics.median(v) for k, v in rec.items()}
    t_stp = {k: statistics.median(v) for k, v in stp.items()}
    mfu_rec = {k: forward / t_rec[k] / rates[k] for k in learners}
    mfu_stp = {k: 3 * forward / t_stp[k] / rates[k] for k in learners}
    skipped = {k: v.scaler.skipped_steps - skipped_before[k] for k, v in learners.items()}
    memory = ""
    if device.type == "cuda":
        memory = f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    extra = "".join(
        f" --{k} {v}"
        for k, v in (("batch", args.batch), ("prompt", args.prompt), ("response", args.response), ("micro", args.micro))
        if v
    )
    lines = [
        f"Command: `python bench/mfu.py --device {args.device} --model {args.model} --precisions "
        f"{joined(args.precisions)}{extra} --repeats {args.repeats}"
        f"{' --clock cpu' if args.clock == 'cpu' else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}`"
        f" (device {device}{f', PyTorch threads: {torch.get_num_threads()}' if device.type == 'cpu' else ''}).",
        "",
        f"Model `{args.model}` ({params / 1e6:.1f}M parameters), {rows} sequences of {prompt} + {response} tokens "
        f"({tokens} response tokens), micro-batches of {micro} rows; {forward / 1e9:.1f} GFLOP per forward, three "
        f"times that per step; median of {args.repeats} rounds, precisions taking turns{memory}"
        f"{'; every time (products, steps) in CPU seconds of the process' if args.clock == 'cpu' else ''}.",
        "",
        "| precision | products | matmul TFLOP/s | recompute tok/s | recompute MFU | step tok/s | step TFLOP/s "
        "| step MFU | fp16 steps skipped |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k, learner in learners.items():
        lines.append(
            f"| {k} | {modes[k]} | {rates[k] / 1e12:.3f} | {tokens / t_rec[k]:.0f} | {mfu_rec[k]:.1%} | "
            f"{tokens / t_stp[k]:.0f} | {3 * forward / t_stp[k] / 1e12:.3f} | {mfu_stp[k]:.1%} | "
            f"{skipped[k] if learner.scaler.enabled else '-'} |"
        )
    write_section(args.doc, f"mfu-{device.type}", f"Learner MFU ({device.type})", lines, machine)
    if args.doc:  # (without a document, write_section printed the table)
        print("\n".join(lines))
    print(
        "RESULT "
        + " ".join(
            f"step_mfu_{k}={mfu_stp[k]:.4f} recompute_mfu_{k}={mfu_rec[k]:.4f} matmul_tflops_{k}={rates[k] / 1e12:.3f}"
            for k in learners
        )
    )


if __name__ == "__main__":
    main()
