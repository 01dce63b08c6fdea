"""One RL step of a real model, part by part: where the time goes, per precision.

The step is `unison train`'s (`unison.step.RLStep`, built as the command builds it) on `--model` (default
SmolLM2-135M-Instruct, `unison fetch smollm2-135m-instruct`): `--prompts` short chat questions x `--group` samples
of at most `--new-tokens` tokens through the model's chat template, a reward that varies with the response
(bench/real_task.py), one update over the batch. After `--warmup` untimed steps, `--steps` steps are timed with
clocks around the parts below (wall and CPU seconds of the process's thread; the clocks add a few calls per layer,
no profiler):

    rollout       the engine's generate: its weights packed for decoding, the prefill, the decode steps (the LM head
                  over the vocabulary apart), sampling, the rest (stop checks, dropping finished rows)
    recompute     log pi_old without gradient, where the step has its own pass for it
    update        forward through the model (the LM head apart), the log-probs over the vocabulary (fp32 upcast,
                  log-softmax, gather) and the entropy, the backward pass (the log-probs' and the LM head's apart),
                  the optimizer (unscale, clip, AdamW, the cast back to the train dtype)
    sync          the master weights exported and loaded into the engine, both checksums

    python bench/real_step_profile.py [--model smollm2-135m-instruct] [--precisions fp32,fp16] [--prompts 4]
        [--group 4] [--new-tokens 128] [--steps 2] [--threads 1]

Writes its table into docs/benchmarks.md (section `real-step-profile`; a --quick run prints it) and ends with a line
`RESULT step_s_<precision>=... decode_tok_s_<precision>=... learner_tok_s_<precision>=...`.
"""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from docsection import bench_parser, count, listed, machine_description, parse_bench_args, whole, write_section  # noqa: E402
from real_task import train_settings  # noqa: E402

import unison.learner as learner_module  # noqa: E402
import unison.rollout.native as native  # noqa: E402
import unison.sampling as sampling  # noqa: E402
from unison.matmul import Fp32Linear, gemm_kernel, matmul_mode  # noqa: E402
from unison.precision import parse_precision  # noqa: E402

# (key, label, parent key): the rows of the table, parts under their parent
PARTS = [
    ("rollout", "rollout (the engine's generate)", None),
    ("rollout/pack", "weights packed for decoding", "rollout"),
    ("rollout/prefill", "prefill", "rollout"),
    ("rollout/steps", "decode steps, without the LM head", "rollout"),
    ("rollout/head", "LM head over the vocabulary (decode)", "rollout"),
    ("rollout/sample", "sampling (log-softmax, draw)", "rollout"),
    ("rollout/rest", "the rest (stop checks, finished rows dropped)", "rollout"),
    ("recompute", "recompute of log pi_old (no gradient)", None),
    ("update", "update (one optimizer step)", None),
    ("update/forward", "forward, without the LM head", "update"),
    ("update/head", "LM head forward", "update"),
    ("update/logprobs", "log-probs over the vocabulary, forward", "update"),
    ("update/entropy", "entropy over the vocabulary", "update"),
    ("update/backward", "backward, without the two below", "update"),
    ("update/logprobs-backward", "log-probs over the vocabulary, backward", "update"),
    ("update/head-backward", "LM head backward (input and weight gradients)", "update"),
    ("update/optimizer", "optimizer (unscale, clip, AdamW, cast back)", "update"),
    ("update/rest", "the rest (batching, loss)", "update"),
    ("sync", "weight sync (export, load)", None),
    ("sync/checksum", "checksums (learner's export, engine)", "sync"),
    ("step", "whole step", None),
]


class Clocks:
    """Wall and CPU seconds of named parts, summed over calls. A part is keyed under the top-level part running when
    it is entered (`top`), so the same function counts apart in the recompute and in the update."""

    def __init__(self):
        self.wall, self.cpu = defaultdict(float), defaultdict(float)
        self.top = ""

    def add(self, key: str, wall: float, cpu: float) -> None:
        self.wall[key] += wall
        self.cpu[key] += cpu

    def timed(self, part: str, f, top: bool = False, when=None):
        """f, timed as `part` (a top-level part with `top`; only the calls for which `when(*args)` holds)."""

        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            if when is not None and not when(*args):
                return f(*args, **kwargs)
            key = part if top else f"{self.top}/{part}"
            was = self.top
            if top:
                self.top = part
            w, c = time.perf_counter(), time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                self.add(key, time.perf_counter() - w, time.thread_time() - c)
                self.top = was

        return wrapper

    def wrap(self, owner, name: str, part: str, top: bool = False, when=None, static: bool = False) -> None:
        f = owner.__dict__[name] if static else getattr(owner, name)
        f = f.__func__ if static else f
        timed = self.timed(part, f, top, when)
        setattr(owner, name, staticmethod(timed) if static else timed)


