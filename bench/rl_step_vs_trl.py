"""A full RL step, unison against TRL's GRPOTrainer, on the same model, prompts and settings.

Both sides train the same checkpoint, `--model builtin` (the built-in 0.8M-parameter Qwen2,
`src/unison/assets/countdown-tiny`) or `--model 30m` (the 25M-parameter random Qwen2 of bench/bench_models.py with
the built-in tokenizer, built once and saved into a temporary folder that both tools load), on the built-in task's
perfectible countdown prompts with the same settings: `--prompts` prompts x `--group` samples a step, at most
`--new-tokens` new tokens at temperature 1 (no top-k/top-p), one optimizer step per rollout batch over all its
completions in one micro-batch, AdamW at `--lr`, the same precision, no KL term, token-mean loss (unison `grpo`,
TRL `loss_type="dapo"`), reward 1 for a correct final answer, no gradient checkpointing (TRL's default turns it on;
unison keeps activations, so TRL runs without it here to do the same arithmetic).

A step is what each tool does per rollout batch: unison samples with its native engine, recomputes log pi_old,
measures the mismatch, updates and syncs the engine with a checksum; TRL samples with `model.generate()` and
updates (with one iteration per batch it skips the old-log-prob pass). Timings are steady-state: each block runs
`--warmup` steps first and times the next `--steps`. Blocks alternate unison, TRL, unison, TRL (`--pairs` pairs);
the ratio of each pair is unison's completions/s over TRL's.

TRL is not a dependency of unison; install it beside unison with the pinned versions:

    python3 -m venv .venv-bench && . .venv-bench/bin/activate
    pip install torch==2.13.0 -r bench/requirements.txt -e .
    python bench/rl_step_vs_trl.py [--model builtin|30m] [--pairs 3] [--steps 4] [--precision fp32] [--threads N]
    python bench/rl_step_vs_trl.py --quick      # one pair of 2 timed steps, 16 completions of at most 64 tokens
    python bench/rl_step_vs_trl.py --model 30m  # a 25M-parameter model: the learner's share of the step grows
    python bench/rl_step_vs_trl.py --shots 6     # few-shot prompts: 6 solved held-out examples before each prompt

With `--shots K` every prompt starts with the same K solved examples from the task's test split (a few-shot
header, a few hundred tokens), so prompts are long and each is shared by the `--group` samples of it: the setting
where unison runs a prompt once per group in its engine and its learner (TRL's `generate()` and forward run it for
every sample). Both tools get the same prompts and reward.

Writes its table into docs/benchmarks.md (section `rl-step-<precision>`, `rl-step-<precision>-<model>` for a model
other than the built-in one, then `-shots<K>` with `--shots`; a --quick run prints it instead and writes nothing) and
ends with a line `RESULT ratio_vs_trl=<median> ...`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from docsection import bench_parser, count, machine_description, parse_bench_args, whole, write_section  # noqa: E402
from real_task import QUESTIONS, keyword, write_task  # noqa: E402

REAL = ["smollm2-135m-instruct"]  # trained models, fetched (`unison fetch NAME`), on short chat questions
MODELS = ["builtin", "30m", *REAL]


def model_folder(name: str, tmp: str) -> tuple[Path, int]:
    """The checkpoint both tools train and its parameter count: the built-in one, or random Qwen2 `name` of
    bench/bench_models.py saved with the built-in tokenizer into `tmp`."""
    from bench_models import build

    from unison.models import build_tokenizer, load_model, resolve_model_dir, save_model

    if name in REAL:
        path = resolve_model_dir(name)
        return path, sum(t.numel() for t in load_model(path).parameters())
    model = build(name)
    params = sum(p.numel() for p in model.parameters())
    if name == "builtin":
        return resolve_model_dir("builtin"), params
    return save_model(model, build_tokenizer(), Path(tmp) / name), params


def examples(args, seed: int) -> list[dict]:
    """The perfectible training prompts (with `--shots`, after the few-shot header) and their answers; for a real
    model, bench/real_task.py's questions as chats."""
    if args.model in REAL:
        return [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in QUESTIONS]
    from unison.setup import read_subset
    from unison.tasks import load_task

    task = load_task("builtin")
    header = "".join(f"{e.prompt}{task.reference(e)}\n" for e in task.examples("test", n=args.shots, seed=1))
    keep = read_subset("builtin")
    rows = task.examples("train", seed=seed)
    return [{"prompt": header + e.prompt, "answer": e.answer} for e in rows if e.id in keep]


