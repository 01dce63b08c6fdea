"""Rollout throughput: unison's native engine against Hugging Face `generate()` and vLLM, on the built-in model.

For each precision, batch size and number of new tokens, every engine samples `batch` prompts x `new` tokens at
temperature 1 (no top-k/top-p, no stop token, so every row makes exactly `new` tokens) from the built-in model.
Engines run in turn (native, generate, vLLM, native, generate, vLLM, ... `--repeats` rounds) after one warm-up
call each; the table gives the median tokens/s and the ratios of the native engine to the others.

    generate  `transformers` `model.generate(do_sample=True)` on the model cast to the precision (PyTorch's own
              fp16/bf16 kernels), static settings as above
    vllm      unison's vLLM engine (vLLM's offline LLM in-process); skipped with a note where vLLM is not installed
              (scripts/install-vllm.sh)
    native    unison's engine (`model.matmul=auto`: on CPUs without fast fp16/bf16 units, fp16/bf16 operands are
              multiplied in fp32 and rounded back, see unison.matmul.set_matmul)

    python bench/rollout_throughput.py [--precisions fp32,fp16,bf16] [--batches 16,64] [--new 128,512] [--repeats 2]
    python bench/rollout_throughput.py --group 8 --prompt-tokens 256   # GRPO-style: 8 samples of each long prompt
    python bench/rollout_throughput.py --quick   # fp32, batch 16 x 128 new tokens, one round

By default every row has its own prompt from the built-in task (5-6 tokens); `--group G` gives each prompt to G rows
in a row (as an RL step samples a group), and `--prompt-tokens N` makes the prompts N random tokens long, where
sharing a prompt's prefill between its rows (the native engine does) starts to count.

Writes its table into docs/benchmarks.md (section `rollout`, or `rollout-g<G>-p<N>` with those options; a --quick
run prints it instead) and ends with a line
`RESULT native_vs_generate=<median ratio> native_vs_vllm=<median ratio> ...`.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from docsection import bench_parser, count, joined, listed, machine_description, parse_bench_args, whole, write_section  # noqa: E402

from unison.precision import parse_precision  # noqa: E402

# questions for a real model's chat template (`--model` other than builtin)
QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What is the largest planet in our solar system?",
    "Who wrote Romeo and Juliet?",
    "Why is the sky blue?",
    "What do bees make?",
    "Which planet is known as the red planet?",
    "What is the boiling point of water in Celsius?",
]


def prompts(n: int, group: int = 1, tokens: int = 0, model: str = "builtin") -> list[list[int]]:
    """n prompts, each distinct one given to `group` rows in a row: the built-in task's test prompts (a real model:
    short questions through its chat template), or (with `tokens`) that many random tokens of the built-in
    vocabulary."""
    from unison.models import load_tokenizer, resolve_model_dir
    from unison.tasks import load_task
    from unison.tasks.base import Example
    from unison.tasks.templates import encode_prompt

    distinct = -(-n // group)
    tok = load_tokenizer(resolve_model_dir(model))
    if tokens:
        g = torch.Generator().manual_seed(0)
        base = [torch.randint(5, 261, (tokens,), generator=g).tolist() for _ in range(distinct)]
    elif model != "builtin":
        questions = [Example(QUESTIONS[i % len(QUESTIONS)], "") for i in range(distinct)]
        base = [encode_prompt(tok, e, "chat") for e in questions]
    else:
        examples = load_task("builtin").examples("test", n=distinct, seed=0)
        base = [tok(e.prompt, add_special_tokens=False).input_ids for e in examples]
    return [p for p in base for _ in range(group)][:n]


class Generate:
    """Hugging Face generate() on the model cast to the precision."""

    def __init__(self, model, dtype: torch.dtype):
        self.model = copy.deepcopy(model).to(dtype).eval()

    def __call__(self, batch: list[list[int]], new: int) -> int:
        P = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), P, dtype=torch.long)
        attn = torch.zeros(len(batch), P, dtype=torch.long)
        for i, p in enumerate(batch):  # left padding, as generation needs
            ids[i, P - len(p) :] = torch.tensor(p)
            attn[i, P - len(p) :] = 1
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
            )
        return (out.shape[1] - P) * len(batch)


class Unison:
    """unison's native or vLLM engine."""

    def __init__(self, name: str, model_dir: Path, dtype: torch.dtype):
        from unison.rollout import make_engine

        self.engine = make_engine(name, model_dir, dtype=dtype, device="cpu", seed=0)

    def __call__(self, batch: list[list[int]], new: int) -> int:
        from unison.rollout.base import SamplingParams

        out = self.engine.generate(batch, SamplingParams(max_new_tokens=new, temperature=1.0, stop_token_ids=[]))
        return int(out.lengths.sum())

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()


