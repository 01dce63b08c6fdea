"""The fault table of docs/reliability.md: each fault a run can meet, what unison did (exit code, the line it
printed), what was left on disk, and whether `--resume` then gave the uninterrupted run bit for bit.

    OMP_NUM_THREADS=1 python bench/faults.py          # as root, for the tmpfs faults (disk full, read-only)

Each fault runs `unison train` on a tiny random model (fp16, 4 steps, a checkpoint every step) in a fresh process,
beside one uninterrupted reference run; a real full disk and a real read-only folder come from a small tmpfs that
fills while the run goes (skipped, saying so, where mounting is not allowed), and a folder turning read-only is a
write failing with EROFS, injected into the run's process.
"""

from __future__ import annotations

import json
import os
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
READ_ONLY_AFTER_TWO_ROWS = """
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


def start(argv: list[str], pythonpath: str = "") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"PYTHONPATH": pythonpath} if pythonpath else {})}
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
        "weights": {k: v.tolist() for k, v in ckpt.read_weights(latest).items()} if latest else None,
    }


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
    replace_section("faults", "\n".join(lines), ROOT / "docs" / "reliability.md")
    bad = [r for r in rows if "| NO |" in r or "OLD RUN CHANGED" in r]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
