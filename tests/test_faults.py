"""Faults end cleanly, and nothing saved is lost: a damaged newest checkpoint (the newest intact one is used), a
second process on the same run folder (refused while the first runs, its lock taken over once it is dead),
--overwrite of a run with a late error, a full disk (a small tmpfs, and one injected in-process), a folder that
turns read-only, SIGTERM then --resume bit for bit, and SIGINT. Each ends with one line naming the newest complete
checkpoint and the command that resumes, and its own exit code (`unison.errors.EXIT_CODES`)."""

import contextlib
import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_reliability import cli, comparable, same, train_args

from unison import checkpoint as ckpt
from unison.cli import main
from unison.errors import SIGINT_CODE, SIGTERM_CODE, WRITE_FAILED


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(f'{{"prompt": "{i}-3:", "answer": "0"}}\n' for i in range(10, 30)))
    return p


def run_cli(args, capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the fault could be injected"


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".unison.lock"}


def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_resumes_bit_exactly(
    tiny_dir, tmp_path, prompts, capsys
):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_cli(train_args(tiny_dir, prompts, ref, "fp16", 3), capsys)[0] == 0
    keep3 = ["run.keep_checkpoints=3"]
    assert run_cli(train_args(tiny_dir, prompts, run, "fp16", 3) + keep3, capsys)[0] == 0
    weights = run / "checkpoints" / "step-000003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # some weights zeroed, the file's size unchanged: the manifest's sizes still agree
    weights.write_bytes(bytes(data))
    assert ckpt.is_complete(weights.parent) and ckpt.damaged_file(weights.parent) == "model.safetensors"
    code, err = run_cli(train_args(tiny_dir, prompts, run, "fp16", 3) + keep3 + ["--resume"], capsys)
    assert code == 0
    assert any(
        "checkpoint step-000003 is damaged (model.safetensors does not match its hash); resuming from "
        "step-000002" in line
        for line in err
    ), err
    assert same(comparable(ref), comparable(run))  # step 3 trained again, from the intact step 2


def test_a_second_process_on_the_run_folder_is_refused_and_a_dead_ones_lock_taken_over(
    tiny_dir, tmp_path, prompts, capsys
):
    run = tmp_path / "run"
    first = cli(train_args(tiny_dir, prompts, run, "fp32", 200))
    try:
        wait_for(run / "checkpoints" / "step-000001" / ckpt.MANIFEST, first)
        kept = {name: (run / name).read_bytes() for name in ("config.yaml", "unison-run.json")}
        for extra in (["--resume"], ["--overwrite"]):
            code, err = run_cli(train_args(tiny_dir, prompts, run, "fp32", 3) + extra, capsys)
            assert code == 2 and len(err) == 1, err
            assert f"is in use by pid {first.pid} on " in err[0], err
        assert all((run / name).read_bytes() == data for name, data in kept.items())  # the first run's, untouched
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    code, err = run_cli(train_args(tiny_dir, prompts, run, "fp32", 3) + ["--resume"], capsys)
    assert code == 0
    assert any(f"took over the lock of {run} left by pid {first.pid}" in line for line in err), err


def test_overwrite_with_a_late_error_keeps_the_old_run(tiny_dir, tmp_path, prompts, capsys, monkeypatch):
    run = tmp_path / "run"
    assert run_cli(train_args(tiny_dir, prompts, run, "fp32", 1), capsys)[0] == 0
    before = snapshot(run)
    monkeypatch.setitem(sys.modules, "vllm", None)  # the engine fails to start: after the model and learner built
    code, err = run_cli(train_args(tiny_dir, prompts, run, "fp32", 1) + ["--overwrite", "--engine", "vllm"], capsys)
    assert code == 2 and "vLLM" in err[0], err
    assert snapshot(run) == before


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip() or r.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def check_write_fault(err: list[str], run: Path, what: str, newest: str) -> None:
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("unison train: stopped: cannot write ") and what in line, line
    assert f"the newest complete checkpoint is {run / 'checkpoints' / newest}" in line, line
    assert f"resume with: unison train --config {run / 'config.yaml'} --resume" in line, line
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the failed save left nothing behind
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == newest
    assert ckpt.latest_intact_checkpoint(run) == run / "checkpoints" / newest


def test_disk_full_on_a_small_tmpfs(tiny_dir, tmp_path, prompts, capsys):
    with tmpfs(tmp_path / "small", "10m") as mount:
        run = mount / "run"  # one checkpoint of the tiny model (about 8 MB) fits, a second does not
        code, err = run_cli(train_args(tiny_dir, prompts, run, "fp32", 3), capsys)
        assert code == WRITE_FAILED, err
        check_write_fault(err, run, "(No space left on device)", "step-000001")


