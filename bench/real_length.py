"""The exact sequence-level mismatch of a real model (SmolLM2-135M-Instruct) against response length, to 1,000+ tokens.

    python bench/real_length.py [--model smollm2-135m-instruct] [--precisions fp16,bf16] [--prompts 16] [--group 2]
                                [--new-tokens 1400] [--batch 4] [--out /work/runs/real-length] [--doc docs/real.md]

The word problems make this model answer in one sentence, so the prompts here ask for long writing instead (stories,
explanations, letters: `LONG_PROMPTS`, the model's chat template around each). In each precision (rollout engine and
learner alike) the native engine samples `--prompts` x `--group` responses at temperature 1 of at most
`--new-tokens` tokens, keeping its whole distribution at every position; the learner recomputes its own, and each
response gets its exact KL(mu || pi) (the sum over its positions of the full-vocabulary KL: by the chain rule, the
sequence-level KL in expectation) and its sampled log-ratio log pi(y) - log mu(y) = sum_t (log pi_t - log mu_t).

Each precision's responses are saved batch by batch in `--out` (with the engine's random state), so a stopped run
started again goes on where it stopped, and a finished precision is read back instead of sampled again. Writes the
section `real-length` of `--doc` (mean exact sequence KL by response length, fp16 beside bf16) and
docs/figures/real_length.png (both quantities against length); ends with `RESULT ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from docsection import count, joined, listed, replace_section  # noqa: E402

LONG_PROMPTS = [
    "Write a long story about a girl who finds an old map in her grandmother's attic. Describe every place she "
    "visits, every person she meets and everything she feels, in many paragraphs.",
    "Explain in great detail how a bill becomes a law, step by step, with examples for every step.",
    "Write a long letter to a friend describing your whole summer holiday, day by day.",
    "Describe in detail how to bake bread at home, from choosing the flour to slicing the loaf, with tips for "
    "every stage.",
    "Write a detailed history of the bicycle, from its invention to today, in many paragraphs.",
    "Tell a long adventure story about two brothers who sail across the ocean in a small boat.",
    "Explain how the human heart works, part by part, in as much detail as you can.",
    "Write a long essay on why reading books matters, with many examples and arguments.",
    "Describe a whole day in the life of a farmer, hour by hour, from sunrise to night.",
    "Write a long guide for a beginner who wants to learn to play the guitar, covering everything from buying one "
    "to playing the first songs.",
    "Tell a long fairy tale about a king, a dragon and a clever young cook.",
    "Explain in detail how the seasons change on Earth and what happens to plants and animals in each one.",
    "Write a long diary of a student during the first month at a new school.",
    "Describe in detail how to plan and plant a vegetable garden, month by month through the year.",
    "Write a long story about a robot who wants to become a painter.",
    "Explain in great detail how computers store and process information, for someone who has never used one.",
]


def prompt_file(out: Path, n: int) -> Path:
    """The first `n` long-writing prompts as a JSONL prompt file in `out`."""
    path = out / "long_prompts.jsonl"
    rows = [{"id": f"long-{i}", "prompt": p} for i, p in enumerate((LONG_PROMPTS * (n // len(LONG_PROMPTS) + 1))[:n])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sequence_divergences(logq_pi, logq_mu, ids, logprobs_mu, length: int, chunk: int = 128) -> dict:
    """One response's exact KL(mu || pi), summed over its positions (chunks of `chunk` positions in float64), and its
    sampled log-ratio sum_t log pi(y_t) - log mu(y_t)."""
    from unison.mismatch import token_divergences

    kl = 0.0
    for a in range(0, length, chunk):
        b = min(length, a + chunk)
        kl += token_divergences(logq_pi[a:b], logq_mu[a:b])[0].sum().item()
    picked = logq_pi[:length].gather(-1, ids[:length, None])[:, 0].double()
    return {"seq_kl": kl, "seq_log_ratio": (picked - logprobs_mu[:length].double()).sum().item()}


def sample_precision(s, name: str, prompts: list, args, state_path: Path) -> list[dict]:
    """Every response of one precision, batch by batch, each batch saved with the engine's random state."""
    import torch

    from unison.precision import PrecisionPolicy, parse_precision

    saved = torch.load(state_path, weights_only=False) if state_path.exists() else {"rows": [], "rng": None}
    if len(saved["rows"]) >= len(prompts):
        return saved["rows"]
    dtype = parse_precision(name)
    with s.engine(dtype, seed=args.seed) as engine:
        learner = s.learner(PrecisionPolicy(dtype, dtype))
        learner.sync(engine)
        if saved["rng"] is not None:
            engine.set_rng_state(saved["rng"])
        for start in range(len(saved["rows"]), len(prompts), args.batch):
            t0 = time.perf_counter()
            part = prompts[start : start + args.batch]
            ro = engine.generate([p for _, p in part], s.sampling(), keep_distributions=True)
            logq = learner.distributions(ro, micro_batch_size=1)
            for i, (pid, _) in enumerate(part):
                n = int(ro.lengths[i])
                d = sequence_divergences(logq[i], ro.distributions[i], ro.response_ids[i], ro.logprobs[i], n)
                saved["rows"].append({"prompt": pid, "length": n, "finished": bool(ro.finished[i]), **d})
            saved["rng"] = engine.rng_state()
            torch.save(saved, state_path)
            lens = [r["length"] for r in saved["rows"][-len(part) :]]
            print(f"{name}: {len(saved['rows'])}/{len(prompts)} lengths {lens} ({time.perf_counter() - t0:.0f} s)")
            del ro, logq
    return saved["rows"]


