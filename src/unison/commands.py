"""`unison eval`, `unison filter` and `unison export`: a model sampled on a prompt set and scored, and a checkpoint
written as a plain Hugging Face model folder.

`eval` and `filter` stand on the same set-up as `train` (`unison.setup`), with the same config sections: the model
in `model.*`, the prompts in `data.*`, the sampling in `rollout.*` (rollout.group_size responses per prompt: the k of
avg@k and pass@k), the sampling dtype in `precision.rollout`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from unison import threads
from unison.config import (
    DataConfig,
    ModelConfig,
    PrecisionConfig,
    RolloutConfig,
    RunBase,
    check,
    doc,
    validate_sections,
)
from unison.evaluation import evaluate, score
from unison.precision import parse_precision
from unison.runfolder import check_output_file
from unison.setup import Setup, build


@dataclass
class EvalSection:
    split: str = doc(
        "test",
        "split of the built-in task or the word problems (a prompt file is one split: its rows)",
        choices=("test", "train"),
    )
    k: list = doc(
        [], "the k of each pass@k, estimated without bias from the n = rollout.group_size samples per prompt (empty: n)"
    )


@dataclass
class EvalConfig:
    """`unison eval`: avg@n and pass@k from n = rollout.group_size samples per prompt (`--n`), for each k of eval.k
    (`--k 1,4,8`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=lambda: PrecisionConfig(rollout="fp32", train="fp32"))
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(group_size=4))
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunBase = field(default_factory=lambda: RunBase(out=""))

    def validate(self):
        validate_sections(self)
        n = self.rollout.group_size
        check(
            all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.eval.k),
            "eval.k",
            "must be a list of positive integers, e.g. --k 1,4,8",
        )
        check(
            max(self.eval.k, default=1) <= n,
            "eval.k",
            f"pass@{max(self.eval.k, default=1)} needs at least that "
            f"many samples per prompt, but n = rollout.group_size is {n}; raise --n or lower --k",
        )
        return self


@dataclass
class FilterSection:
    lo: float = doc(0.2, "keep prompts solved at least this often")
    hi: float = doc(0.8, "... and at most this often")


@dataclass
class FilterConfig:
    """`unison filter`: the paper's perfectible-set construction (rollout.group_size samples per prompt; the paper
    used 40); the kept prompts go to run.out as JSONL."""

    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=lambda: PrecisionConfig(rollout="fp32", train="fp32"))
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(group_size=8))
    filter: FilterSection = field(default_factory=FilterSection)
    run: RunBase = field(default_factory=lambda: RunBase(out="perfectible.jsonl"))

    def validate(self):
        validate_sections(self)
        check(0 <= self.filter.lo <= self.filter.hi <= 1, "filter.lo", "need 0 <= filter.lo <= filter.hi <= 1")
        check(bool(self.run.out), "run.out", "give the output JSONL file")
        return self


def open_sampler(cfg) -> tuple[Setup, object]:
    """The set-up of a sampling command and its rollout engine (precision.rollout), every input checked first."""
    dtype = parse_precision(cfg.precision.rollout)
    s = build(cfg.model, cfg.data, cfg.rollout, dtypes=(dtype,), seed=cfg.run.seed)
    threads.configure(cfg.run.threads)
    return s, dtype


def run_eval(cfg: EvalConfig) -> dict:
    if cfg.run.out:
        check_output_file(cfg.run.out, "run.out (the eval JSON)")
    s, dtype = open_sampler(cfg)
    split = cfg.eval.split if cfg.data.source in ("builtin", "countdown", "word-problems") else "train"
    examples = s.examples(split, cfg.data.max_prompts or None, subset=True)
    prompts = s.encode(examples)
    n = cfg.rollout.group_size
    with s.engine(dtype) as engine:
        engine.overflow_guard(cfg.precision.on_activation_overflow, "rollout engine (decode)")
        print(f"unison eval: {s.describe(engine)} | {len(examples)} prompts x {n} samples", flush=True)
        result = evaluate(
            engine, s.task, s.tokenizer, examples, prompts, s.sampling(), n=n, ks=cfg.eval.k, progress=cfg.run.progress
        )
    result = {
        "model": cfg.model.path,
        "data": cfg.data.source,
        "n": n,
        "temperature": cfg.rollout.temperature,
        "top_p": cfg.rollout.top_p,
        "precision": cfg.precision.rollout,
        **result,
    }
    if cfg.run.out:
        Path(cfg.run.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.run.out).write_text(json.dumps(result, indent=1))
    return result


def run_filter(cfg: FilterConfig, batch_size: int = 256) -> list[dict]:
    """Sample k responses per prompt; keep the prompts solved between lo and hi of the time (both inclusive)."""
    check_output_file(cfg.run.out, "run.out (the filter's JSONL)")
    s, dtype = open_sampler(cfg)
    examples = s.examples("train", cfg.data.max_prompts or None, subset=True)
    prompts = s.encode(examples)
    k, params = cfg.rollout.group_size, s.sampling()
    lo, hi = cfg.filter.lo, cfg.filter.hi
    rows = [i for i in range(len(examples)) for _ in range(k)]
    solved = [0.0] * len(examples)
    with s.engine(dtype) as engine:
        engine.overflow_guard(cfg.precision.on_activation_overflow, "rollout engine (decode)")
        print(f"unison filter: {s.describe(engine)} | {len(examples)} prompts x {k} samples", flush=True)
        bar = tqdm(total=len(rows), desc="filter", unit="seq", disable=not cfg.run.progress)
        for start in range(0, len(rows), batch_size):
            threads.adapt()
            part = rows[start : start + batch_size]
            ro = engine.generate([prompts[i] for i in part], params)
            rewards, _ = score(s.task, s.tokenizer, ro, [examples[i] for i in part])
            for i, r in zip(part, rewards.tolist()):
                solved[i] += r / k
            bar.update(len(part))
        bar.close()
    kept = [
        {"id": ex.id, "prompt": ex.prompt, "answer": ex.answer, "solve_rate": rate}
        for ex, rate in zip(examples, solved)
        if lo <= rate <= hi
    ]
    out = Path(cfg.run.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    tmp.replace(out)
    mean = sum(solved) / max(len(solved), 1)
    print(
        f"kept {len(kept)} of {len(examples)} prompts solved in [{lo}, {hi}] of {k} samples "
        f"(mean solve rate {mean:.3f}); wrote {out}"
    )
    return kept