def measure(args, engines: list[str], model_dir: Path) -> tuple[dict, dict]:
    """Every engine on every (precision, batch, new tokens), taking turns. -> ({key: {engine: [tok/s]}},
    {key: {engine: [tokens per CPU second]}})"""
    from unison.models import load_model

    base = load_model(model_dir, device="cpu", dtype=torch.float32)
    all_prompts = prompts(max(args.batches), args.group, args.prompt_tokens, args.model)
    results, cpu = {}, {}
    threads = torch.get_num_threads()
    for pname in args.precisions:
        dtype = parse_precision(pname)
        runners = {e: Generate(base, dtype) if e == "generate" else Unison(e, model_dir, dtype) for e in engines}
        torch.set_num_threads(threads)  # an engine's start-up may change it
        for runner in runners.values():
            runner(all_prompts[:2], 4)  # warm-up
        for B in args.batches:
            for new in args.new:
                key = (pname, B, new)
                results[key], cpu[key] = {e: [] for e in engines}, {e: [] for e in engines}
                for _ in range(args.repeats):
                    for e, runner in runners.items():
                        t0, c0 = time.perf_counter(), time.process_time()
                        tokens = runner(all_prompts[:B], new)
                        results[key][e].append(tokens / (time.perf_counter() - t0))
                        cpu[key][e].append(tokens / (time.process_time() - c0))
                line = ", ".join(
                    f"{e} {statistics.median(v):.0f} ({statistics.median(cpu[key][e]):.0f} per CPU second)"
                    for e, v in results[key].items()
                )
                print(f"{pname} batch {B} x {new} new tokens: {line} tok/s", flush=True)
        for runner in runners.values():
            if hasattr(runner, "close"):
                runner.close()
    return results, cpu


def describe(args) -> tuple[str, str, str, str]:
    """(section, title, the command's options beyond the lists, what the prompts are)"""
    shape = (f" --group {args.group}" if args.group > 1 else "") + (
        f" --prompt-tokens {args.prompt_tokens}" if args.prompt_tokens else ""
    )
    section, title = "rollout", "Rollout throughput: native engine, generate() and vLLM"
    real = args.model != "builtin"
    task_prompts = "short questions through its chat template" if real else "the task's prompts"
    prompt_text = (f"{args.prompt_tokens}-token random prompts" if args.prompt_tokens else task_prompts) + (
        f", each given to {args.group} rows" if args.group > 1 else ", one per row"
    )
    if shape:
        section = f"rollout-g{args.group}-p{args.prompt_tokens}"
        title += f" ({prompt_text})"
    if real:
        shape += f" --model {args.model}"
        section, title = f"{section}-{Path(args.model).name}", f"{title} on {Path(args.model).name}"
    return section, title, shape, prompt_text