def bin_rows(rows: list[dict], bins: list[int]) -> list[tuple[int, int, list[dict]]]:
    """The rows of each length bin [lo, hi)."""
    return [(lo, hi, [r for r in rows if lo <= r["length"] < hi]) for lo, hi in zip(bins, bins[1:])]


def table(per: dict[str, list[dict]], bins: list[int]) -> list[str]:
    """Mean exact sequence KL (n) and mean |sampled sequence log-ratio| per length bin and precision; the last
    precision over the first."""
    names = list(per)
    lines = [
        "| responses (tokens) | "
        + " | ".join(f"{p}: mean exact seq KL (n) | {p}: mean abs seq log-ratio" for p in names)
        + (f" | {names[-1]} / {names[0]} (seq KL) |" if len(names) > 1 else " |"),
        "| --- |" + " --- | --- |" * len(names) + (" --- |" if len(names) > 1 else ""),
    ]
    for lo, hi, _ in bin_rows(per[names[0]], bins):
        cells, means = [], []
        for name in names:
            got = [r for r in per[name] if lo <= r["length"] < hi]
            means.append(statistics.mean(r["seq_kl"] for r in got) if got else float("nan"))
            lr = statistics.mean(abs(r["seq_log_ratio"]) for r in got) if got else float("nan")
            cells += [f"{means[-1]:.2e} ({len(got)})", f"{lr:.2e}"] if got else ["-", "-"]
        if all(c == "-" for c in cells):
            continue
        ratio = f" | {means[-1] / means[0]:.0f}" if len(names) > 1 and means[0] > 0 else ""
        lines.append(f"| {lo}-{hi} | " + " | ".join(cells) + ratio + " |")
    return lines


def slope_per_1k(rows: list[dict]) -> float:
    """Least-squares slope of the sampled sequence log-ratio against length, per 1,000 tokens."""
    xs, ys = [r["length"] for r in rows], [r["seq_log_ratio"] for r in rows]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


