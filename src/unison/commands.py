"""`unison eval` and `unison filter`: sampling a model on a prompt set and scoring it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from unison.config import check, doc
from unison.evaluation import encode_all, evaluate, score
from unison.models import eos_token_ids, load_tokenizer, resolve_model_dir
from unison.precision import PRECISIONS, check_dtype_supported, parse_precision, resolve_device
from unison.rollout import make_engine
from unison.rollout.base import SamplingParams
from unison.tasks import load_task


@dataclass
class SampleSetConfig:
    """What `eval` and `filter` share: a model sampled on a prompt set."""

    model: str = doc("builtin", "checkpoint directory (a run's checkpoints/step-N works) or 'builtin'")
    data: str = doc("builtin", "'builtin' (the countdown task) or a JSONL/Parquet prompt file")
    prompt_key: str = doc("prompt", "column holding the prompt")
    answer_key: str = doc("answer", "column holding the reference answer")
    reward: str = doc("", "reward: math, exact, or module:function (empty: the task's own)")
    template: str = doc("auto", "prompt template: plain, chat or auto")
    num_prompts: int = doc(0, "use at most this many prompts (0: all)")
    k: int = doc(4, "samples per prompt")
    temperature: float = doc(1.0, "sampling temperature")
    max_new_tokens: int = doc(256, "longest response")
    precision: str = doc("fp32", "rollout dtype: fp32, bf16 or fp16")
    engine: str = doc("native", "native or vllm")
    device: str = doc("auto", "auto, cpu or cuda")
    matmul: str = doc("auto", "fp16/bf16 matrix products: auto, native or fp32-accumulate")
    seed: int = doc(0, "sampling seed")

    def validate(self):
        check(self.k >= 1, "k", "must be at least 1")
        check(self.temperature >= 0, "temperature", "must be >= 0 (0: greedy)")
        check(self.precision.lower() in PRECISIONS, "precision", "must be fp32, bf16 or fp16")
        check(self.engine in ("native", "vllm"), "engine", "must be native or vllm")
        return self


@dataclass
class EvalConfig(SampleSetConfig):
    """`unison eval`: avg@k and pass@k."""

    split: str = doc("test", "split of the built-in task: test or train")
    top_p: float = doc(1.0, "top-p")
    json_path: str = doc("", "write the result JSON here")

    def validate(self):
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(self.split in ("test", "train"), "split", "must be test or train")
        return super().validate()


@dataclass
class FilterConfig(SampleSetConfig):
    """`unison filter`: the paper's perfectible-set construction (k samples per prompt; the paper used 40)."""

    k: int = doc(8, "samples per prompt (the paper: 40)")
    lo: float = doc(0.2, "keep prompts solved at least this often")
    hi: float = doc(0.8, "... and at most this often")
    out: str = doc("perfectible.jsonl", "output JSONL: one line per kept prompt (id, prompt, answer, solve rate)")

    def validate(self):
        check(0 <= self.lo <= self.hi <= 1, "lo", "need 0 <= lo <= hi <= 1")
        return super().validate()


def _open(cfg, require_answer: bool = True):
    device = resolve_device(cfg.device)
    dtype = parse_precision(cfg.precision)
    check_dtype_supported(dtype, device)
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    task = load_task(cfg.data, prompt_key=cfg.prompt_key, answer_key=cfg.answer_key, reward=cfg.reward or None,
                     require_answer=require_answer)  # fmt: skip
    engine = make_engine(cfg.engine, model_dir, dtype=dtype, device=device, seed=cfg.seed, matmul=cfg.matmul)
    return tokenizer, task, engine


def run_eval(cfg: EvalConfig) -> dict:
    tokenizer, task, engine = _open(cfg)
    split = cfg.split if cfg.data in ("builtin", "countdown") else "train"
    examples = task.examples(split, n=cfg.num_prompts or None, seed=cfg.seed)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, 0, eos_token_ids(tokenizer))
    result = evaluate(engine, tokenizer, task, examples, params, k=cfg.k, template=cfg.template, progress=True)
    result = {"model": cfg.model, "data": cfg.data, "k": cfg.k, "temperature": cfg.temperature, "top_p": cfg.top_p,
              "precision": cfg.precision, **result}  # fmt: skip
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_path).write_text(json.dumps(result, indent=1))
    return result


def run_filter(cfg: FilterConfig, batch_size: int = 256) -> list[dict]:
    """Sample k responses per prompt; keep the prompts solved between lo and hi of the time (both inclusive)."""
    tokenizer, task, engine = _open(cfg)
    examples = task.examples("train", n=cfg.num_prompts or None, seed=cfg.seed)
    prompts = encode_all(tokenizer, examples, cfg.template)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, 1.0, 0, eos_token_ids(tokenizer))
    rows = [i for i in range(len(examples)) for _ in range(cfg.k)]
    solved = [0.0] * len(examples)
    bar = tqdm(total=len(rows), desc="filter", unit="seq")
    for start in range(0, len(rows), batch_size):
        part = rows[start: start + batch_size]
        ro = engine.generate([prompts[i] for i in part], params)
        rewards, _ = score(task, tokenizer, ro, [examples[i] for i in part])
        for i, r in zip(part, rewards.tolist()):
            solved[i] += r / cfg.k
        bar.update(len(part))
    bar.close()
    kept = [{"id": ex.id, "prompt": ex.prompt, "answer": ex.answer, "solve_rate": rate}
            for ex, rate in zip(examples, solved) if cfg.lo <= rate <= cfg.hi]  # fmt: skip
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    tmp.replace(out)
    mean = sum(solved) / max(len(solved), 1)
    print(f"kept {len(kept)} of {len(examples)} prompts solved in [{cfg.lo}, {cfg.hi}] of {cfg.k} samples "
          f"(mean solve rate {mean:.3f}); wrote {out}")  # fmt: skip
    return kept