def instrument(clocks: Clocks, learner, engine) -> None:
    """Clocks around the parts of the step (the table's rows)."""
    c = clocks
    c.wrap(engine, "generate", "rollout", top=True)
    c.wrap(native.DecodeWeights, "__init__", "pack")
    c.wrap(native._StaticDecode, "prefill", "prefill")
    c.wrap(native._StaticDecode, "step", "steps")
    c.wrap(native._FlatStep, "linear", "head", when=lambda step, x, packed, *rest: packed is step.head)
    c.wrap(native, "sample", "sample")
    c.wrap(learner, "recompute", "recompute", top=True)
    c.wrap(learner, "update", "update", top=True)
    c.wrap(learner.forward, "response_logits", "forward")
    c.wrap(sampling, "_chunked_logprobs", "logprobs")
    c.wrap(learner_module, "chunked_entropy", "entropy")
    c.wrap(learner_module, "backward", "backward")
    c.wrap(sampling.ChunkedTokenLogprobs, "backward", "logprobs-backward", static=True)
    vocab = learner.model.get_output_embeddings().weight.shape[0]
    c.wrap(Fp32Linear, "backward", "head-backward", when=lambda ctx, g: g.shape[-1] == vocab, static=True)
    c.wrap(learner_module, "step", "optimizer")
    c.wrap(learner, "sync", "sync", top=True)
    c.wrap(learner_module, "checksum", "checksum")
    c.wrap(engine, "weights_checksum", "checksum")
    head, start = learner.model.get_output_embeddings(), {}

    def before(module, args):
        start["t"] = (time.perf_counter(), time.thread_time())

    def after(module, args, out):
        w, cpu = start.pop("t")
        c.add(f"{c.top}/head", time.perf_counter() - w, time.thread_time() - cpu)

    head.register_forward_pre_hook(before)
    head.register_forward_hook(after)


def build(args, precision: str, folder: str):
    """The step as `unison train` builds it: (RLStep, prompt stream, shuffle generator, learner, engine). `args` gives
    the model, the step's size and threads, and (`settings`, optional) more `unison train` settings."""
    from unison import threads
    from unison.config import TrainConfig, load_config
    from unison.step import RLStep
    from unison.trainer import PromptStream, build_run

    settings = train_settings(args.model, folder, args.prompts, args.group, args.new_tokens, precision, args.threads)
    settings += getattr(args, "settings", [])  # more `unison train` settings (LoRA, ...)
    cfg = load_config(TrainConfig, None, settings)
    threads.configure(cfg.run.threads)
    run = build_run(cfg)
    s = run.setup
    model = s.policy_model(cfg.lora)
    learner = s.learner(run.policy, model=model, optim=cfg.optim, precision=cfg.precision, moe=cfg.moe)
    engine = s.engine(run.policy.rollout, seed=cfg.run.seed, lm_head=cfg.precision.lm_head)
    step = RLStep(cfg, run, learner, engine)
    return step, PromptStream(run.train_examples, cfg.run.seed), torch.Generator().manual_seed(0), learner, engine


def profile(args, precision: str) -> dict:
    """Per timed step: {key: (wall s, CPU s)}, with the step's response tokens under `tokens`."""
    with tempfile.TemporaryDirectory() as folder:
        step, stream, shuffle, learner, engine = build(args, precision, folder)
        for i in range(args.warmup):
            step(i, stream, shuffle)
        clocks = Clocks()
        instrument(clocks, learner, engine)
        steps = []
        for i in range(args.warmup, args.warmup + args.steps):
            clocks.wall.clear(), clocks.cpu.clear()
            w, c = time.perf_counter(), time.thread_time()
            metrics = step(i, stream, shuffle)
            clocks.add("step", time.perf_counter() - w, time.thread_time() - c)
            row = {k: (clocks.wall[k], clocks.cpu[k]) for k in clocks.wall}
            row["tokens"] = metrics["rollout/response_length_mean"] * args.prompts * args.group
            steps.append(row)
            print(f"{precision} step {i}: {row['step'][0]:.1f} s ({row['step'][1]:.1f} CPU s)", flush=True)
        engine.close()
    return steps