def unison_block(args, warmup: int, steps: int, seed: int) -> dict:
    import json

    from unison.config import TrainConfig, load_config
    from unison.report import read_metrics
    from unison.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        data = {"data.subset": "builtin"}
        if args.model in REAL:  # the questions' file, its chat template and the keyword reward
            path, reward = write_task(tmp)
            data = {"data.source": str(path), "data.reward": reward, "data.template": "chat"}
        elif args.shots:  # the same prompts as a prompt file, rewarded as the built-in task
            path = Path(tmp) / "prompts.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in examples(args, seed)))
            data = {"data.source": str(path), "data.reward": "countdown", "data.template": "plain"}
        cfg = load_config(
            TrainConfig,
            None,
            {
                "model.path": str(args.model_dir),
                **data,
                "precision.rollout": args.precision,
                "precision.train": args.precision,
                "rollout.prompts_per_step": args.prompts,
                "rollout.group_size": args.group,
                "rollout.max_new_tokens": args.new_tokens,
                "rollout.temperature": 1.0,
                "algorithm.preset": "grpo",
                "optim.lr": args.lr,
                "optim.train_batch_size": args.prompts * args.group,
                "optim.micro_batch_size": args.prompts * args.group,
                "optim.epochs": 1,
                "run.steps": warmup + steps,
                "run.seed": seed,
                "run.out": str(Path(tmp) / "run"),
                "run.eval_every": 0,
                "run.eval_prompts": 1,
                "run.save_every": 0,
                "run.progress": False,
                "run.loggers": ["jsonl"],
            },
        )
        run_dir = train(cfg, overwrite=True, quiet=True)
        rows = read_metrics(run_dir)[warmup:]
    keys = {
        "rollout": "perf/rollout_seconds",
        "recompute": "perf/recompute_seconds",
        "learn": "perf/learn_seconds",
        "sync": "perf/sync_seconds",
    }  # recompute only where a batch gives several updates
    phases = {k: statistics.mean(r[key] for r in rows) for k, key in keys.items() if key in rows[0]}
    seconds = sum(r["perf/step_seconds"] for r in rows)
    tokens = sum(r["rollout/response_length_mean"] * args.prompts * args.group for r in rows)
    return {
        "seconds": seconds,
        "completions": len(rows) * args.prompts * args.group,
        "tokens": tokens,
        "accuracy": statistics.mean(r["rollout/accuracy"] for r in rows),
        "phases": phases,
    }


