"""Do two source trees compute the same numbers? Runs a fixed set of training runs with each and compares them.

    python bench/same_numbers.py record --src /path/to/old/src --out before.json
    python bench/same_numbers.py record --src src --out after.json
    python bench/same_numbers.py compare before.json after.json

Each run is `unison train` or `unison demo` on the built-in models, one thread per process (`OMP_NUM_THREADS=1`).
What is recorded of a run: every metric of every step but the timings and memory readings (`perf/*`), every line of
`samples.jsonl` (the digests of the sampled responses and the decoded rows), and a SHA-256 of each final master
weight. Two trees compute the same numbers when every recorded value is equal. `--runs` picks runs by name; `demo20`
(the demo's fp16 and bf16 arms for 20 steps) is the longest. `--set KEY=VALUE` (repeatable) adds a setting to every
run, e.g. `--set model.gemm=torch` to record a tree with a setting the older tree lacks at the value it had then.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = ["run.progress=false", "run.loggers=[jsonl]", "run.eval_prompts=8", "run.save_every=0"]
SMALL = [
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=48",
    "optim.train_batch_size=8",
    "optim.micro_batch_size=8",
    "data.subset=builtin",
]
# name -> (command, arguments, the run folders under --out it writes)
RUNS = {
    "demo6": (["demo", "--steps", "6"], ["fp16", "bf16"]),
    "demo20": (["demo", "--steps", "20"], ["fp16", "bf16"]),
    "exact-kl-reward": (
        [
            "train",
            "--steps",
            "3",
            *SMALL,
            "metrics.exact_divergence=true",
            "algorithm.kl_coef=0.1",
            "algorithm.kl_in=reward",
            "precision.rollout=bf16",
            "precision.train=bf16",
        ],
        ["."],
    ),
    "kl-loss-epochs": (
        [
            "train",
            "--steps",
            "3",
            *SMALL,
            "algorithm.kl_coef=0.05",
            "optim.epochs=2",
            "algorithm.preset=grpo-token-tis",
            "optim.schedule=cosine",
            "optim.warmup_steps=1",
        ],
        ["."],
    ),
    "fp32-head-seqmis": (
        [
            "train",
            "--steps",
            "3",
            *SMALL,
            "precision.lm_head=fp32",
            "algorithm.preset=grpo-seq-mis",
            "precision.rollout=bf16",
            "precision.train=fp16",
            "run.eval_every=2",
        ],
        ["."],
    ),
    "lora": (["train", "--steps", "3", *SMALL, "lora.enabled=true", "lora.rank=4", "optim.lr=1e-3"], ["."]),
    "moe-replay": (["train", "--steps", "3", *SMALL, "--model", "builtin-moe", "moe.routing_replay=true"], ["."]),
    "moe-routing": (
        ["train", "--steps", "3", *SMALL, "--model", "builtin-moe", "precision.rollout=bf16", "precision.train=bf16"],
        ["."],
    ),
    "ranks2": (["train", "--nproc", "2", "--steps", "3", *SMALL, "algorithm.kl_coef=0.05"], ["."]),
}


def record_run(name: str, src: Path, out: Path, settings: list[str]) -> dict:
    command, folders = RUNS[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src.resolve())}
    args = [sys.executable, "-m", "unison.cli", *command, "--out", str(out), *FAST, *settings]
    t0 = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr[-3000:]}")
    return {"seconds": time.perf_counter() - t0, **{f: digest(out / f) for f in folders}}


def digest(run: Path) -> dict:
    from unison import checkpoint as ckpt

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    metrics = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    samples = (run / "samples.jsonl").read_text().splitlines()
    master = ckpt.load_master(ckpt.latest_checkpoint(run))
    weights = {k: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16] for k, t in sorted(master.items())}
    return {"metrics": metrics, "samples": samples, "weights": weights}


def compare(a: dict, b: dict) -> int:
    differ = 0
    for name in sorted(set(a) & set(b)):
        for folder in sorted(k for k in a[name] if k != "seconds"):
            x, y = a[name][folder], b[name][folder]
            what = [k for k in ("metrics", "samples", "weights") if x[k] != y[k]]
            status = "identical" if not what else "DIFFERENT: " + ", ".join(what)
            print(f"{name:18s} {folder:5s} {status}  ({a[name]['seconds']:.0f} s / {b[name]['seconds']:.0f} s)")
            differ += bool(what)
            if "metrics" in what:
                first = next(i for i, (p, q) in enumerate(zip(x["metrics"], y["metrics"])) if p != q)
                keys = sorted(k for k in x["metrics"][first] if x["metrics"][first][k] != y["metrics"][first].get(k))
                print(f"    first differing step row {first}: {keys[:8]}")
    return differ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--src", required=True, help="the source tree to run (its src/ folder)")
    rec.add_argument("--out", required=True, help="the JSON to write")
    rec.add_argument("--runs", default=",".join(RUNS), help="comma-separated run names")
    rec.add_argument("--set", action="append", default=[], help="KEY=VALUE added to every run (repeatable)")
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "compare":
        a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
        raise SystemExit(1 if compare(a, b) else 0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            results[name] = record_run(name, Path(args.src), Path(tmp) / name, args.set)
            print(f"{name}: {results[name]['seconds']:.0f} s", flush=True)
            Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