def exclusive(row: dict) -> dict:
    """Each part's own time: a parent less its timed children (the decode steps less the LM head, the backward
    less its two timed parts)."""
    out = {k: list(v) for k, v in row.items() if k != "tokens"}
    for inner, outer in (
        ("rollout/head", "rollout/steps"),
        ("update/head", "update/forward"),
        ("update/logprobs-backward", "update/backward"),
        ("update/head-backward", "update/backward"),
    ):
        if inner in out and outer in out:
            out[outer] = [a - b for a, b in zip(out[outer], out[inner])]
    for top in ("rollout", "update"):
        if top in out:
            parts = [v for k, v in out.items() if k.startswith(top + "/")]
            out[f"{top}/rest"] = [out[top][i] - sum(v[i] for v in parts) for i in (0, 1)]
    return out


def table(args, results: dict) -> tuple[list[str], dict]:
    precisions = list(results)
    summary = {}
    header = "| part | " + " | ".join(f"{p} s/step (CPU s) | {p} tok/s" for p in precisions) + " |"
    lines = [header, "| --- | " + " | ".join("--- | ---" for _ in precisions) + " |"]
    med = {p: _medians(rows) for p, rows in results.items()}
    for key, label, parent in PARTS:
        if not any(key in m for m in med.values()):
            continue
        cells = []
        for p in precisions:
            if key not in med[p]:
                cells.append("- | -")
                continue
            (wall, cpu), tokens = med[p][key], med[p]["tokens"]
            cells.append(f"{wall:.2f} ({cpu:.2f}) | {tokens / wall:.0f}")
        name = f"&nbsp;&nbsp;{label}" if parent else f"**{label}**"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for p in precisions:
        m = med[p]
        summary[p] = {
            "step_s": m["step"][0],
            "decode_tok_s": m["tokens"] / m["rollout"][0],
            "learner_tok_s": m["tokens"] / m["update"][0],
        }
    return lines, summary


def _medians(rows: list[dict]) -> dict:
    parts = [exclusive(r) for r in rows]
    keys = set().union(*parts)
    out = {k: tuple(statistics.median(p[k][i] for p in parts if k in p) for i in (0, 1)) for k in keys}
    out["tokens"] = statistics.median(r["tokens"] for r in rows)
    return out


def main() -> None:
    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precisions", type=listed(["fp32", "fp16", "bf16"]), default=["fp32", "fp16"])
    ap.add_argument("--prompts", type=count, default=4)
    ap.add_argument("--group", type=count, default=4)
    ap.add_argument("--new-tokens", type=count, default=128)
    ap.add_argument("--steps", type=count, default=2, help="timed steps per precision")
    ap.add_argument("--warmup", type=whole, default=1, help="untimed steps first")
    args = parse_bench_args(ap, {"precisions": ["fp32"], "new_tokens": 32, "steps": 1})
    args.threads = args.threads or torch.get_num_threads()
    machine = machine_description()
    results = {p: profile(args, p) for p in args.precisions}
    lines, summary = table(args, results)
    modes = ", ".join(f"{p}: {matmul_mode('auto', torch.device('cpu'), parse_precision(p))}" for p in results)
    intro = [
        f"Command: `python bench/real_step_profile.py --model {args.model} --precisions {','.join(args.precisions)} "
        f"--prompts {args.prompts} --group {args.group} --new-tokens {args.new_tokens} --steps {args.steps} "
        f"--threads {args.threads}` (PyTorch threads: {torch.get_num_threads()}).",
        "",
        f"`unison train`'s step on {args.model}: {args.prompts} chat questions x {args.group} samples of at most "
        f"{args.new_tokens} tokens, one update; medians of {args.steps} timed steps after {args.warmup} untimed "
        f"(tok/s: the step's response tokens over the part's wall-clock time). model.matmul=auto ({modes}), "
        f"model.gemm=auto ({gemm_kernel('auto', 'cpu')}).",
        "",
    ]
    title = f"One RL step of {Path(args.model).name}, part by part"
    write_section(args.doc, "real-step-profile", title, intro + lines, machine)
    print("RESULT " + " ".join(f"{k}_{p}={v:.2f}" for p, s in summary.items() for k, v in s.items()))


if __name__ == "__main__":
    main()
