"""MoE decode throughput: the native engine's fast path against its fallback (the model's own forward and cache) on
mixture-of-experts checkpoints.

Each model is a random checkpoint of `unison.archs`: the tiny Qwen2-MoE, Qwen3-MoE and Mixtral (2 layers, hidden 64,
4 experts, top 2) and a 35M Qwen3-MoE (8 layers, hidden 512, 6 experts of 384, top 2; the one of docs/moe.md). Two
engines per model and precision load the same checkpoint, one forced onto the fallback (`forced_fallback`); after
a full-size warm-up call each, they take turns (fast, fallback, then fallback, fast, ... `--repeats` rounds)
sampling `--prompts` prompts x `--group` samples of `--new` tokens (temperature 1, no stop token: every row makes
all its tokens). The table gives the median tokens/s of each path, their ratio, the matmul mode
`model.matmul=auto` resolved to, and the share of each path's time spent inside the MoE blocks (`moe_share`).

    OMP_NUM_THREADS=1 python bench/moe_decode.py [--precisions fp32,bf16] [--models moe35,tiny] [--repeats 5]
    OMP_NUM_THREADS=1 python bench/moe_decode.py --quick   # tiny models, one round, printed

Writes the section `moe-decode` of docs/moe.md (a --quick run prints it instead) and ends with a line
`RESULT <model>_<precision>_fast_vs_fallback=<ratio> ...`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from docsection import bench_parser, count, joined, listed, machine_description, replace_section  # noqa: E402

MODELS = {
    "qwen2-moe": ("qwen2-moe", {}),
    "qwen3-moe": ("qwen3-moe", {}),
    "mixtral": ("mixtral", {}),
    "qwen3-moe-35m": (
        "qwen3-moe",
        dict(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=384,
        ),
    ),
}
GROUPS = {"tiny": ["qwen2-moe", "qwen3-moe", "mixtral"], "moe35": ["qwen3-moe-35m"]}


def prompts(n: int, group: int) -> list[list[int]]:
    """n random prompts of 12-19 byte tokens, each given to `group` rows in a row (an RL step's group)."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randint(5, 261, (12 + i % 8,), generator=g).tolist() for i in range(n)]
    return [p for p in base for _ in range(group)]


def moe_share(engine, batch, params) -> float:
    """The share of one `generate` call's time spent inside the MoE blocks (timed by hooks on them, in a call of
    its own: the hooks' cost stays out of the throughput)."""
    blocks = [layer.mlp for layer in engine.model.model.layers if hasattr(layer.mlp, "experts")]
    spent, start = [0.0], [0.0]

    def before(module, args):
        start[0] = time.perf_counter()

    def after(module, args, out):
        spent[0] += time.perf_counter() - start[0]

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(before), b.register_forward_hook(after))]
    try:
        t0 = time.perf_counter()
        engine.generate(batch, params)
        return spent[0] / (time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    from unison.archs import save_tiny
    from unison.precision import parse_precision
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--precisions", type=listed(["fp32", "fp16", "bf16"]), default=["fp32", "bf16"])
    ap.add_argument("--models", type=listed(sorted(GROUPS)), default=sorted(GROUPS))
    ap.add_argument("--prompts", type=count, default=8)
    ap.add_argument("--group", type=count, default=4)
    ap.add_argument("--new", type=count, default=64)
    ap.add_argument("--repeats", type=count, default=5)
    args = ap.parse_args()
    if args.quick:
        args.models, args.repeats, args.new = ["tiny"], 1, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    machine = machine_description()
    work = Path(tempfile.mkdtemp(prefix="unison-moe-decode-"))
    batch = prompts(args.prompts, args.group)
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, stop_token_ids=())
    rows, results = [], {}
    for name in [m for g in args.models for m in GROUPS[g]]:
        arch, overrides = MODELS[name]
        d = save_tiny(arch, work / name, **overrides)
        for pname in args.precisions:
            dtype = parse_precision(pname)
            engines = {}
            for path in ("fast", "fallback"):
                e = NativeEngine.from_pretrained(d, dtype, "cpu", seed=0)
                e.forced_fallback = "bench: the model's own forward" if path == "fallback" else ""
                assert e.decode_path()[0] == path, e.describe()
                torch.set_num_threads(threads)
                e.generate(batch, params)  # warm-up at full size (kernels are chosen per shape)
                engines[path] = e
            speed = {p: [] for p in engines}
            for r in range(args.repeats):
                for path in ("fast", "fallback") if r % 2 == 0 else ("fallback", "fast"):
                    t0 = time.perf_counter()
                    out = engines[path].generate(batch, params)
                    speed[path].append(int(out.lengths.sum()) / (time.perf_counter() - t0))
            med = {p: statistics.median(v) for p, v in speed.items()}
            share = {p: moe_share(e, batch, params) for p, e in engines.items()}
            ratio = med["fast"] / med["fallback"]
            params_m = sum(p.numel() for p in engines["fast"].model.parameters()) / 1e6
            matmul = engines["fast"].matmul
            results[(name, pname)] = ratio
            rows.append(
                f"| {name} | {params_m:.2g}M | {pname} | {matmul} | {med['fast']:.0f} | {med['fallback']:.0f} "
                f"| {ratio:.2f} | {share['fast']:.0%} / {share['fallback']:.0%} |"
            )
            print(
                f"{name} {pname} ({matmul}): fast {med['fast']:.0f}, fallback {med['fallback']:.0f} tok/s, "
                f"x{ratio:.2f}; MoE blocks {share['fast']:.0%} / {share['fallback']:.0%} of the time",
                flush=True,
            )
    command = (
        f"OMP_NUM_THREADS=1 python bench/moe_decode.py --precisions {joined(args.precisions)} --models "
        f"{joined(args.models)} --prompts {args.prompts} --group {args.group} --new {args.new} --repeats "
        f"{args.repeats}{f' --threads {args.threads}' if args.threads else ''}"
    )
    lines = [
        "## Decode throughput: the fast path against the fallback",
        "",
        f"What it shows: the native engine's fast path (its own attention, norms, rotary and static cache around "
        f"the model's MoE blocks) decodes these MoE checkpoints {min(results.values()):.2f}-"
        f"{max(results.values()):.2f}x as fast as the fallback (the model's own forward and dynamic cache); the "
        f"less, the more of the time the MoE blocks take.",
        "",
        "| model | parameters | precision | matmul | fast path tok/s | fallback tok/s | fast / fallback "
        "| time in the MoE blocks, fast / fallback |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Random checkpoints of `unison.archs`, {args.prompts} prompts of 12-19 tokens x {args.group} samples, "
        f"{args.new} new tokens each (temperature 1, no stop token); median of {args.repeats} rounds, the two paths "
        f"taking turns in one run; PyTorch threads: {threads}; `model.matmul=auto`, resolved as the matmul column "
        f"says. Both paths run the MoE blocks as the model's modules, so the fast path gains on the rest of the "
        f"step alone: the last column (one more call per path, the blocks timed by hooks) is the share it cannot "
        f"change. Machine: {machine}.",
        "",
        f"    {command}",
    ]
    if args.quick and args.doc is None:
        print("\n".join(lines))
    else:
        replace_section("moe-decode", "\n".join(lines), Path(args.doc) if args.doc else ROOT / "docs" / "moe.md")
    print("RESULT " + " ".join(f"{m}_{p}_fast_vs_fallback={r:.2f}" for (m, p), r in results.items()))


if __name__ == "__main__":
    main()