def plot(per: dict[str, list[dict]], path: Path, note: str) -> None:
    """Exact sequence KL (log scale) and sampled sequence log-ratio against response length, per precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in per.items():
        xs = [r["length"] for r in rows]
        axes[0].scatter(xs, [max(r["seq_kl"], 1e-12) for r in rows], s=14, alpha=0.7, label=name)
        axes[1].scatter(
            xs,
            [r["seq_log_ratio"] for r in rows],
            s=14,
            alpha=0.7,
            label=f"{name} (slope {slope_per_1k(rows):+.3f} / 1K tokens)",
        )
    axes[0].set_yscale("log")
    axes[0].set_title("exact sequence KL(mu || pi)")
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set_title("sampled log pi(y) - log mu(y)")
    for ax in axes:
        ax.set_xlabel("response length (tokens)")
        ax.legend()
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def matmul_mode(device_type: str) -> str:
    """How `model.matmul=auto` multiplies fp16 and bf16 on this device, in words."""
    import torch

    from unison.matmul import native_low_precision_matmul

    modes = {
        name: "native" if native_low_precision_matmul(device_type, dtype) else "fp32-accumulate"
        for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16))
    }
    return ", ".join(f"{name} {mode}" for name, mode in modes.items()) + f" (model.matmul=auto, {device_type})"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precisions", type=listed(["fp32", "fp16", "bf16"]), default=["fp16", "bf16"])
    ap.add_argument("--prompts", type=count, default=16)
    ap.add_argument("--group", type=count, default=2)
    ap.add_argument("--new-tokens", type=count, default=1400)
    ap.add_argument("--batch", type=count, default=4, help="responses per generate call (memory)")
    ap.add_argument("--bins", type=listed(kind=int), default=[0, 100, 250, 500, 750, 1000, 1500])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/work/runs/real-length")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "real.md"), help="'' for none")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    import torch

    from unison.config import DataConfig, ModelConfig, RolloutConfig
    from unison.setup import build

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = DataConfig(source=str(prompt_file(out, args.prompts)))
    s = build(
        ModelConfig(path=args.model),
        data,
        RolloutConfig(max_new_tokens=args.new_tokens),
        seed=args.seed,
        require_answer=False,
    )
    encoded = s.encode(s.examples("train", n=args.prompts, subset=False))
    prompts = [(i, p) for i, p in enumerate(encoded) for _ in range(args.group)]
    t0 = time.perf_counter()
    per = {name: sample_precision(s, name, prompts, args, out / f"{name}.pt") for name in args.precisions}
    json.dump(per, open(out / "rows.json", "w"), indent=1)
    matmul = matmul_mode(s.device.type)
    lines = table(per, args.bins)
    command = (
        f"OMP_NUM_THREADS=1 python bench/real_length.py --precisions {joined(args.precisions)} --prompts "
        f"{args.prompts} --group {args.group} --new-tokens {args.new_tokens}"
    )
    summary = [
        f"- {name}: {len(rows)} responses, {sum(r['length'] for r in rows)} tokens, "
        f"{sum(not r['finished'] for r in rows)} cut at {args.new_tokens}; mean exact seq KL "
        f"{statistics.mean(r['seq_kl'] for r in rows):.3g}, slope of the sampled seq log-ratio "
        f"{slope_per_1k(rows):+.3f} per 1K tokens"
        for name, rows in per.items()
    ]
    note = f"{args.model}, long-writing prompts, temperature 1; {matmul}"
    plot(per, (Path(args.doc).parent / "figures" if args.doc else out) / "real_length.png", note)
    text = [
        *lines,
        "",
        *summary,
        "",
        "![exact sequence KL and sampled log-ratio against length](figures/real_length.png)",
        "",
        f"    {command}",
        f"({time.perf_counter() - t0:.0f} s in this call; fp16/bf16 products: {matmul})",
    ]
    if args.doc:
        replace_section("real-length", "\n".join(text), Path(args.doc))
    print("\n".join(text), flush=True)
    print(
        "RESULT " + " ".join(f"{n}/seq_kl={statistics.mean(r['seq_kl'] for r in rows):.2e}" for n, rows in per.items())
    )


if __name__ == "__main__":
    main()
