"""Speed on a shared machine: a decode and RL steps with the machine quiet and with one busy neighbour process,
under the thread settings that matter, taking turns in one run.

    OMP_NUM_THREADS= python bench/shared_machine.py   # writes the section `shared-machine` of docs/reliability.md
    python bench/shared_machine.py --quick            # one round, printed only

Settings: `run.threads=N` (PyTorch's default: one thread per core, spinning while it waits), `run.threads=auto`
(unison's default: the cores the other processes leave free, re-read every step, `unison.threads`), and
OpenMP's passive wait policy (`OMP_WAIT_POLICY=PASSIVE`, set before PyTorch starts). The neighbour is a Python
process spinning on one core. Each workload runs in a fresh process: the decode (the built-in model, 64 prompts x
128 new tokens, fp32, best of 3) and `unison train` with the demo's settings (fp16, 8 prompts x 8 samples, 192 new
tokens; the median step of steps 2-6). The same run with 1 and 2 threads is also checked to be bit-identical.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from docsection import bench_parser, machine_description, parse_bench_args, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"

DECODE = """
import sys, time, torch
from unison import threads
from unison.models import build_tokenizer
from unison.rollout.native import NativeEngine
from unison.rollout.base import SamplingParams
threads.configure(sys.argv[1])
e = NativeEngine.from_pretrained("builtin", torch.float32, "cpu", seed=0)
tok = build_tokenizer()
prompts = [tok("%d-%d:" % (100 + i, 3 + i % 7)).input_ids for i in range(64)]
params = SamplingParams(max_new_tokens=128, stop_token_ids=())
e.generate(prompts[:8], SamplingParams(max_new_tokens=16, stop_token_ids=()))
times = []
for _ in range(3):
    threads.adapt()
    t0 = time.perf_counter(); e.generate(prompts, params); times.append(time.perf_counter() - t0)
print(min(times), torch.get_num_threads())
"""


# `unison demo`'s settings (configs/demo.yaml), for one run of `unison train`
DEMO = [
    "data.subset=builtin",
    "rollout.prompts_per_step=8",
    "rollout.group_size=8",
    "rollout.max_new_tokens=192",
    "optim.lr=5e-5",
    "optim.train_batch_size=32",
    "optim.micro_batch_size=64",
]


def neighbour() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def env_for(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def threads_of(setting: str, cores: int) -> str:
    return {"default": str(cores), "passive": str(cores)}.get(setting, setting)


def decode(setting: str, cores: int) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, "-c", DECODE, threads_of(setting, cores)],
        env=env_for(setting),
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, threads = out.stdout.split()[-2:]
    return float(seconds), int(threads)


def rl_steps(setting: str, cores: int, work: Path, steps: int) -> tuple[float, list]:
    out = work / f"run-{setting}-{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        "-m",
        "unison.cli",
        "train",
        "--out",
        str(out),
        "--steps",
        str(steps),
        *DEMO,
        "run.progress=false",
        "run.eval_every=0",
        "run.eval_prompts=8",
        "run.save_every=0",
        "run.loggers=[jsonl]",
        f"run.threads={threads_of(setting, cores)}",
    ]
    done = subprocess.run(cmd, env=env_for(setting), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"unison train failed: {done.stderr.strip().splitlines()[-1]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["perf/step_seconds"] for r in rows[1:]), [r["perf/threads"] for r in rows]


def bit_identical(work: Path) -> bool:
    runs = []
    for n in (1, 2):
        out = work / f"det-{n}"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "unison.cli",
                "train",
                "--out",
                str(out),
                "--steps",
                "3",
                "run.progress=false",
                "run.eval_every=0",
                "run.eval_prompts=8",
                "rollout.prompts_per_step=4",
                "optim.train_batch_size=16",
                f"run.threads={n}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(
            [
                {k: v for k, v in json.loads(x).items() if not k.startswith("perf/")}
                for x in (out / "metrics.jsonl").read_text().splitlines()
            ]
        )
    return runs[0] == runs[1]


def main() -> int:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every (load, setting) pair, taking turns")
    ap.add_argument("--steps", type=int, default=6, help="RL steps per run")
    args = parse_bench_args(ap, {"rounds": 1, "steps": 3})
    cores = len(os.sched_getaffinity(0))
    settings = ["default", "auto", "passive", "1"] if cores > 1 else ["default", "auto"]
    machine = machine_description()
    work = Path(tempfile.mkdtemp(prefix="unison-shared-"))
    results: dict = {}
    for r in range(args.rounds):
        for load in ("quiet", "busy"):
            for setting in settings:
                busy = neighbour() if load == "busy" else None
                try:
                    time.sleep(0.5 if busy else 0)
                    d, dthreads = decode(setting, cores)
                    s, sthreads = rl_steps(setting, cores, work, args.steps)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                results.setdefault((load, setting), []).append((d, s, dthreads, sthreads))
                print(
                    f"round {r + 1} {load:5s} {setting:8s} decode {d:.2f} s ({dthreads} threads)  step {s:.2f} s "
                    f"(threads {sthreads})",
                    flush=True,
                )
    same = bit_identical(work)
    base = {key: min(v[0] for v in vals) for key, vals in results.items()}
    step = {key: min(v[1] for v in vals) for key, vals in results.items()}
    names = {
        "default": f"{cores} threads (PyTorch's default)",
        "auto": "run.threads=auto (unison's default)",
        "passive": f"{cores} threads, OMP_WAIT_POLICY=PASSIVE",
        "1": "1 thread",
    }
    lines = [
        f"Command: `python bench/shared_machine.py{' --quick' if args.quick else ''}` (no OMP_NUM_THREADS set); "
        f"machine: {machine}. Best of {args.rounds} rounds, settings taking turns; busy: one other process "
        f"spinning on one core. The decode: built-in model, 64 x 128 new tokens, fp32, best of 3. The RL step: "
        f"`unison train` with `unison demo`'s settings (fp16), the median of steps 2-{args.steps}.",
        "",
        "| setting | decode quiet | decode busy | busy / quiet | RL step quiet | RL step busy | busy / quiet |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting in settings:
        dq, db = base[("quiet", setting)], base[("busy", setting)]
        sq, sb = step[("quiet", setting)], step[("busy", setting)]
        lines.append(
            f"| {names[setting]} | {dq:.2f} s | {db:.2f} s | {db / dq:.2f}x | {sq:.2f} s | {sb:.2f} s | "
            f"{sb / sq:.2f}x |"
        )
    dq0, sq0 = base[("quiet", "default")], step[("quiet", "default")]
    lines += [
        "",
        f"On the quiet machine `auto` takes {base[('quiet', 'auto')] / dq0:.2f}x the default's decode time "
        f"and {step[('quiet', 'auto')] / sq0:.2f}x its step time. The same 3-step run on 1 and on 2 threads is "
        f"{'bit-identical' if same else 'NOT bit-identical'} (metrics without timings), so the thread count "
        "changing with the load leaves a run's numbers as they are.",
    ]
    if args.quick:
        print("\n".join(lines))
        return 0
    replace_section("shared-machine", "\n".join(lines), DOC)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