def table(args, results: dict, cpu: dict, engines: list[str]) -> tuple[list[str], dict]:
    """The section's lines and the native engine's ratios to the others (by wall-clock tokens/s)."""
    from unison.matmul import gemm_kernel, matmul_mode

    _, _, shape, prompt_text = describe(args)
    what = f"Model {args.model}" if args.model != "builtin" else "Built-in model"
    modes = ", ".join(
        f"{p} {matmul_mode('auto', torch.device('cpu'), parse_precision(p))}" for p in args.precisions if p != "fp32"
    )
    ratios = {o: [] for o in engines if o != "native"}
    lines = [
        f"Command: `python bench/rollout_throughput.py --precisions {joined(args.precisions)} --batches "
        f"{joined(args.batches)} --new {joined(args.new)} --repeats {args.repeats}{shape}"
        f"{f' --threads {args.threads}' if args.threads else ''}` (PyTorch threads: {torch.get_num_threads()}).",
        "",
        f"{what}, {prompt_text}, temperature 1, no stop token (every row makes all its new tokens); median "
        f"tokens/s of {args.repeats} rounds, engines taking turns (in brackets: tokens per CPU second of the "
        f"process). The native engine's products: model.matmul=auto ({modes or 'fp32 only'}), model.gemm=auto "
        f"({gemm_kernel('auto', 'cpu')}); generate() and vLLM use their own kernels.",
        "",
        "| precision | batch | new tokens | "
        + " | ".join(f"{e} tok/s" for e in engines)
        + "".join(f" | native / {o}" for o in ratios)
        + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in engines) + "".join(" | ---" for _ in ratios) + " |",
    ]
    for (pname, B, new), per in results.items():
        med = {e: statistics.median(v) for e, v in per.items()}
        cells = [f"{med[e]:.0f} ({statistics.median(cpu[(pname, B, new)][e]):.0f})" for e in engines]
        for o in ratios:
            ratios[o].append(med["native"] / med[o])
            cells.append(f"{med['native'] / med[o]:.2f}")
        lines.append(f"| {pname} | {B} | {new} | " + " | ".join(cells) + " |")
    summary = ", ".join(
        f"native / {o}: median {statistics.median(v):.2f} (range {min(v):.2f}-{max(v):.2f})" for o, v in ratios.items()
    )
    return [*lines, "", f"Over all rows: {summary}."], ratios


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--precisions", type=listed(["fp32", "fp16", "bf16"]), default=["fp32", "fp16", "bf16"])
    ap.add_argument("--batches", type=listed(kind=count), default=[16, 64])
    ap.add_argument("--new", type=listed(kind=count), default=[128, 512])
    ap.add_argument("--repeats", type=count, default=2)
    ap.add_argument("--engines", type=listed(["native", "generate", "vllm"]), default=["native", "generate", "vllm"])
    ap.add_argument("--group", type=count, default=1, help="rows given each prompt, in a row (an RL step's group)")
    ap.add_argument("--prompt-tokens", type=whole, default=0, help="random prompts of this many tokens (0: the task's)")
    ap.add_argument("--model", default="builtin", help="builtin, or a real model (smollm2-135m-instruct, a folder)")
    args = parse_bench_args(ap, {"precisions": ["fp32"], "batches": [16], "new": [128], "repeats": 1})
    from unison.models import resolve_model_dir

    engines = list(args.engines)
    if "vllm" in engines:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vLLM is not installed (bash scripts/install-vllm.sh): measuring without it", flush=True)
            engines.remove("vllm")
    machine = machine_description()
    results, cpu = measure(args, engines, resolve_model_dir(args.model))
    lines, ratios = table(args, results, cpu, engines)
    section, title, _, _ = describe(args)
    write_section(args.doc, section, title, lines, machine)
    print(
        "RESULT "
        + " ".join(f"native_vs_{o}={statistics.median(v):.2f}" for o, v in ratios.items())
        + " "
        + " ".join(
            f"{p}_{B}x{n}_{e}={statistics.median(v):.0f}" for (p, B, n), per in results.items() for e, v in per.items()
        )
    )


if __name__ == "__main__":
    main()
