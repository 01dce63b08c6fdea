"""The command line: outputs of `unison probe`, and one clear line with exit code 2 for bad input."""

import json
import subprocess
import sys
from pathlib import Path


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "unison.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_probe_writes_table_json_and_figures(tiny_dir, tmp_path):
    out = tmp_path / "probe"
    r = run(
        "probe",
        "--model",
        tiny_dir,
        "--num-prompts",
        2,
        "--samples",
        2,
        "--max-new-tokens",
        16,
        "--out",
        out,
        "--json",
        tmp_path / "p.json",
        "run.progress=false",
    )
    assert r.returncode == 0, r.stderr
    assert "abs_log_ratio_mean" in r.stdout and "bf16÷fp16" in r.stdout
    data = json.loads((tmp_path / "p.json").read_text())
    assert [(x["rollout_precision"], x["train_precision"]) for x in data["results"]] == [
        ("fp32", "fp32"),
        ("fp16", "fp16"),
        ("bf16", "bf16"),
    ]
    for x in data["results"]:
        assert {"abs_log_ratio_mean", "k1", "k2", "k3", "chi2_token", "chi2_seq", "seq_kl"} <= set(x["metrics"])
    assert json.loads((out / "probe.json").read_text()) == data
    for png in ("pi_vs_mu.png", "seq_log_ratio_vs_length.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_probe_mixed_setting(tiny_dir, tmp_path):
    r = run(
        "probe",
        "--model",
        tiny_dir,
        "--rollout-precision",
        "fp32",
        "--train-precision",
        "bf16",
        "--num-prompts",
        1,
        "--samples",
        2,
        "--max-new-tokens",
        8,
        "--out",
        tmp_path,
        "run.progress=false",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "probe.json").read_text())["results"]
    assert [(x["rollout_precision"], x["train_precision"]) for x in res] == [("fp32", "bf16")]


def _bad_inputs(tmp_path, tiny_dir):
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((tiny_dir / "config.json").read_text())
    bad_cfg = tmp_path / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text("{not json")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nocol = tmp_path / "nocol.jsonl"
    nocol.write_text('{"question": "1+1", "answer": "2"}\n')
    noans = tmp_path / "noans.jsonl"
    noans.write_text('{"prompt": "1+1"}\n')
    yaml_bad = tmp_path / "bad.yaml"
    yaml_bad.write_text("optim: [\n")
    m = ["--model", tiny_dir]
    return {
        "missing model dir": ["probe", "--model", tmp_path / "nope"],
        "model dir without config": ["probe", "--model", tmp_path],
        "invalid config.json": ["probe", "--model", bad_cfg],
        "no tokenizer": ["probe", "--model", no_tok],
        "unknown precision": ["probe", *m, "--precisions", "fp8"],
        "unknown device": ["probe", *m, "--device", "tpu"],
        "missing prompt file": ["probe", *m, "--prompts", tmp_path / "missing.jsonl"],
        "empty prompt file": ["probe", *m, "--prompts", empty],
        "prompt column missing": ["probe", *m, "--prompts", nocol],
        "unknown preset": ["train", *m, "--preset", "ppo", "--out", tmp_path / "r1"],
        "unknown objective": ["train", *m, "algorithm.objective=dpo", "--out", tmp_path / "r2"],
        "unknown correction": ["train", *m, "algorithm.correction=tis", "--out", tmp_path / "r3"],
        "malformed yaml": ["train", *m, "--config", yaml_bad],
        "unknown key": ["train", *m, "optim.learning_rate=1"],
        "batch not divisible": ["train", *m, "optim.train_batch_size=24"],
        "answer column missing": ["train", *m, "--data", noans, "--out", tmp_path / "r4"],
        "reward does not import": [
            "train",
            *m,
            "--data",
            nocol,
            "data.prompt_key=question",
            "data.reward=nosuchmodule:fn",
            "--out",
            tmp_path / "r5",
        ],
        "eval unknown engine": ["eval", *m, "--engine", "sglang"],
        "filter bad range": ["filter", *m, "--lo", "0.9", "--hi", "0.1"],
        "plot not a run": ["plot", tmp_path],
    }


def test_bad_input_one_line_exit_2(tiny_dir, tmp_path):
    """A few cases through a real process (tests/test_bad_input.py has every case, in-process)."""
    cases = _bad_inputs(tmp_path, tiny_dir)
    for name in ("missing model dir", "unknown preset", "malformed yaml", "eval unknown engine"):
        r = run(*cases[name])
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr)
        assert "error:" in lines[0], (name, lines[0])
    assert not (tmp_path / "r1").exists()  # nothing written for a bad run


