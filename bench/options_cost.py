"""What the options around the loop cost: a KL penalty to the starting policy (a reference forward per micro-batch in
the loss, a reference recompute of the batch in the reward), gradient checkpointing, and the engine self-test at
start-up (with the bands it uses and the mismatch that set them).

    python bench/options_cost.py [--model 30m] [--batch 16] [--response 128] [--repeats 4]
    python bench/options_cost.py --quick

On `--model` (a random Qwen2 of `bench/bench_models.py`; fp32), one optimizer step over `--batch` rows of an
8-token prompt and a `--response`-token response (random tokens) through `backward_and_step`, the variants taking
turns after a warm-up: plain; with the KL penalty in the loss (the reference model's log-probs of each micro-batch,
no gradient); with gradient checkpointing. Then `Learner.recompute` of the batch (what the KL in the reward adds, on
the reference model), and `unison.conformance.self_test` on the built-in model for each precision. Writes the
section `options-<model>` of docs/benchmarks.md.
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
from learner import rollouts  # noqa: E402


def step(learner, ro, reference=None) -> None:
    from unison.algorithms import kl_penalty
    from unison.precision import backward_and_step

    def losses():
        batch = learner.batch(ro)
        logp = learner.logprobs(batch)
        loss = -(logp * ro.mask).sum() / ro.mask.sum()
        if reference is not None:
            with torch.no_grad():
                ref = reference.logprobs(batch)
            loss = loss + 0.01 * kl_penalty("k3", logp, ref, ro.mask).sum() / ro.mask.sum()
        yield loss

    backward_and_step(losses(), learner.weights, learner.optimizer, learner.scaler, learner.max_grad_norm)


def main() -> int:
    from unison.config import ModelConfig
    from unison.conformance import SELF_TEST_BANDS, self_test
    from unison.learner import Learner, frozen_copy
    from unison.precision import PrecisionPolicy, precision_name
    from unison.rollout.native import NativeEngine

    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--model", default="30m", choices=NAMES)
    ap.add_argument("--batch", type=count, default=16)
    ap.add_argument("--response", type=count, default=128)
    ap.add_argument("--repeats", type=count, default=4)
    args = parse_bench_args(ap, {"model": "builtin", "batch": 8, "response": 32, "repeats": 2})
    fp32 = PrecisionPolicy(torch.float32, torch.float32)
    ro = rollouts(args.batch, 8, args.response)
    kl_model = build(args.model)
    reference = frozen_copy(kl_model, fp32)
    variants = {
        "plain": Learner(build(args.model), fp32),
        "KL in the loss": Learner(kl_model, fp32),
        "gradient checkpointing": Learner(build(args.model), fp32, model_cfg=ModelConfig(gradient_checkpointing=True)),
    }
    refs = {"KL in the loss": reference}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, learner in variants.items():  # warm-up
        step(learner, ro, refs.get(name))
    for _ in range(args.repeats):
        for name, learner in variants.items():
            times[name].append(timed(lambda learner=learner, name=name: step(learner, ro, refs.get(name))))
    base = variants["KL in the loss"]
    recompute = [timed(lambda: base.recompute(ro, policy=reference)) for _ in range(args.repeats)]
    med = {name: statistics.median(t) for name, t in times.items()}
    tokens = args.batch * (8 + args.response)
    lines = [
        f"`python bench/options_cost.py --model {args.model} --batch {args.batch} --response {args.response}` "
        f"(fp32, {args.batch} rows x {8 + args.response} tokens, medians of {args.repeats} rounds taking "
        f"turns; torch threads {torch.get_num_threads()}).",
        "",
        "| variant | optimizer step | against plain |",
        "| --- | --- | --- |",
    ]
    for name, t in med.items():
        lines.append(f"| {name} | {t:.3f} s ({tokens / t:,.0f} tok/s) | {t / med['plain']:.2f}x |")
    lines.append(
        f"| KL in the reward: the reference recompute of the batch, once a step | "
        f"{statistics.median(recompute):.3f} s | "
        f"+{statistics.median(recompute) / med['plain']:.2f} of a plain step |"
    )
    lines += [
        "",
        "The engine self-test on the built-in model (8 prompts x 16 tokens, before the first step):",
        "",
        "| rollout / train | mean \\|log pi - log mu\\| | band | time |",
        "| --- | --- | --- | --- |",
    ]
    from unison.models import build_tokenizer

    tok = build_tokenizer()
    prompts = [tok(f"{100 + i}-{3 + i}:").input_ids for i in range(8)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        engine = NativeEngine.from_pretrained("builtin", dtype, "cpu", seed=0)
        learner = Learner.from_pretrained("builtin", PrecisionPolicy(dtype, dtype), "cpu")
        r = self_test(engine, learner, prompts)
        name = precision_name(dtype)
        lines.append(
            f"| {name} / {name} | {r['self_test/abs_log_ratio_mean']:.2e} | {SELF_TEST_BANDS[dtype]:g} | "
            f"{r['self_test/seconds']:.2f} s |"
        )
    write_section(
        args.doc,
        f"options-{args.model}",
        f"What the options around the loop cost ({args.model} model)",
        lines,
        machine_description(),
    )
    print(
        f"RESULT kl_loss={med['KL in the loss'] / med['plain']:.3f} checkpointing="
        f"{med['gradient checkpointing'] / med['plain']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