def test_disk_full_injected_in_the_second_checkpoint(tiny_dir, tmp_path, prompts, capsys, monkeypatch):
    real, calls = ckpt.torch.save, []

    def save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", save)
    run = tmp_path / "run"
    code, err = run_cli(train_args(tiny_dir, prompts, run, "fp32", 3), capsys)
    assert code == WRITE_FAILED
    check_write_fault(err, run, "(No space left on device)", "step-000001")


def test_a_folder_that_turns_read_only_mid_run(tiny_dir, tmp_path, prompts, capsys, monkeypatch):
    real, rows = ckpt.append_jsonl, []

    def append(path, row):
        rows.append(row)
        if len(rows) >= 3:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, row)

    monkeypatch.setattr(ckpt, "append_jsonl", append)
    run = tmp_path / "run"
    code, err = run_cli(train_args(tiny_dir, prompts, run, "fp32", 4), capsys)
    assert code == WRITE_FAILED
    check_write_fault(err, run, "(Read-only file system)", "step-000002")


@pytest.mark.parametrize(
    "sig, code, what",
    [(signal.SIGTERM, SIGTERM_CODE, "terminated (SIGTERM)"), (signal.SIGINT, SIGINT_CODE, "interrupted (SIGINT)")],
)
def test_a_signal_ends_with_one_line_and_resume_is_bit_exact(tiny_dir, tmp_path, prompts, sig, code, what):
    steps = 4
    ref = cli(train_args(tiny_dir, prompts, tmp_path / "ref", "fp16", steps))
    run = tmp_path / "run"
    victim = cli(train_args(tiny_dir, prompts, run, "fp16", steps))
    wait_for(run / "checkpoints" / "step-000002" / ckpt.MANIFEST, victim)
    victim.send_signal(sig)
    _, err = victim.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert victim.returncode == code, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"unison train: stopped: {what} during step "), lines
    assert f"resume with: unison train --config {run / 'config.yaml'} --resume" in lines[0]
    assert "the newest complete checkpoint is " in lines[0] and not (run / ".unison.lock").read_text()
    resumed = cli(["train", "--config", run / "config.yaml", "--resume"])
    for p in (ref, resumed):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert same(comparable(tmp_path / "ref"), comparable(run))


def test_the_readme_lists_every_exit_code():
    from unison.errors import EXIT_CODES

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for code in EXIT_CODES.values():
        assert f"\n| {code} | " in readme, code


# ---- failed writes of every kind: one path, exit code 3, one line --------------------------------------------------
def test_a_full_disk_in_torch_save_is_the_os_error_it_met(tmp_path):
    # torch.save to a path reports a full disk as RuntimeError("... unexpected pos ..."); checkpoints save through a
    # Python file, so the failure is the OSError (ENOSPC) every write path turns into exit code 3
    from test_reliability import _Model, _Tok

    with tmpfs(tmp_path / "small", "1m") as mount:
        big = {"step": 1, "optimizer": torch.zeros(1_000_000)}  # 4 MB of state into 1 MB
        with pytest.raises(OSError) as caught:
            ckpt.save_checkpoint(mount, 1, _Model(), _Tok(), {"w": torch.ones(3)}, big)
        assert caught.value.errno == errno.ENOSPC
        assert list((mount / "checkpoints").iterdir()) == []  # the failed save left nothing behind


def lora_checkpoint(tmp_path, tiny_dir) -> Path:
    """A LoRA run's checkpoint of the tiny model (q_proj, v_proj, rank 4), written as the trainer writes one."""
    from unison.lora import wrap
    from unison.models import build_tokenizer, load_model

    model = load_model(tiny_dir)
    wrapped = wrap(model, 4, 8.0, ["q_proj", "v_proj"])
    masters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return ckpt.save_checkpoint(tmp_path / "lora-run", 1, wrapped, build_tokenizer(), masters, {"step": 1})


def test_export_of_an_adapter_into_a_full_disk_is_one_line_exit_3(tiny_dir, tmp_path, capsys):
    step = lora_checkpoint(tmp_path, tiny_dir)
    with tmpfs(tmp_path / "small", "8k") as mount:  # room for adapter_config.json, not for the weights
        code, err = run_cli(["export", step, "--adapter", "--out", mount / "adapter"], capsys)
        assert code == WRITE_FAILED and len(err) == 1, err
        assert err[0].startswith("unison export: stopped: cannot write") and "No space left on device" in err[0]
        assert not list(mount.iterdir())  # the half-written folder is removed


class FailingTracker:
    """A tracker that starts, logs step 1, then fails as a tracking server that went away does."""

    def __init__(self, run_dir, config, ids):
        self.calls = 0

    def scalars(self, step, metrics):
        if step >= 2:
            raise ConnectionError("tracking server closed the connection")

    def samples(self, step, rows):
        pass

    def close(self):
        pass


