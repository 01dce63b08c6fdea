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


def prompts(n: int, group: int = 1, tokens: int = 0) -> list[list[int]]:
    """n prompts, each distinct one given to `group` rows in a row: the built-in task's test prompts, or (with
    `tokens`) that many random tokens of the built-in vocabulary."""
    from unison.models import load_tokenizer, resolve_model_dir
    from unison.tasks import load_task

    distinct = -(-n // group)
    if tokens:
        g = torch.Generator().manual_seed(0)
        base = [torch.randint(5, 261, (tokens,), generator=g).tolist() for _ in range(distinct)]
    else:
        tok = load_tokenizer(resolve_model_dir("builtin"))
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


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--precisions", type=listed(["fp32", "fp16", "bf16"]), default=["fp32", "fp16", "bf16"])
    ap.add_argument("--batches", type=listed(kind=count), default=[16, 64])
    ap.add_argument("--new", type=listed(kind=count), default=[128, 512])
    ap.add_argument("--repeats", type=count, default=2)
    ap.add_argument("--engines", type=listed(["native", "generate", "vllm"]), default=["native", "generate", "vllm"])
    ap.add_argument("--group", type=count, default=1, help="rows given each prompt, in a row (an RL step's group)")
    ap.add_argument("--prompt-tokens", type=whole, default=0, help="random prompts of this many tokens (0: the task's)")
    args = parse_bench_args(ap, {"precisions": ["fp32"], "batches": [16], "new": [128], "repeats": 1})
    from unison.models import load_model, resolve_model_dir

    engines = list(args.engines)
    if "vllm" in engines:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vLLM is not installed (bash scripts/install-vllm.sh): measuring without it", flush=True)
            engines.remove("vllm")
    machine = machine_description()
    model_dir = resolve_model_dir("builtin")
    base = load_model(model_dir, device="cpu", dtype=torch.float32)
    batches, news = args.batches, args.new
    all_prompts = prompts(max(batches), args.group, args.prompt_tokens)
    results = {}  # (precision, batch, new) -> {engine: [tok/s]}
    threads = torch.get_num_threads()
    for pname in args.precisions:
        dtype = parse_precision(pname)
        runners = {e: Generate(base, dtype) if e == "generate" else Unison(e, model_dir, dtype) for e in engines}
        torch.set_num_threads(threads)  # an engine's start-up may change it
        for runner in runners.values():
            runner(all_prompts[:2], 4)  # warm-up
        for B in batches:
            for new in news:
                key = (pname, B, new)
                results[key] = {e: [] for e in engines}
                for _ in range(args.repeats):
                    for e, runner in runners.items():
                        t0 = time.perf_counter()
                        tokens = runner(all_prompts[:B], new)
                        results[key][e].append(tokens / (time.perf_counter() - t0))
                line = ", ".join(f"{e} {statistics.median(v):.0f}" for e, v in results[key].items())
                print(f"{pname} batch {B} x {new} new tokens: {line} tok/s", flush=True)
        for runner in runners.values():
            if hasattr(runner, "close"):
                runner.close()
    cols = engines
    shape = (f" --group {args.group}" if args.group > 1 else "") + (
        f" --prompt-tokens {args.prompt_tokens}" if args.prompt_tokens else ""
    )
    section, title = "rollout", "Rollout throughput: native engine, generate() and vLLM"
    prompt_text = (f"{args.prompt_tokens}-token random prompts" if args.prompt_tokens else "the task's prompts") + (
        f", each given to {args.group} rows" if args.group > 1 else ", one per row"
    )
    if shape:
        section = f"rollout-g{args.group}-p{args.prompt_tokens}"
        title += f" ({prompt_text})"
    ratios = {o: [] for o in cols if o != "native"}
    lines = [
        f"Command: `python bench/rollout_throughput.py --precisions {joined(args.precisions)} --batches "
        f"{joined(args.batches)} --new {joined(args.new)} --repeats {args.repeats}{shape}"
        f"{f' --threads {args.threads}' if args.threads else ''}` "
        f"(PyTorch threads: {threads}).",
        "",
        f"Built-in model, {prompt_text}, temperature 1, no stop token (every row makes all its new tokens); median "
        f"tokens/s of {args.repeats} rounds, engines taking turns.",
        "",
        "| precision | batch | new tokens | "
        + " | ".join(f"{e} tok/s" for e in cols)
        + "".join(f" | native / {o}" for o in ratios)
        + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in cols) + "".join(" | ---" for _ in ratios) + " |",
    ]
    for (pname, B, new), per in results.items():
        med = {e: statistics.median(v) for e, v in per.items()}
        cells = [f"{med[e]:.0f}" for e in cols]
        for o in ratios:
            ratios[o].append(med["native"] / med[o])
            cells.append(f"{med['native'] / med[o]:.2f}")
        lines.append(f"| {pname} | {B} | {new} | " + " | ".join(cells) + " |")
    summary = ", ".join(
        f"native / {o}: median {statistics.median(v):.2f} (range {min(v):.2f}-{max(v):.2f})" for o, v in ratios.items()
    )
    lines += ["", f"Over all rows: {summary}."]
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