def trl_block(args, warmup: int, steps: int, seed: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from unison.models import load_tokenizer
    from unison.tasks.countdown import final_answer

    model_dir = args.model_dir
    tokenizer = load_tokenizer(model_dir)
    data = Dataset.from_list(examples(args, seed))

    def correct(completions, answer, **_):
        if args.model in REAL:  # chats: the keyword reward of bench/real_task.py on each completion's text
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [keyword(t, a) for t, a in zip(texts, answer)]
        return [float(final_answer(c) == a) for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks, self.lengths, self.rewards = [], [], []

        def on_step_begin(self, a, state, control, **kw):
            self.marks.append([time.perf_counter(), None])

        def on_step_end(self, a, state, control, **kw):
            self.marks[-1][1] = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])
                self.rewards.append(logs.get("reward", float("nan")))

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.prompts * args.group,
            num_generations=args.group,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_iterations=1,
            max_completion_length=args.new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=0.0,
            loss_type="dapo",
            max_steps=warmup + steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=args.precision == "bf16",
            fp16=args.precision == "fp16",
            seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
            gradient_checkpointing=False,  # TRL's default is True: it would recompute activations unison keeps
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        clock = Clock()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=correct,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)  # one dict per step on stdout otherwise
        trainer.train()
    timed = clock.marks[warmup:]
    lengths = clock.lengths[-steps:]  # one log per step: the timed steps are the last ones
    return {
        "seconds": sum(b - a for a, b in timed),
        "completions": len(timed) * args.prompts * args.group,
        "tokens": sum(lengths) * args.prompts * args.group,
        "accuracy": statistics.mean(clock.rewards[-steps:]) if clock.rewards else float("nan"),
    }


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="builtin",
        choices=MODELS,
        help="the checkpoint both tools train: the built-in model or bench_models' random 30m",
    )
    ap.add_argument("--pairs", type=count, default=3)
    ap.add_argument("--steps", type=count, default=4, help="timed steps per block")
    ap.add_argument("--warmup", type=whole, default=1, help="untimed steps at the start of each block")
    ap.add_argument("--prompts", type=count, default=8)
    ap.add_argument("--group", type=count, default=8)
    ap.add_argument("--new-tokens", type=count, default=128)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--shots", type=whole, default=0, help="solved held-out examples before every prompt")
    args = parse_bench_args(ap, {"pairs": 1, "steps": 2, "prompts": 4, "group": 4, "new_tokens": 64})
    import transformers
    import trl

    machine = machine_description()
    rows = []
    with tempfile.TemporaryDirectory(prefix="unison-rl-step-") as tmp:
        args.model_dir, params = model_folder(args.model, tmp)  # built once: both tools, every pair, the same weights
        print(f"model {args.model}: {params / 1e6:.1f}M parameters, {args.model_dir}", flush=True)
        for pair in range(args.pairs):
            u = unison_block(args, args.warmup, args.steps, seed=pair)
            t = trl_block(args, args.warmup, args.steps, seed=pair)
            ratio = (u["completions"] / u["seconds"]) / (t["completions"] / t["seconds"])
            rows.append((u, t, ratio))
            print(
                f"pair {pair}: unison {u['completions'] / u['seconds']:.1f} completions/s "
                f"({u['tokens'] / u['seconds']:.0f} tok/s), TRL {t['completions'] / t['seconds']:.1f} "
                f"completions/s ({t['tokens'] / t['seconds']:.0f} tok/s): ratio {ratio:.2f}; accuracy "
                f"{u['accuracy']:.2f} / {t['accuracy']:.2f}; unison seconds per phase {u['phases']}",
                flush=True,
            )
    ratios = [r for _, _, r in rows]
    median = statistics.median(ratios)
    B = args.prompts * args.group
    described = {
        "builtin": "Built-in model",
        "30m": f"Random Qwen2 `{args.model}` of bench/bench_models.py with the built-in tokenizer",
    }.get(args.model, f"Model `{args.model}`")
    task = (
        "bench/real_task.py's chat questions and keyword reward"
        if args.model in REAL
        else "the built-in task's perfectible prompts"
    )
    shots = ""
    if args.shots:
        from unison.models import load_tokenizer, resolve_model_dir

        tok = load_tokenizer(resolve_model_dir("builtin"))  # the tokenizer of every --model
        tokens = [len(tok(row["prompt"]).input_ids) for row in examples(args, 0)]
        shots = (
            f" after a header of {args.shots} solved held-out examples (prompts of {min(tokens)}-{max(tokens)} tokens)"
        )
    lines = [
        f"Command: `python bench/rl_step_vs_trl.py{f' --model {args.model}' if args.model != 'builtin' else ''}"
        f" --pairs {args.pairs} --steps {args.steps} --precision "
        f"{args.precision} --prompts {args.prompts} --group {args.group} --new-tokens {args.new_tokens}"
        f"{f' --shots {args.shots}' if args.shots else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}` (TRL {trl.__version__}, transformers "
        f"{transformers.__version__}, torch {torch.__version__}, PyTorch threads: {torch.get_num_threads()}).",
        "",
        f"{described} ({params / 1e6:.1f}M parameters), {task}{shots}, "
        f"{args.prompts} prompts x {args.group} samples = {B} "
        f"completions of at most {args.new_tokens} tokens a step, {args.precision}, one update per step, "
        f"lr {args.lr:g}; {args.steps} timed steps per block after {args.warmup} untimed, blocks alternating "
        "unison, TRL.",
        "",
        "| pair | unison s/step | unison completions/s | unison tok/s | TRL s/step | TRL completions/s | TRL tok/s "
        "| ratio (completions/s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, (u, t, ratio) in enumerate(rows):
        lines.append(
            f"| {i} | {u['seconds'] / args.steps:.3f} | {u['completions'] / u['seconds']:.1f} | "
            f"{u['tokens'] / u['seconds']:.0f} | {t['seconds'] / args.steps:.3f} | "
            f"{t['completions'] / t['seconds']:.1f} | "
            f"{t['tokens'] / t['seconds']:.0f} | {ratio:.2f} |"
        )
    spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
    lines += ["", f"Median ratio {median:.2f} (range {spread} over {len(ratios)} pairs)."]
    model = f"-{args.model}" if args.model != "builtin" else ""
    section = f"rl-step-{args.precision}{model}" + (f"-shots{args.shots}" if args.shots else "")
    title = (
        f"Full RL step against TRL's GRPOTrainer ({args.precision}"
        + (f", model {args.model}" if model else "")
        + (f", {args.shots}-shot" if args.shots else "")
        + ")"
    )
    write_section(args.doc, section, title, lines, machine)
    u_tok = statistics.median(u["tokens"] / u["seconds"] for u, _, _ in rows)
    t_tok = statistics.median(t["tokens"] / t["seconds"] for _, t, _ in rows)
    print(
        f"RESULT ratio_vs_trl={median:.2f} ratio_min={min(ratios):.2f} ratio_max={max(ratios):.2f} "
        f"unison_tok_s={u_tok:.0f} trl_tok_s={t_tok:.0f} precision={args.precision} model={args.model}"
    )


if __name__ == "__main__":
    main()
