"""The `unison` command: probe, train, eval, filter, demo, plot.

Each command has one typed config; `--config FILE.yaml` and trailing `key=value` overrides set it, and a few
common flags are shortcuts for its keys. Bad input prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unison.errors import UserError

COMMANDS = ("probe", "train", "eval", "filter", "demo", "plot")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("overrides", nargs="*", help="dotted key=value settings, e.g. optim.lr=1e-5")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="unison", description="RL fine-tuning of LLMs in which the sampler and the learner agree.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("probe", help="measure the train-inference mismatch offline, per precision")
    _add_common(p)
    p.add_argument("--model", help="checkpoint directory or 'builtin'")
    p.add_argument("--prompts", help="'builtin' or a JSONL/Parquet prompt file")
    p.add_argument("--precisions", help="comma-separated, e.g. fp32,fp16,bf16")
    p.add_argument("--rollout-precision", help="rollout dtype of one mixed setting")
    p.add_argument("--train-precision", help="train dtype of one mixed setting")
    p.add_argument("--samples", type=int, help="responses per prompt")
    p.add_argument("--num-prompts", type=int, help="prompts to sample from")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--engine", help="native or vllm")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--out", help="output folder")
    p.add_argument("--json", dest="json_path", help="also write the results JSON here")
    p.add_argument("--activations", action="store_true", default=None,
                   help="also report each layer's largest |activation| against the FP16 limit 65504")

    for name, text in (("train", "RL fine-tuning"), ("demo", "the paper's sanity test in miniature: fp16 against bf16")):
        p = sub.add_parser(name, help=text)
        _add_common(p)
        p.add_argument("--model", help="checkpoint directory or 'builtin'")
        p.add_argument("--preset", help="algorithm preset, e.g. grpo, grpo-token-tis, gspo")
        p.add_argument("--steps", type=int, help="RL steps")
        p.add_argument("--out", help="run folder")
        p.add_argument("--device", help="auto, cpu or cuda")
        p.add_argument("--engine", help="native or vllm")
        p.add_argument("--seed", type=int)
        p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        p.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
        if name == "train":
            p.add_argument("--precision", help="fp32, bf16 or fp16 for both rollout and training")
            p.add_argument("--epochs", type=int, help="passes over each rollout batch")
            p.add_argument("--data", help="'builtin' or a JSONL/Parquet prompt file")

    p = sub.add_parser("eval", help="accuracy of a model on a prompt set (avg@k, pass@k)")
    _add_common(p)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--k", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--precision")
    p.add_argument("--engine")
    p.add_argument("--device")
    p.add_argument("--json", dest="json_path")

    p = sub.add_parser("filter", help="build a perfectible prompt set: keep prompts solved between lo and hi of the time")
    _add_common(p)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--k", type=int)
    p.add_argument("--num-prompts", type=int, help="consider at most this many prompts")
    p.add_argument("--lo", type=float)
    p.add_argument("--hi", type=float)
    p.add_argument("--out")
    p.add_argument("--engine")
    p.add_argument("--device")

    p = sub.add_parser("plot", help="curves of metrics for several run folders on one figure")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--metrics", default="rollout/accuracy,mismatch/k3", help="comma-separated metric keys")
    p.add_argument("--out", default="plot.png")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window")
    p.add_argument("--log", default="", help="comma-separated metrics drawn on a log scale")
    return ap


SHORTCUTS = {
    "probe": {"model": "model", "prompts": "prompts", "rollout_precision": "rollout_precision",
              "train_precision": "train_precision", "samples": "samples", "num_prompts": "num_prompts",
              "max_new_tokens": "max_new_tokens", "engine": "engine", "device": "device", "out": "out",
              "json_path": "json_path", "activations": "activations"},
    "train": {"model": "model.path", "preset": "algorithm.preset", "steps": "run.steps", "out": "run.out",
              "device": "model.device", "engine": "rollout.engine", "seed": "run.seed", "epochs": "optim.epochs",
              "data": "data.source"},
    "demo": {"model": "model.path", "preset": "algorithm.preset", "steps": "run.steps", "out": "run.out",
             "device": "model.device", "engine": "rollout.engine", "seed": "run.seed"},
    "eval": {"model": "model", "data": "data", "k": "k", "temperature": "temperature", "top_p": "top_p",
             "precision": "precision", "engine": "engine", "device": "device", "json_path": "json_path"},
    "filter": {"model": "model", "data": "data", "k": "k", "num_prompts": "num_prompts", "lo": "lo", "hi": "hi", "out": "out", "engine": "engine",
               "device": "device"},
}  # fmt: skip


def _overrides(args, command: str) -> list:
    pairs = []
    for flag, key in SHORTCUTS.get(command, {}).items():
        value = getattr(args, flag, None)
        if value is not None:
            pairs.append((key, value))
    if command == "train" and getattr(args, "precision", None):
        pairs += [("precision.rollout", args.precision), ("precision.train", args.precision)]
    if command == "probe" and getattr(args, "precisions", None):
        pairs.append(("precisions", [x.strip() for x in args.precisions.split(",") if x.strip()]))
    from unison.config import _split_override

    return pairs + [_split_override(o) for o in args.overrides]


def _config(cls, args, command: str):
    from unison.config import describe, load_config

    if getattr(args, "help_config", False):
        print("\n".join(describe(cls)))
        raise SystemExit(0)
    return load_config(cls, args.config, dict(_overrides(args, command)))


def cmd_probe(args) -> None:
    from unison.probe import ProbeConfig, format_table, run_probe

    cfg = _config(ProbeConfig, args, "probe")
    results = run_probe(cfg)
    print(format_table(results))
    if cfg.activations:
        from unison.overflow import format_activation_table

        print("\nlargest |activation| per layer (fp32 forward over the prompts and one sampled response each):")
        print(format_activation_table(json.loads((Path(cfg.out) / "probe.json").read_text())["activations"]))
    print(f"wrote {Path(cfg.out) / 'probe.json'}, {Path(cfg.out) / 'pi_vs_mu.png'}, "
          f"{Path(cfg.out) / 'seq_log_ratio_vs_length.png'}" + (f", {cfg.json_path}" if cfg.json_path else ""))  # fmt: skip


def cmd_train(args) -> None:
    from unison.config import TrainConfig
    from unison.trainer import train

    cfg = _config(TrainConfig, args, "train")
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"done: {run_dir}/metrics.jsonl, checkpoints in {run_dir}/checkpoints")


def cmd_eval(args) -> None:
    from unison.commands import EvalConfig, run_eval

    cfg = _config(EvalConfig, args, "eval")
    result = run_eval(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}, indent=1))


def cmd_filter(args) -> None:
    from unison.commands import FilterConfig, run_filter

    cfg = _config(FilterConfig, args, "filter")
    run_filter(cfg)


def cmd_demo(args) -> None:
    from unison.demo import DemoConfig, run_demo

    cfg = _config(DemoConfig, args, "demo")
    run_demo(cfg, resume=args.resume, overwrite=args.overwrite)


def cmd_plot(args) -> None:
    from unison.report import plot_runs

    for run in args.runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            raise UserError(f"{run!r} has no metrics.jsonl; give run folders written by `unison train`")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    path = plot_runs(args.runs, metrics, args.out, smooth=args.smooth, log_scale=args.log.split(","))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        globals()[f"cmd_{args.command}"](args)
    except UserError as exc:
        print(f"unison {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"unison {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - errors the run itself raises (loss-scale floor, sync, overflow)
        from unison.learner import WeightSyncError
        from unison.overflow import ActivationOverflowError
        from unison.precision import LossScaleFloorError

        if isinstance(exc, (LossScaleFloorError, WeightSyncError, ActivationOverflowError)):
            print(f"unison {args.command}: stopped: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