def test_a_tracker_that_fails_mid_run_is_a_failed_write(tiny_dir, tmp_path, prompts, capsys, monkeypatch):
    from unison import report

    monkeypatch.setitem(report.LOGGERS, "tensorboard", (FailingTracker, "tensorboard", "tensorboard"))
    run = tmp_path / "run"
    code, err = run_cli(train_args(tiny_dir, prompts, run, "fp32", 3) + ["run.loggers=[tensorboard]"], capsys)
    assert code == WRITE_FAILED and len(err) == 1, err
    assert err[0].startswith("unison train: stopped: cannot write to the tensorboard tracker (ConnectionError: ")
    assert f"the newest complete checkpoint is {run / 'checkpoints' / 'step-000001'}" in err[0]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ---- run logs with a torn last line (a kill or a full disk mid-append) --------------------------------------------
TORN = '{"step": 1, "rollout/accuracy": 0.25}\n{"step": 2, "rollout/accuracy": 0.5}\n{"step": 3, "rollout/acc'


def test_plot_skips_a_torn_last_line_with_a_notice(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(TORN)
    code, err = run_cli(["plot", run, "--metrics", "rollout/accuracy", "--out", tmp_path / "p.png"], capsys)
    assert code == 0 and (tmp_path / "p.png").is_file()
    assert len(err) == 1 and "line 3, the last, is cut short" in err[0], err
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')  # damage before the end: refused
    code, err = run_cli(["plot", run, "--metrics", "step"], capsys)
    assert code == 2 and "line 2 is not a JSON object" in err[0], err


def test_samples_and_resume_skip_a_torn_last_line_with_a_notice(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    row = {"id": "a", "reward": 1.0, "length": 2, "finished": True, "mismatch": 0.0, "prompt": "1-1:", "response": "0"}
    (run / "samples.jsonl").write_text(json.dumps({"step": 1, "rows": [row]}) + '\n{"step": 2, "ro')
    code, err = run_cli(["samples", run], capsys)
    assert code == 0 and len(err) == 1 and "cut short" in err[0], err
    ckpt.truncate_jsonl(run / "samples.jsonl", 5)
    assert "cut short" in capsys.readouterr().err
    assert (run / "samples.jsonl").read_text().count("\n") == 1


def test_no_held_out_prompts_trains_to_the_end(tiny_dir, tmp_path, prompts, capsys):
    # run.eval_prompts=0: no held-out evaluation (it had divided by zero at the last step, losing the final
    # checkpoint and the last metrics)
    run = tmp_path / "run"
    argv = [a for a in train_args(tiny_dir, prompts, run, "fp32", 2) if not a.startswith("run.eval_prompts")]
    assert run_cli(argv + ["run.eval_prompts=0"], capsys)[0] == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and not any(k.startswith("eval/") for r in rows for k in r)
    assert ckpt.latest_checkpoint(run).name == "step-000002"


def test_sigterm_during_a_slow_reward_is_the_sigterm_stop(tiny_dir, tmp_path, prompts, monkeypatch):
    # the reward function catches what a user's reward raises; SIGTERM arriving inside it is the run's stop, not
    # the reward raising `Terminated`
    mark = tmp_path / "reward-called"
    slow = f"{Path(__file__).parent / 'reward_fixture.py'}:slow"
    argv = [a for a in train_args(tiny_dir, prompts, tmp_path / "run", "fp32", 2) if not a.startswith("data.reward")]
    monkeypatch.setenv("UNISON_TEST_MARK", str(mark))
    victim = cli(argv + [f"data.reward={slow}", "rollout.stop=[a, e, i, o, u, t, n, s, '0', '1', '2', '3']"])
    wait_for(mark, victim)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert victim.returncode == SIGTERM_CODE, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("unison train: stopped: terminated (SIGTERM) during step 1"), lines


def test_write_error_finds_the_failed_write_however_it_was_wrapped():
    from safetensors import SafetensorError

    from unison.errors import TrackerError, UserError, write_error

    full = OSError(errno.ENOSPC, "No space left on device")
    assert write_error(full) is full and write_error(OSError(errno.ENOENT, "No such file")) is None
    wrapped = write_error(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert wrapped.errno == errno.ENOSPC and wrapped.strerror == "No space left on device"
    try:  # torch's zip writer, closing after the failed write into a Python file
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662") from None
    except RuntimeError as exc:
        assert write_error(exc) is None  # `from None`: not a failed write any more
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError("unexpected pos 768 vs 662")  # noqa: B904 - as torch raises it
    except RuntimeError as exc:
        assert write_error(exc) is full
    try:
        try:
            raise OSError(errno.EACCES, "Permission denied")
        except OSError:
            raise UserError("cannot read the adapter") from None
    except UserError as exc:
        assert write_error(exc) is None  # bad input, said as such
    gone = TrackerError("mlflow", ConnectionError("refused"))
    assert write_error(gone) is gone and gone.filename == "to the mlflow tracker"
