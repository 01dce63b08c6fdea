"""`unison demo`: the paper's sanity test in miniature.

Trains the built-in model on the built-in perfectible prompt set (countdown prompts the warm-started model solves
20%-80% of the time, found by `unison filter`) once per precision, fp16 and bf16 by default (rollout and training in
the same dtype, same seed, same everything else), then prints a side-by-side table and draws reward and mismatch
against step for both runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from unison.config import (
    AlgorithmConfig,
    DataConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
    check,
    doc,
    to_dict,
)
from unison.distributed import LAUNCHER_PID
from unison.errors import SIGTERM_CODE, RunFault
from unison.precision import PRECISIONS
from unison.report import plot_runs, read_metrics
from unison.runfolder import check_run_dir
from unison.threads import cores
from unison.trainer import Terminated, on_sigterm, train


@dataclass
class DemoConfig(TrainConfig):
    """`unison demo`: the fields of `unison train`, with small defaults, plus the precisions to compare."""

    compare: list = doc(
        ["fp16", "bf16"], "precisions trained side by side (each for rollout and training alike)", separator=","
    )
    side_by_side: bool = doc(
        True,
        "train the arms at once, each in its own process with one thread, where the "
        "machine has a core for each (else one after the other)",
    )
    data: DataConfig = field(default_factory=lambda: DataConfig(subset="builtin"))
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(prompts_per_step=8, group_size=8, max_new_tokens=192)
    )
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, train_batch_size=32, micro_batch_size=64))
    run: RunConfig = field(
        default_factory=lambda: RunConfig(out="runs/demo", steps=120, eval_every=0, eval_prompts=64, save_every=20)
    )

    def validate(self) -> DemoConfig:
        check(len(self.compare) >= 1, "compare", "list at least one precision, e.g. [fp16, bf16]")
        for name in self.compare:
            check(
                str(name).lower() in PRECISIONS, "compare", f"unknown precision {name!r}; choose from fp32, bf16, fp16"
            )
        super().validate()
        return self

    def for_precision(self, name: str) -> TrainConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: dataclasses.replace(v) for k, v in fields.items()})
        cfg.precision.rollout = cfg.precision.train = name
        cfg.run.out = str(Path(self.run.out) / name)
        return cfg.validate()


def summarize(run_dir: Path, seconds: float) -> dict:
    rows = read_metrics(run_dir)
    last = rows[-5:]
    k3 = [r["mismatch/k3"] for r in rows]
    return {
        "final_train_accuracy": sum(r["rollout/accuracy"] for r in last) / len(last),
        "heldout_accuracy": next((r["eval/avg@1"] for r in reversed(rows) if "eval/avg@1" in r), float("nan")),
        "first_train_accuracy": rows[0]["rollout/accuracy"],
        "mismatch_k3_mean": sum(k3) / len(k3),
        "mismatch_k3_last": k3[-1],
        "skipped_steps": rows[-1]["precision/skipped_steps"],
        "steps": len(rows),
        "steps_per_s": len(rows) / sum(r["perf/step_seconds"] for r in rows),
        "wall_seconds": seconds,
    }


def format_summary(summary: dict[str, dict]) -> str:
    names = list(summary)
    lines = [f"{'':24s}" + "".join(f"{n:>14s}" for n in names)]
    fmt = {
        "final_train_accuracy": ".3f",
        "heldout_accuracy": ".3f",
        "first_train_accuracy": ".3f",
        "mismatch_k3_mean": ".2e",
        "mismatch_k3_last": ".2e",
        "skipped_steps": ".0f",
        "steps_per_s": ".3f",
    }
    for key, f in fmt.items():
        lines.append(f"{key:24s}" + "".join(f"{format(summary[n][key], f):>14s}" for n in names))
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, resume: bool = False, overwrite: bool = False, allow_changes: bool = False) -> dict:
    """Train every arm (side by side where the machine has a core for each, one after the other otherwise), then
    the table, the figure and summary.json."""
    root = Path(cfg.run.out)
    runs = {name: cfg.for_precision(name) for name in cfg.compare}
    for sub in runs.values():  # refuse before training anything if a run folder would be clobbered
        check_run_dir(sub.run.out, resume, overwrite)
    flags = {"resume": resume, "overwrite": overwrite, "allow_changes": allow_changes}
    if cfg.side_by_side and len(runs) > 1 and cores() >= len(runs):
        seconds = train_side_by_side(runs, flags, cfg.run.progress)
    else:
        seconds = {}
        for name, sub in runs.items():
            print(f"== {name}: rollout {name}, train {name}, preset {sub.algorithm.preset}, {sub.run.steps} steps")
            t0 = time.perf_counter()
            train(sub, **flags)
            seconds[name] = time.perf_counter() - t0
    summary = {name: summarize(Path(sub.run.out), seconds[name]) for name, sub in runs.items()}
    print(format_summary(summary))
    fig = plot_runs(
        [r.run.out for r in runs.values()],
        ["rollout/accuracy", "mismatch/k3", "mismatch/abs_log_ratio_mean"],
        root / "comparison.png",
        labels=list(runs),
        smooth=3,
        log_scale=["mismatch/k3", "mismatch/abs_log_ratio_mean"],
    )
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {fig} and {root / 'summary.json'}")
    return summary


def train_side_by_side(runs: dict[str, TrainConfig], flags: dict, progress: bool) -> dict[str, float]:
    """Each arm as its own `unison train` process with one thread, all at once; a progress bar per arm from its
    metrics. An arm that fails stops the others (SIGTERM: each saves what it can) and its own one line is raised.
    -> each arm's wall seconds"""
    with tempfile.TemporaryDirectory(prefix="unison-demo-") as tmp:
        arms = {name: _start_arm(name, sub, flags, Path(tmp)) for name, sub in runs.items()}
        print(
            f"== {', '.join(runs)} side by side, one process and one thread each: "
            + ", ".join(f"{name} in {sub.run.out}" for name, sub in runs.items()),
            flush=True,
        )
        bars = {
            name: tqdm(total=sub.run.steps, desc=name, unit="step", position=i, disable=not progress)
            for i, (name, sub) in enumerate(runs.items())
        }
        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            seconds = _wait(arms, runs, bars)
        except Terminated:  # the arms are stopped below, each saving what it can
            raise RunFault("terminated (SIGTERM); resume with the same command and --resume", SIGTERM_CODE) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            for bar in bars.values():
                bar.close()
            for arm in arms.values():
                if arm.process.poll() is None:
                    arm.process.terminate()
                    arm.process.wait()
    return seconds


