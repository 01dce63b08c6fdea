"""The fault table of docs/notes/reliability.md (the long tables of docs/reliability.md): each fault a run can
meet, what unison did (exit code, the line it printed), what was left on disk, and whether `--resume` then gave the
uninterrupted run bit for bit.

    OMP_NUM_THREADS=1 python bench/faults.py          # as root, for the tmpfs faults (disk full, read-only)

Each fault runs `unison train` on a tiny random model (fp16, 4 steps, a checkpoint every step) in a fresh process,
beside one uninterrupted reference run; a real full disk and a real read-only folder come from a small tmpfs that
fills while the run goes (skipped, saying so, where mounting is not allowed), and a folder turning read-only is a
write failing with EROFS, injected into the run's process. Then the faults of the features around the run
(`Faults`): on 2 ranks (`--nproc 2`, against a 2-rank reference run) a reward raising on one rank, SIGTERM to the
launcher and SIGKILL of the launcher alone; SIGTERM inside a slow reward function; a tracker failing mid-run
(injected); a LoRA checkpoint and an adapter export on a full disk (tmpfs); no held-out prompts; a torn run log
plotted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from docsection import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REWARD = f"{ROOT / 'tests' / 'reward_fixture.py'}:even_length"
STEPS = 4
# a process whose run-log appends fail from the third on, as they would once its folder turned read-only (a file
# system cannot be remounted read-only while the run holds files open for writing)
# a tracker that logs step 1, then fails as a tracking server that went away does (in place of tensorboard)
TRACKER_FAILS_AT_STEP_2 = """
import unison.offline  # the command line's environment first, as in `unison`
from unison import report
class _Gone:
    def __init__(self, run_dir, config, ids):
        pass
    def scalars(self, step, metrics):
        if step >= 2:
            raise ConnectionError("tracking server closed the connection")
    def samples(self, step, rows):
        pass
    def close(self):
        pass
report.LOGGERS["tensorboard"] = (_Gone, "tensorboard", "tensorboard")
"""
NPROC = ["--nproc", "2", "optim.train_batch_size=8"]  # 2 ranks: each takes one group of each update
STOPS = "rollout.stop=[a, e, i, o, u, t, n, s, '0', '1', '2', '3']"  # responses that finish: the reward is called
READ_ONLY_AFTER_TWO_ROWS = """
import unison.offline  # the command line's environment first, as in `unison`
import errno
from unison import checkpoint
_real, _rows = checkpoint.append_jsonl, []
def _append(path, row):
    _rows.append(row)
    if len(_rows) >= 3:
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    return _real(path, row)
checkpoint.append_jsonl = _append
"""


def args(model: Path, prompts: Path, out: Path, *extra) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(prompts),
        "--out",
        str(out),
        "--precision",
        "fp16",
        "--steps",
        str(STEPS),
        f"data.reward={REWARD}",
        "data.template=plain",
        "run.eval_every=0",
        "run.eval_prompts=4",
        "run.save_every=1",
        "run.keep_checkpoints=2",
        "run.progress=false",
        "run.loggers=[jsonl]",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=24",
        "optim.train_batch_size=4",
        "optim.lr=1e-3",
        "data.max_prompts=8",
        *extra,
    ]


def start(argv: list[str], pythonpath: str = "", **env_extra: str) -> subprocess.Popen:
    paths = os.pathsep.join(x for x in (pythonpath, os.environ.get("PYTHONPATH", "")) if x)  # the injection first
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"PYTHONPATH": paths} if paths else {}), **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "unison.cli", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(p: subprocess.Popen) -> tuple[int, str]:
    _, err = p.communicate(timeout=600)
    lines = [x for x in err.splitlines() if x.strip()]
    return p.returncode, " / ".join(lines)


def wait_for(path: Path, p: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 300
    while not path.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return p.poll() is None


def fingerprint(run: Path) -> dict:
    from unison import checkpoint as ckpt

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    latest = ckpt.latest_checkpoint(run)
    return {
        "metrics": [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows],
        "samples": (run / "samples.jsonl").read_text(),
        "weights": {k: v.tolist() for k, v in weights(latest).items()} if latest else None,
    }


def weights(checkpoint: Path) -> dict:
    """A checkpoint's stored weights: a LoRA run's adapter, or the whole model's."""
    from safetensors.torch import load_file

    from unison import checkpoint as ckpt

    adapter = checkpoint / "adapter_model.safetensors"
    return load_file(str(adapter)) if adapter.is_file() else ckpt.read_weights(checkpoint)


def on_disk(run: Path) -> str:
    root = run / "checkpoints"
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    return ", ".join(names) or "no checkpoint"