def test_every_listed_bad_input_in_process(tiny_dir, tmp_path, capsys):
    from unison.cli import main

    for name, args in _bad_inputs(tmp_path, tiny_dir).items():
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "error:" in lines[0], (name, code, err)
    for sub in ("r1", "r2", "r3", "r4", "r5"):
        assert not (tmp_path / sub).exists()


def test_existing_run_folder_untouched(tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    r = run("train", "--model", tiny_dir, "--out", run_dir, "run.steps=1")
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_eval_and_filter_and_plot(tiny_dir, tmp_path):
    r = run(
        "eval",
        "--model",
        tiny_dir,
        "--k",
        2,
        "--json",
        tmp_path / "e.json",
        "data.max_prompts=3",
        "rollout.max_new_tokens=8",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["num_prompts"] == 3 and 0 <= res["avg@2"] <= res["pass@2"] <= 1
    r = run(
        "filter",
        "--model",
        tiny_dir,
        "--k",
        2,
        "--num-prompts",
        3,
        "--lo",
        0,
        "--hi",
        1,
        "--out",
        tmp_path / "f.jsonl",
        "rollout.max_new_tokens=8",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"id", "prompt", "answer", "solve_rate"} <= set(x) for x in rows)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        '{"step": 1, "rollout/accuracy": 0.5}\n{"step": 2, "rollout/accuracy": 0.7}\n'
    )
    r = run("plot", run_dir, "--metrics", "rollout/accuracy", "--out", tmp_path / "p.png")
    assert r.returncode == 0, r.stderr and (tmp_path / "p.png").exists()


DEMO = [
    "--steps",
    "2",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=24",
    "optim.train_batch_size=8",
    "run.eval_prompts=4",
    "run.save_every=0",
    "run.progress=false",
]


def test_demo_arms_side_by_side_compute_what_they_compute_one_after_the_other(tmp_path):
    # each arm in its own one-thread process, at once, gives the rows of the arms trained in this process one after
    # the other (one thread); the summary, the table and the figure as before
    import os

    runs = {}
    for side, out in ((True, tmp_path / "side"), (False, tmp_path / "seq")):
        r = subprocess.run(
            [sys.executable, "-m", "unison.cli", "demo", *DEMO, f"side_by_side={str(side).lower()}", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert ("side by side" in r.stdout) == side and "final_train_accuracy" in r.stdout
        assert (out / "comparison.png").is_file() and set(json.loads((out / "summary.json").read_text())) == {
            "fp16",
            "bf16",
        }
        runs[side] = {
            arm: [
                {k: v for k, v in json.loads(x).items() if not k.startswith("perf/")}
                for x in (out / arm / "metrics.jsonl").read_text().splitlines()
            ]
            for arm in ("fp16", "bf16")
        }
    assert runs[True] == runs[False] and len(runs[True]["fp16"]) == 2


def test_a_demo_arm_that_fails_stops_the_demo_with_its_own_line(tmp_path):
    reward = f"{Path(__file__).parent / 'reward_fixture.py'}:raises"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(8)))
    data = [f"data.source={prompts}", "data.subset=", "data.template=plain", f"data.reward={reward}"]
    r = run("demo", *DEMO, *data, "--out", tmp_path / "d")
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "arm stopped" in lines[0] and "reward function" in lines[0], lines


def test_sigterm_stops_a_side_by_side_demo_and_its_arms_with_one_line(tmp_path):
    import signal
    import time

    from unison.runfolder import RunLock

    out = tmp_path / "d"
    args = [sys.executable, "-m", "unison.cli", "demo", *DEMO, "--steps", "60", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not all((out / arm / "metrics.jsonl").is_file() for arm in ("fp16", "bf16")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert [x for x in err.splitlines() if x.startswith("unison")][-1].startswith("unison demo: stopped: terminated")
    assert all(RunLock(out / arm).holder() is None for arm in ("fp16", "bf16"))  # no arm goes on


def test_samples_into_a_closed_pipe_end_quietly(tmp_path):
    # `unison samples RUN | head -1`: the reader leaves; unison ends without a BrokenPipeError traceback
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    row = {"id": "a", "reward": 1.0, "length": 2, "finished": True, "mismatch": 0.0, "prompt": "1-1:", "response": "0"}
    (run_dir / "samples.jsonl").write_text(json.dumps({"step": 1, "rows": [row] * 5000}) + "\n")
    p = subprocess.Popen(
        [sys.executable, "-m", "unison.cli", "samples", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.readline()
    p.stdout.close()  # as `head -1` does
    err = p.stderr.read()
    p.wait(timeout=120)
    assert p.returncode == 141 and err == "", (p.returncode, err[-2000:])


def test_an_unknown_command_or_flag_is_one_line(tmp_path):
    for args, says in ((["trian"], "invalid choice: 'trian'"), (["train", "--stepz", "3"], "--stepz")):
        r = run(*args)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0] and "--help" in lines[0], r.stderr
