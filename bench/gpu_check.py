"""One command that checks unison on a GPU machine: the mismatch probe, short RL runs, learner MFU and two ranks.

    python bench/gpu_check.py                       # one NVIDIA GPU (H100/H200), under 8 minutes
    python bench/gpu_check.py --device cpu --quick  # the smoke test on a CPU: small sizes, about 2 minutes
    python bench/gpu_check.py --keep                # keep the temporary folder (logs, runs, the 0.4B checkpoint)

Needs PyTorch and transformers (Triton's version, where installed, is printed), neither vLLM nor a network; the
`unison` command is the one beside this Python. The checks, each with a time budget (a check past it, or past the
whole run's deadline of 440 s, is stopped and counted as failed), each failure caught into the table:

    probe  `unison probe` in fp32, fp16 and bf16 (rollout and train alike; its default 32 prompts x 8 samples of at
           most 256 tokens) on the built-in model and on a random 0.43B-parameter Qwen2 (hidden 1024, 28 layers, the
           built-in tokenizer's 272-token vocabulary, so that every sampled id decodes) saved into the temporary
           folder; passes when each setting's mean |log pi - log mu| lies within the engine self-test's band for
           its precision (`SELF_TEST_BANDS`); the bf16/fp16 ratio of k3 is reported
    train  `unison train --precision P --steps 5` on the built-in model for P in fp32, fp16, bf16 (its default
           16 prompts x 8 samples of at most 256 tokens a step, one evaluation and one checkpoint at the end); reads
           the run's metrics.jsonl: the median step time (the first step left out), mismatch/k3 and the fp16 steps
           skipped; passes when the run exits 0 with every step logged, finite k3, the weight-sync checksum
           matching and at least one step not skipped
    mfu    learner MFU per precision on the 104M-parameter `120m` model against the measured matrix-product rate:
           `bench/mfu.py`'s own measurement (its `main`, imported, with its table written into the temporary
           folder rather than docs/); passes when every MFU lies in (0, 1)
    bitwise  `unison probe probe.bitwise=true` (exact mode, docs/exact.md) on the built-in model in fp32, fp16 and
           bf16, 4 prompts x 4 samples of at most 32 tokens; passes when every sampled token's log mu and log pi_old
           share their fp32 bits (bit_equal_frac 1) in each precision
    nproc  with two or more GPUs visible, `unison train --nproc 2 --device cuda --precision bf16 --steps 3` (two
           ranks under PyTorch's launcher; unison's backend `auto` is NCCL on CUDA); passes when it exits 0 with
           every step logged (perf/ranks 2 where logged) and finite k3; fails, saying so, when `unison train --help`
           lists no --nproc; otherwise a `skipped (1 GPU)` row

`--quick` keeps only the built-in model, 4 prompts x 4 samples of at most 32 tokens, 2 train steps of 4 x 4
samples, and MFU on the built-in model with 4 rows of 8 + 24 tokens. A full run on a CPU is refused (one line, exit
code 2). Prints one table (check | setting | result | seconds) and a line `RESULT ok=<n_ok>/<n_total> ...`
(skipped checks counted apart); exit code 0 when every check that ran passed, 1 otherwise. Writes nothing into the
repository.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

PRECISIONS = ["fp32", "fp16", "bf16"]
# a random Qwen2 of about half a billion parameters (0.426B with the built-in tokenizer's vocabulary)
QWEN_0_4B = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=4
)
# seconds per check, and for the whole run (each check gets at most what the run has left)
BUDGETS = {"probe-builtin": 90, "probe-0.4b": 180, "train": 90, "mfu": 120, "nproc": 150, "bitwise": 60}
QUICK_BUDGETS = {"probe-builtin": 60, "train": 45, "mfu": 45, "bitwise": 45}
DEADLINE, QUICK_DEADLINE = 500, 215


class OutOfTime(Exception):
    pass


class CheckFailed(Exception):
    pass


class Checks:
    """The table: each check run against its budget and the run's deadline, its failure caught into a row."""

    def __init__(self, deadline: float):
        self.end = time.monotonic() + deadline
        self.rows: list[tuple[str, str, str, float, str]] = []  # check, setting, result, seconds, ok|fail|skipped
        self.numbers: dict[str, str] = {}

    def left(self) -> float:
        return self.end - time.monotonic()

    def run(self, check: str, setting: str, budget: float, fn) -> None:
        """Run `fn(seconds)`, which returns the result text (or raises); `seconds` is the time it may take."""
        seconds = min(budget, self.left())
        t0 = time.monotonic()
        if seconds < 10:
            self.add(check, setting, "fail: not run, the run's time is spent", 0.0, "fail")
            return
        try:
            with alarm(seconds):
                result, status = fn(seconds), "ok"
        except OutOfTime:
            result, status = f"fail: stopped after its budget of {seconds:.0f}s", "fail"
        except CheckFailed as exc:
            result, status = f"fail: {exc}", "fail"
        except Exception as exc:  # noqa: BLE001 - every failure becomes a row
            result, status = f"fail: {type(exc).__name__}: {first_line(str(exc))}", "fail"
        self.add(check, setting, result, time.monotonic() - t0, status)

    def add(self, check: str, setting: str, result: str, seconds: float, status: str) -> None:
        self.rows.append((check, setting, result, seconds, status))
        print(f"[{check}] {setting}: {result} ({seconds:.1f}s)", flush=True)

    def table(self) -> str:
        head = ("check", "setting", "result", "seconds")
        body = [(c, s, r.replace("|", "/"), f"{t:.1f}") for c, s, r, t, _ in self.rows]
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(4)]
        lines = ["| " + " | ".join(x.ljust(w) for x, w in zip(row, widths)) + " |" for row in [head, *body]]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise OutOfTime in this (main) thread once `seconds` have passed."""

    def ring(signum, frame):
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def first_line(text: str, width: int = 140) -> str:
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    return line if len(line) <= width else line[: width - 3] + "..."


def unison_command() -> str:
    """The `unison` console script beside this interpreter (a virtual environment's bin), else the one on PATH."""
    here = Path(sys.executable).parent / "unison"
    found = str(here) if here.exists() else shutil.which("unison")
    if not found:
        raise SystemExit(
            "gpu_check: no `unison` command beside this Python or on PATH; install unison first (pip install -e .)"
        )
    return found


def cli(args: list[str], log: Path, seconds: float) -> str:
    """Run `unison ARGS` into `log`, within `seconds`; its whole process group (torchrun's ranks too) is stopped
    when time runs out or the check is interrupted. Returns the output; raises CheckFailed on a non-zero exit."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [unison_command(), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=max(1.0, seconds - 2))
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                stop_group(proc)
    text = log.read_text(errors="replace")
    lines = [x for x in text.splitlines() if x.strip()]
    if rc != 0:  # the end of its output, for the reader (the temporary folder goes unless --keep)
        print("\n".join(f"    {x}" for x in [f"$ unison {' '.join(args)}", *lines[-15:]]), flush=True)
    if rc is None:
        raise CheckFailed(f"`unison {args[0]}` stopped after its budget of {seconds:.0f}s")
    if rc != 0:
        raise CheckFailed(f"exit {rc}: {first_line(lines[-1] if lines else '')}")
    return text


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this check started (its id is the child's pid), SIGKILL if it lingers; the
    check's alarm waits until it is done."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


def metrics_rows(run: Path, steps: int) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        raise CheckFailed(f"no metrics.jsonl in {run}")
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "perf/step_seconds" in r]
    if len(rows) != steps:
        raise CheckFailed(f"{len(rows)} steps in metrics.jsonl, {steps} asked for")
    return rows


def probe_check(args, checks: Checks, work: Path, label: str, model: str, model_fn=None):
    """`unison probe` of `model` (built first by `model_fn`, if given) in every precision."""
    from unison.conformance import SELF_TEST_BANDS
    from unison.precision import parse_precision

    def fn(seconds: float) -> str:
        t0 = time.monotonic()
        path = model_fn() if model_fn else model
        out = work / f"probe-{label}"
        sizes = ["--num-prompts", "4", "--samples", "4", "--max-new-tokens", "32"] if args.quick else []
        cli(
            [
                "probe",
                "--model",
                str(path),
                "--device",
                args.device,
                "--precisions",
                ",".join(PRECISIONS),
                "--out",
                str(out),
                *sizes,
                "run.progress=false",
            ],
            work / f"probe-{label}.log",
            seconds - (time.monotonic() - t0),
        )
        results = json.loads((out / "probe.json").read_text())["results"]
        by = {r["rollout_precision"]: r["metrics"] for r in results if r["rollout_precision"] == r["train_precision"]}
        if set(by) != set(PRECISIONS):
            raise CheckFailed(f"probe.json has settings {sorted(by)}, not {PRECISIONS}")
        gaps = {p: float(by[p]["abs_log_ratio_mean"]) for p in PRECISIONS}
        k3 = {p: float(by[p]["k3"]) for p in PRECISIONS}
        ratio = k3["bf16"] / k3["fp16"] if k3["fp16"] > 0 else float("nan")
        checks.numbers[f"probe_{label}_k3_bf16_over_fp16"] = f"{ratio:.1f}"
        for p in PRECISIONS:
            checks.numbers[f"probe_{label}_abs_log_ratio_{p}"] = f"{gaps[p]:.2e}"
        text = (
            "mean abs log(pi/mu) "
            + ", ".join(f"{p} {gaps[p]:.1e}" for p in PRECISIONS)
            + f"; k3 bf16/fp16 {ratio:.1f}x"
        )
        outside = [p for p in PRECISIONS if not math.isfinite(gaps[p]) or gaps[p] > SELF_TEST_BANDS[parse_precision(p)]]
        if outside:
            bands = ", ".join(f"{p} {SELF_TEST_BANDS[parse_precision(p)]:g}" for p in outside)
            raise CheckFailed(f"{text}; beyond the band ({bands})")
        return f"ok: {text}"

    return fn


def bitwise_check(args, checks: Checks, work: Path):
    """`unison probe probe.bitwise=true` on the built-in model in every precision: every token bit-equal."""

    def fn(seconds: float) -> str:
        out = work / "probe-bitwise"
        sizes = ["--num-prompts", "4", "--samples", "4", "--max-new-tokens", "32"]
        args_ = ["probe", "--device", args.device, "--precisions", ",".join(PRECISIONS), "--out", str(out), *sizes]
        cli([*args_, "probe.bitwise=true", "run.progress=false"], work / "probe-bitwise.log", seconds)
        results = json.loads((out / "probe.json").read_text())["results"]
        equal = {r["rollout_precision"]: float(r["metrics"]["bit_equal_frac"]) for r in results}
        for p, v in equal.items():
            checks.numbers[f"bitwise_bit_equal_frac_{p}"] = f"{v:.4f}"
        text = "bit-equal tokens " + ", ".join(f"{p} {v:.4f}" for p, v in equal.items())
        if set(equal) != set(PRECISIONS) or any(v != 1.0 for v in equal.values()):
            raise CheckFailed(text)
        return f"ok: {text}"

    return fn


def build_random_model(work: Path) -> Path:
    """The random 0.43B Qwen2 with the built-in tokenizer, saved as a checkpoint folder."""
    from unison.models import build_tokenizer, random_model, save_model

    model = random_model(seed=0, **QWEN_0_4B)
    path = save_model(model, build_tokenizer(), work / "qwen2-0.4b")
    params = sum(p.numel() for p in model.parameters())
    print(f"[probe] random Qwen2 of {params / 1e6:.1f}M parameters saved in {path}", flush=True)
    return path


def train_check(args, checks: Checks, work: Path, precision: str, steps: int):
    def fn(seconds: float) -> str:
        run = work / f"train-{precision}"
        sizes = (
            [
                "rollout.prompts_per_step=4",
                "rollout.group_size=4",
                "optim.train_batch_size=16",
                "optim.micro_batch_size=16",
                "rollout.max_new_tokens=32",
                "run.eval_prompts=4",
            ]
            if args.quick
            else []
        )
        cli(
            [
                "train",
                "--model",
                "builtin",
                "--device",
                args.device,
                "--precision",
                precision,
                "--steps",
                str(steps),
                "--out",
                str(run),
                *sizes,
                "run.eval_every=0",
                "run.save_every=0",
                "run.progress=false",
            ],
            work / f"train-{precision}.log",
            seconds,
        )
        rows = metrics_rows(run, steps)
        timed = rows[1:] or rows  # the first step compiles kernels and fills caches
        step_s = statistics.median(r["perf/step_seconds"] for r in timed)
        k3 = statistics.mean(r["mismatch/k3"] for r in rows)
        skipped = int(rows[-1].get("precision/skipped_steps", 0))
        checks.numbers[f"train_{precision}_step_s"] = f"{step_s:.3f}"
        checks.numbers[f"train_{precision}_k3"] = f"{k3:.2e}"
        checks.numbers[f"train_{precision}_skipped"] = str(skipped)
        text = f"{steps} steps, {step_s:.2f} s/step, k3 {k3:.1e}, skipped {skipped}"
        if not math.isfinite(k3):
            raise CheckFailed(f"{text}: k3 not finite")
        if any(r.get("sync/checksum_ok", 1.0) != 1.0 for r in rows):
            raise CheckFailed(f"{text}: a weight-sync checksum did not match")
        if skipped >= steps:
            raise CheckFailed(f"{text}: every step skipped")
        return f"ok: {text}"

    return fn


def mfu_check(args, checks: Checks, work: Path):
    """bench/mfu.py's measurement, its `main` imported and given a command line (its table goes to a temporary
    file, never to docs/); the numbers are read from its RESULT line."""

    def fn(seconds: float) -> str:
        import mfu

        if args.quick:
            setting = [
                "--model",
                "builtin",
                "--precisions",
                ",".join(PRECISIONS),
                "--batch",
                "4",
                "--prompt",
                "8",
                "--response",
                "24",
                "--repeats",
                "1",
            ]
        else:
            setting = ["--model", "120m", "--precisions", ",".join(PRECISIONS), "--repeats", "3"]
        argv, sys.argv = sys.argv, ["mfu.py", "--device", args.device, *setting, "--doc", str(work / "mfu.md")]
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                mfu.main()
        except SystemExit as exc:
            lines = out.getvalue().strip().splitlines() or [""]
            raise CheckFailed(f"bench/mfu.py exited {exc.code}: {first_line(lines[-1])}") from None
        finally:
            sys.argv = argv
            (work / "mfu.log").write_text(out.getvalue())
            release_gpu_memory()
        line = next((x for x in out.getvalue().splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise CheckFailed("bench/mfu.py printed no RESULT line")
        values = {k: float(v) for k, v in (x.split("=", 1) for x in line.split()[1:])}
        step = {p: values[f"step_mfu_{p}"] for p in PRECISIONS}
        for p in PRECISIONS:
            checks.numbers[f"mfu_step_{p}"] = f"{step[p]:.3f}"
        text = (
            "step MFU "
            + ", ".join(f"{p} {step[p]:.1%}" for p in PRECISIONS)
            + "; matmul TFLOP/s "
            + "/".join(f"{values[f'matmul_tflops_{p}']:.3g}" for p in PRECISIONS)
        )
        if not all(0 < v < 1 for v in step.values()):
            raise CheckFailed(f"{text}: an MFU outside (0, 1)")
        return f"ok: {text}"

    return fn


def release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def nproc_check(args, checks: Checks, work: Path, steps: int):
    def fn(seconds: float) -> str:
        t0 = time.monotonic()
        helptext = cli(["train", "--help"], work / "train-help.log", min(60.0, seconds))
        if "--nproc" not in helptext:
            raise CheckFailed("`unison train` has no --nproc flag in this unison")
        run = work / "train-nproc2"
        cli(
            [
                "train",
                "--nproc",
                "2",
                "--model",
                "builtin",
                "--device",
                args.device,
                "--precision",
                "bf16",
                "--steps",
                str(steps),
                "--out",
                str(run),
                "run.eval_every=0",
                "run.save_every=0",
                "run.progress=false",
            ],
            work / "train-nproc2.log",
            seconds - (time.monotonic() - t0),
        )
        rows = metrics_rows(run, steps)
        step_s = statistics.median(r["perf/step_seconds"] for r in rows[1:] or rows)
        k3 = statistics.mean(r["mismatch/k3"] for r in rows)
        checks.numbers["nproc2_step_s"] = f"{step_s:.3f}"
        text = f"{steps} steps on 2 ranks, {step_s:.2f} s/step, k3 {k3:.1e}"
        ranks = {r.get("perf/ranks", 2) for r in rows}  # (logged by a run of several ranks)
        if ranks != {2}:
            raise CheckFailed(f"{text}: the run logged perf/ranks {sorted(ranks)}, not 2")
        if not math.isfinite(k3):
            raise CheckFailed(f"{text}: k3 not finite")
        return f"ok: {text}"

    return fn


def environment(device: str) -> str:
    import torch
    import transformers

    import unison

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    if device == "cuda":
        n = torch.cuda.device_count()
        parts.append(f"CUDA {torch.version.cuda}, {n} x {torch.cuda.get_device_name(0)}")
    else:
        parts.append(f"CPU, {torch.get_num_threads()} PyTorch threads")
    parts.append(f"unison from {Path(unison.__file__).parent}")
    return "; ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small sizes: the smoke test (about 2 minutes on a CPU)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, run folders, models)")
    args = ap.parse_args()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but PyTorch sees no CUDA GPU; use --device cpu --quick for the CPU smoke test")
        return 2
    if args.device == "cpu" and not args.quick:
        print(
            "gpu_check: the full check needs a CUDA GPU (it probes a 0.4B model); on a CPU run "
            "`python bench/gpu_check.py --device cpu --quick`"
        )
        return 2
    unison_command()
    print(f"gpu_check: {environment(args.device)}", flush=True)
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    checks = Checks(QUICK_DEADLINE if args.quick else DEADLINE)
    steps = 2 if args.quick else 5
    work = Path(tempfile.mkdtemp(prefix="unison-gpu-check-"))
    all_precisions = ",".join(PRECISIONS)
    try:
        checks.run(
            "probe",
            f"builtin, {all_precisions}",
            budgets["probe-builtin"],
            probe_check(args, checks, work, "builtin", "builtin"),
        )
        if not args.quick:
            checks.run(
                "probe",
                f"random qwen2 0.43B, {all_precisions}",
                budgets["probe-0.4b"],
                probe_check(args, checks, work, "qwen2_0.4b", "", lambda: build_random_model(work)),
            )
        for precision in PRECISIONS:
            checks.run(
                "train",
                f"builtin, {precision}, {steps} steps",
                budgets["train"],
                train_check(args, checks, work, precision, steps),
            )
        checks.run("bitwise", f"builtin, {all_precisions}", budgets["bitwise"], bitwise_check(args, checks, work))
        mfu_model = "builtin" if args.quick else "120m (104M)"
        checks.run("mfu", f"{mfu_model}, {all_precisions}", budgets["mfu"], mfu_check(args, checks, work))
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        if gpus >= 2:
            checks.run(
                "nproc", "2 ranks (NCCL), builtin, bf16, 3 steps", budgets["nproc"], nproc_check(args, checks, work, 3)
            )
        else:
            checks.add("nproc", "2 ranks (NCCL)", "skipped (1 GPU)" if gpus == 1 else "skipped (CPU)", 0.0, "skipped")
            checks.numbers["nproc"] = "skipped"
    finally:
        if args.keep:
            print(f"gpu_check: logs and runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    status = [r[4] for r in checks.rows]
    ok, failed, skipped = status.count("ok"), status.count("fail"), status.count("skipped")
    if "nproc" not in checks.numbers:
        checks.numbers["nproc"] = status[-1]
    total = sum(r[3] for r in checks.rows)
    print()
    print(checks.table())
    print(
        f"RESULT ok={ok}/{ok + failed} skipped={skipped} device={args.device} quick={int(args.quick)} "
        f"seconds={total:.0f} " + " ".join(f"{k}={v}" for k, v in checks.numbers.items())
    )
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