def mount(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def main() -> int:
    from unison.models import build_tokenizer, random_model, save_model

    work = Path(tempfile.mkdtemp(prefix="unison-faults-"))
    model = save_model(random_model(seed=1), build_tokenizer(), work / "model")
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{i}-3:", "answer": "0"}}\n' for i in range(10, 30)))
    ref = work / "ref"
    assert finish(start(args(model, prompts, ref)))[0] == 0
    reference = fingerprint(ref)
    rows = []

    def record(fault: str, code: int, message: str, left: str, resumed: bool | None) -> None:
        exact = "-" if resumed is None else ("yes" if resumed else "NO")
        message = message.replace(str(work), "<dir>").replace("|", "\\|")
        shown = f"killed by signal {-code}" if code < 0 else str(code)
        rows.append(f"| {fault} | {shown} | {message} | {left} | {exact} |")
        print(f"{fault}: exit {code}, {message[:160]} | {left} | resume bit-exact: {exact}", flush=True)

    def resume(run: Path) -> bool:
        code, msg = finish(start(["train", "--config", str(run / "config.yaml"), "--resume"]))
        return code == 0 and fingerprint(run) == reference

    for sig, name in (
        (signal.SIGTERM, "SIGTERM mid-run"),
        (signal.SIGINT, "SIGINT (Ctrl-C) mid-run"),
        (signal.SIGKILL, "SIGKILL mid-run"),
    ):
        run = work / f"sig-{sig}"
        p = start(args(model, prompts, run))
        wait_for(run / "checkpoints" / "step-000002" / "manifest.json", p)
        p.send_signal(sig)
        code, msg = finish(p)
        left = on_disk(run)
        record(name, code, msg or "(killed: nothing printed)", left, resume(run))

    run = work / "damaged"
    finish(start(args(model, prompts, run)))
    weights = run / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)
    weights.write_bytes(bytes(data))
    left = on_disk(run)
    code, msg = finish(start(args(model, prompts, run, "--resume")))
    record(
        "newest checkpoint damaged after it was written (same size), then --resume",
        code,
        msg,
        left,
        fingerprint(run) == reference,
    )

    run = work / "locked"
    first = start(args(model, prompts, run, "--steps", "200"))
    wait_for(run / "checkpoints" / "step-000001" / "manifest.json", first)
    code, msg = finish(start(args(model, prompts, run, "--overwrite")))
    record("a second process with --overwrite while the first runs", code, msg, "the first run's, untouched", None)
    first.send_signal(signal.SIGKILL)
    first.wait()
    code, msg = finish(start(args(model, prompts, run, "--resume")))
    record("--resume after the lock holder was killed (a stale lock)", code, msg, on_disk(run), None)

    run = work / "late"
    finish(start(args(model, prompts, run, "--steps", "1")))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".unison.lock"}
    fake = work / "no-vllm" / "vllm"  # an engine that fails to start, after the model and the learner are built
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('vLLM left out for this fault')\n")
    code, msg = finish(start(args(model, prompts, run, "--overwrite", "--engine", "vllm"), pythonpath=str(fake.parent)))
    kept = all(p.read_bytes() == b for p, b in before.items())
    record(
        f"--overwrite with an error found late (the engine){'' if kept else ' — OLD RUN CHANGED'}",
        code,
        msg,
        "the old run's, untouched" if kept else on_disk(run),
        None,
    )

    mine = work / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, msg = finish(start(args(model, prompts, mine, "--overwrite")))
    record("--overwrite of a folder unison did not make (notes.txt)", code, msg, "notes.txt, untouched", None)

    run = work / "readonly"  # the run's appends fail as on a read-only folder from the third on (injected in-process)
    inject = work / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(READ_ONLY_AFTER_TWO_ROWS)
    code, msg = finish(start(args(model, prompts, run), pythonpath=str(inject)))
    left = on_disk(run)
    record(
        "the run folder turns read-only mid-run (writes fail with EROFS from the third run-log line on), then --resume",
        code,
        msg,
        left,
        resume(run),
    )
    small = work / "small"
    if mount(small, "10m"):
        try:
            run = small / "full"
            code, msg = finish(start(args(model, prompts, run)))
            left = on_disk(run)
            subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
            record(
                "disk full while writing a checkpoint (a 10 MB tmpfs), then room made and --resume",
                code,
                msg,
                left,
                resume(run),
            )
        finally:
            subprocess.run(["umount", str(small)], capture_output=True)
    else:
        rows.append("| disk full (a small tmpfs) | - | not measured: mounting a tmpfs is not allowed here | - | - |")
    Faults(model, prompts, work, record, reference).all()
    lines = [
        "Generated by `OMP_NUM_THREADS=1 python bench/faults.py` (as root, for the tmpfs rows): `unison train` on "
        f"a tiny random model, fp16, {STEPS} steps, a checkpoint every step (2 kept), each fault in a fresh "
        "process; resume bit-exact: final weights, metrics without timings and sample digests equal to an "
        'uninterrupted run\'s. Exit codes: README, "Exit codes".',
        "",
        "| fault | exit | what unison printed (stderr) | checkpoints left | resume bit-exact |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ]
    replace_section("faults", "\n".join(lines), ROOT / "docs" / "notes" / "reliability.md")
    bad = [r for r in rows if "| NO |" in r or "OLD RUN CHANGED" in r]
    return 1 if bad else 0


def with_reward(argv: list[str], name: str) -> list[str]:
    """`argv` with the reward function `name` of tests/reward_fixture.py, on responses that finish."""
    fixture = ROOT / "tests" / "reward_fixture.py"
    return [a for a in argv if not a.startswith("data.reward")] + [f"data.reward={fixture}:{name}", STOPS]


def inject(work: Path, name: str, code: str) -> str:
    """A folder holding a sitecustomize.py of `code`, for PYTHONPATH: code a process runs as it starts."""
    folder = work / f"inject-{name}"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(code)
    return str(folder)


class Faults:
    """The faults of the features beyond one process's run: ranks, a reward a signal lands in, trackers, LoRA
    checkpoints and adapter exports on a full disk, a torn run log, no held-out prompts."""

    def __init__(self, model: Path, prompts: Path, work: Path, record, reference: dict):
        self.model, self.prompts, self.work, self.record = model, prompts, work, record
        self.reference = reference  # the uninterrupted run's fingerprint (one rank, whole weights)

    def args(self, name: str, *extra: str) -> tuple[Path, list[str]]:
        run = self.work / name
        return run, args(self.model, self.prompts, run, *extra)

    def resumed(self, run: Path, reference: dict, *extra: str) -> bool:
        code, _ = finish(start(["train", "--config", str(run / "config.yaml"), "--resume", *extra]))
        return code == 0 and fingerprint(run) == reference

    def all(self) -> None:
        self.ranks()
        self.slow_reward()
        self.tracker()
        self.lora_disk_full()
        self.logs()

    def ranks(self) -> None:
        ref, argv = self.args("ref-ranks", *NPROC)
        assert finish(start(argv))[0] == 0
        reference = fingerprint(ref)
        run, argv = self.args("rank-reward", *NPROC)
        code, msg = finish(start(with_reward(argv, "rank1_raises")))
        self.record("--nproc 2: the reward function raises on rank 1 alone", code, msg, on_disk(run), None)
        for sig, name in (
            (signal.SIGTERM, "SIGTERM to the --nproc 2 launcher"),
            (signal.SIGKILL, "SIGKILL of the --nproc 2 launcher alone"),
        ):
            run, argv = self.args(f"ranks-{sig}", *NPROC)
            p = start(argv)
            wait_for(run / "checkpoints" / "step-000002" / "manifest.json", p)
            p.send_signal(sig)
            code, msg = finish(p)
            time.sleep(3)  # the ranks die with the launcher (PR_SET_PDEATHSIG); rank 0's lock goes with them
            said = msg or "(killed: nothing printed; its ranks died with it)"
            self.record(f"{name} mid-run", code, said, on_disk(run), self.resumed(run, reference, "--nproc", "2"))

    def slow_reward(self) -> None:
        run, argv = self.args("slow-reward")
        mark = self.work / "slow-reward-called"
        p = start(with_reward(argv, "slow"), UNISON_TEST_MARK=str(mark))
        wait_for(mark, p)
        p.send_signal(signal.SIGTERM)
        code, msg = finish(p)
        self.record("SIGTERM while a slow reward function runs (step 1)", code, msg, on_disk(run), None)

    def tracker(self) -> None:
        run, argv = self.args("tracker", "run.loggers=[tensorboard]")
        code, msg = finish(start(argv, pythonpath=inject(self.work, "tracker", TRACKER_FAILS_AT_STEP_2)))
        left = on_disk(run)
        what = "a tracker fails mid-run (its server went away at step 2), then --resume"
        self.record(what, code, msg, left, self.resumed(run, self.reference))

    def lora_disk_full(self) -> None:
        ref, argv = self.args("ref-lora", "lora.enabled=true")
        assert finish(start(argv))[0] == 0
        small = self.work / "small-lora"
        if not mount(small, "160k"):
            self.record("disk full while writing a LoRA checkpoint", 0, "not measured: no tmpfs here", "-", None)
            return
        try:
            run = small / "run"
            code, msg = finish(start(args(self.model, self.prompts, run, "lora.enabled=true")))
            subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
            what = "disk full while writing a LoRA checkpoint (a 160 KB tmpfs), then room made and --resume"
            self.record(what, code, msg, on_disk(run), self.resumed(run, fingerprint(ref)))
            shutil.rmtree(run)
            subprocess.run(["mount", "-o", "remount,size=8k", str(small)], check=True)
            step = ref / "checkpoints" / f"step-{STEPS:06d}"
            code, msg = finish(start(["export", str(step), "--adapter", "--out", str(small / "adapter")]))
            self.record("unison export --adapter into a full disk (an 8 KB tmpfs)", code, msg, "-", None)
        finally:
            subprocess.run(["umount", str(small)], capture_output=True)

    def logs(self) -> None:
        run, argv = self.args("no-eval", "run.eval_prompts=0")
        code, msg = finish(start(argv))
        self.record("run.eval_prompts=0 (no held-out prompts)", code, msg or "(trains to the end)", on_disk(run), None)
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 5, "rollout/accu')  # a line a full disk cut short
        code, msg = finish(start(["plot", str(run), "--metrics", "rollout/accuracy", "--out", str(run / "p.png")]))
        self.record("metrics.jsonl with a torn last line, then unison plot", code, msg, "-", None)


if __name__ == "__main__":
    sys.exit(main())