@dataclass
class _Arm:
    process: subprocess.Popen
    log: Path
    start: float


def _start_arm(name: str, sub: TrainConfig, flags: dict, tmp: Path) -> _Arm:
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(to_dict(sub), sort_keys=False))
    args = [sys.executable, "-m", "unison", "train", "--config", str(config), "run.progress=false", "run.threads=1"]
    args += [f"--{k.replace('_', '-')}" for k, on in flags.items() if on]
    log = tmp / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", LAUNCHER_PID: str(os.getpid())}  # the arm ends with the demo
    with open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    return _Arm(process, log, time.perf_counter())


def _wait(arms: dict[str, _Arm], runs: dict[str, TrainConfig], bars: dict) -> dict[str, float]:
    """Until every arm has ended: the bars follow their metrics; the first arm to fail raises its one line."""
    seconds: dict[str, float] = {}
    while len(seconds) < len(arms):
        time.sleep(0.5)
        for name, arm in arms.items():
            done = _steps_logged(Path(runs[name].run.out))
            bars[name].update(done - bars[name].n)
            code = arm.process.poll()
            if code is None or name in seconds:
                continue
            if code != 0:
                raise RunFault(f"the {name} arm stopped: {_last_line(arm.log)}", code)
            seconds[name] = time.perf_counter() - arm.start
    return seconds


def _steps_logged(run_dir: Path) -> int:
    try:
        return sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _last_line(log: Path) -> str:
    """An arm's own message: the last line of its output that says what happened."""
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    said = [x for x in lines if x.startswith("unison ")]
    last = (said or lines or ["(no output)"])[-1]
    for prefix in ("unison train: stopped: ", "unison train: error: "):  # said once, as `unison demo`'s
        last = last.removeprefix(prefix)
    return last
