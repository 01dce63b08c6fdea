"""RL steps on 1 and 2 ranks (FSDP2 under `unison train --nproc`, gloo, one thread per rank) on the same global
batch settings: step time, and the resident memory of the largest rank after the last step and at its peak.

    python bench/ranks.py [--models builtin,120m] [--steps 3]

Each model's runs alternate 1 rank, 2 ranks, ... (`--rounds`); a run trains `--steps` steps of `--prompts` x
`--group` samples of at most `--new-tokens` tokens in fp16, and its step time is the median of its steps after the
first. Writes its table into docs/distributed.md (section `ranks`) and ends with a line `RESULT ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import build  # noqa: E402
from docsection import replace_section  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs/distributed.md"


def model_dir(name: str) -> str:
    if name == "builtin":
        return "builtin"
    from unison.models import load_tokenizer, resolve_model_dir

    folder = Path(tempfile.mkdtemp(prefix=f"ranks-{name}-"))
    build(name).save_pretrained(folder)
    load_tokenizer(resolve_model_dir("builtin")).save_pretrained(folder)
    return str(folder)


def train_rows(path: str, args, *extra: str) -> list[dict]:
    """The metrics rows of `unison train` on `path` with the benchmark's settings (`--prompts` x `--group`
    samples of at most `--new-tokens` tokens, one update a step, `--steps` steps, one thread) and `extra`."""
    out = Path(tempfile.mkdtemp(prefix="bench-run-")) / "run"
    cmd = [
        sys.executable,
        "-m",
        "unison",
        "train",
        f"model.path={path}",
        "data.subset=builtin",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"optim.train_batch_size={args.prompts * args.group}",
        f"run.steps={args.steps}",
        "run.save_every=0",
        "run.eval_every=0",
        "run.progress=false",
        "run.self_test=false",
        f"run.out={out}",
        *extra,
    ]
    subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, text=True)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def run(path: str, nproc: int, args) -> dict:
    rows = train_rows(path, args, "precision.rollout=fp16", "precision.train=fp16", "--nproc", str(nproc))
    return {
        "step": statistics.median(r["perf/step_seconds"] for r in rows[1:]),
        "rss": max(r["perf/peak_rss_mib"] for r in rows),
        "now": rows[-1]["perf/rss_mib"],
        "k3": rows[-1]["mismatch/k3"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="builtin,120m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    lines = [
        "| model | ranks | step (s) | speed-up | resident after the last step (MiB) | peak (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    result = []
    for name in args.models.split(","):
        path = model_dir(name)
        got = {1: [], 2: []}
        for _ in range(args.rounds):
            for n in (1, 2):
                got[n].append(run(path, n, args))
        one = statistics.median(r["step"] for r in got[1])
        for n in (1, 2):
            step = statistics.median(r["step"] for r in got[n])
            rss, now = max(r["rss"] for r in got[n]), max(r["now"] for r in got[n])
            lines.append(f"| {name} | {n} | {step:.2f} | {one / step:.2f}x | {now:.0f} | {rss:.0f} |")
            result.append(f"{name}_{n}rank_step={step:.2f} {name}_{n}rank_rss_mib={now:.0f}")
    how = (
        f"`python bench/ranks.py --models {args.models} --steps {args.steps} --rounds {args.rounds}` (fp16, gloo, "
        f"one thread per rank on this 2-core machine; {args.prompts} x {args.group} samples of at most "
        f"{args.new_tokens} tokens a step, one update; median step after the first)"
    )
    table = "\n".join(lines)
    replace_section("ranks", f"{how}\n\n{table}", DOC)
    print(table)
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
