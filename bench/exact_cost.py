"""What `metrics.exact_divergence` costs a training step: `unison train` with it off and on, taking turns.

    python bench/exact_cost.py [--models builtin,30m] [--steps 4] [--rounds 2]

Each run trains `--steps` steps (fp16, `--prompts` x `--group` samples of at most `--new-tokens` tokens, one update)
on the built-in model or the random 25M-parameter Qwen2 `30m` of bench/bench_models.py; a run's step time is the
median of its steps after the first. Writes its table into docs/probe.md (section `exact-cost`) and ends with a line
`RESULT ...`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docsection import replace_section  # noqa: E402
from ranks import model_dir, train_rows  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs/probe.md"


def run(path: str, exact: bool, args) -> dict:
    rows = train_rows(path, args, f"metrics.exact_divergence={str(exact).lower()}")[1:]
    return {
        "step": statistics.median(r["perf/step_seconds"] for r in rows),
        "exact": statistics.median(r.get("perf/exact_divergence_seconds", 0.0) for r in rows),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="builtin,30m")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    lines = [
        "| model | step, off (s) | step, on (s) | on / off | the exact pass (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    result = []
    for name in args.models.split(","):
        path = model_dir(name)
        off, on = [], []
        for _ in range(args.rounds):
            off.append(run(path, False, args))
            on.append(run(path, True, args))
        a, b = statistics.median(r["step"] for r in off), statistics.median(r["step"] for r in on)
        e = statistics.median(r["exact"] for r in on)
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {e:.3f} |")
        result.append(f"{name}_ratio={b / a:.3f}")
    how = (
        f"`python bench/exact_cost.py --models {args.models} --steps {args.steps} --rounds {args.rounds}` (fp16, "
        f"{args.prompts} x {args.group} samples of at most {args.new_tokens} tokens a step, one thread, runs "
        "taking turns)"
    )
    table = "\n".join(lines)
    replace_section("exact-cost", f"{how}\n\n{table}", DOC)
    print(table)
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
