"""`unison probe`: the paper's offline analysis of the train-inference mismatch.

For each precision setting: the rollout engine samples N responses per prompt with the weights cast to the rollout
dtype (temperature 1, no top-p, as in the paper); the learner recomputes the log-probs of those responses with one
full-sequence forward in the train dtype; every mismatch metric of `unison.mismatch` is computed over all tokens
and sequences. Two figures as in the paper: pi(y_t) against mu(y_t) per setting, and the sequence log-ratio
sum_t(log pi - log mu) against response length with the fitted slope per 1K tokens and the sequence-level KL.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unison.config import check, doc
from unison.evaluation import encode_all
from unison.learner import Learner
from unison.mismatch import MismatchAccumulator
from unison.models import eos_token_ids, load_model, load_tokenizer, resolve_model_dir
from unison.precision import PRECISIONS, PrecisionPolicy, check_dtype_supported, precision_name, resolve_device
from unison.rollout import make_engine
from unison.rollout.base import SamplingParams
from unison.tasks import load_task


@dataclass
class ProbeConfig:
    """`unison probe`."""

    model: str = doc("builtin", "a local Hugging Face checkpoint directory, or 'builtin'")
    prompts: str = doc("builtin", "'builtin' (the countdown task's held-out prompts) or a JSONL/Parquet prompt file")
    prompt_key: str = doc("prompt", "column of the prompt file holding the prompt")
    template: str = doc("auto", "prompt template: plain, chat or auto")
    precisions: list = doc(["fp32", "fp16", "bf16"], "settings to probe, each the same dtype for rollout and train")
    rollout_precision: str = doc("", "probe one mixed setting: this rollout dtype ...")
    train_precision: str = doc("", "... with this train dtype (both must be given)")
    num_prompts: int = doc(32, "prompts to sample from")
    samples: int = doc(8, "responses per prompt (the paper used 32)")
    max_new_tokens: int = doc(256, "longest response")
    temperature: float = doc(1.0, "sampling temperature (the paper: 1.0)")
    top_p: float = doc(1.0, "top-p (the paper: 1.0)")
    engine: str = doc("native", "rollout engine: native or vllm")
    device: str = doc("auto", "auto, cpu or cuda")
    matmul: str = doc("auto", "fp16/bf16 matrix products: auto, native or fp32-accumulate")
    batch_size: int = doc(256, "sequences per generate call")
    seed: int = doc(0, "seed for prompt choice and sampling")
    out: str = doc("runs/probe", "folder for probe.json and the figures")
    json_path: str = doc("", "also write the results JSON here")
    progress: bool = doc(True, "show a progress bar while sampling")
    activations: bool = doc(False, "also measure each layer's largest |activation| (fp32 forward) against the FP16 limit 65504")

    def validate(self) -> "ProbeConfig":
        names = [self.rollout_precision, self.train_precision]
        check(all(names) or not any(names), "train_precision", "give both --rollout-precision and --train-precision, or neither")
        for p in self.settings_names():
            for name in p:
                check(name.lower() in PRECISIONS, "precisions", f"unknown precision {name!r}; choose from fp32, bf16, fp16")
        check(self.num_prompts >= 1 and self.samples >= 1, "num_prompts", "num_prompts and samples must be at least 1")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(self.engine in ("native", "vllm"), "engine", f"must be native or vllm, not {self.engine!r}")
        return self

    def settings_names(self) -> list[tuple[str, str]]:
        if self.rollout_precision:
            return [(self.rollout_precision, self.train_precision)]
        return [(p, p) for p in self.precisions]


@dataclass
class ProbeResult:
    rollout_precision: str
    train_precision: str
    metrics: dict
    slope_per_1k: float
    seconds: float
    points: dict = field(default_factory=dict, repr=False)  # subsampled pi/mu pairs and per-sequence values


def probe_setting(cfg: ProbeConfig, policy: PrecisionPolicy, model_dir, tokenizer, prompt_ids, device) -> ProbeResult:
    t0 = time.perf_counter()
    engine = make_engine(cfg.engine, model_dir, dtype=policy.rollout, device=device, seed=cfg.seed, matmul=cfg.matmul)
    learner = Learner(load_model(model_dir, device=device), policy, device, pad_token_id=tokenizer.pad_token_id or 0,
                      matmul=cfg.matmul)  # fmt: skip
    learner.sync(engine)  # the engine holds exactly the learner's weights cast to the rollout dtype
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, 0, eos_token_ids(tokenizer))
    rows = [p for p in prompt_ids for _ in range(cfg.samples)]
    acc = MismatchAccumulator()
    pis, mus = [], []
    from tqdm.auto import tqdm

    label = f"{precision_name(policy.rollout)}/{precision_name(policy.train)}"
    bar = tqdm(total=len(rows), desc=f"probe {label}", unit="seq", disable=not cfg.progress)
    for start in range(0, len(rows), cfg.batch_size):
        ro = engine.generate(rows[start: start + cfg.batch_size], params)
        logp_pi = learner.recompute(ro, micro_batch_size=64, temperature=cfg.temperature, top_p=cfg.top_p)
        acc.add(logp_pi, ro.logprobs, ro.mask)
        pis.append(logp_pi[ro.mask].exp())
        mus.append(ro.logprobs[ro.mask].exp())
        bar.update(len(ro))
    bar.close()
    metrics = acc.result()
    slope, intercept = acc.length_slope()
    pi, mu = torch.cat(pis), torch.cat(mus)
    keep = torch.randperm(len(pi), generator=torch.Generator().manual_seed(0))[:20000]
    points = {"pi": pi[keep].tolist(), "mu": mu[keep].tolist(), "seq_log_ratio": list(acc.seq_log_ratios),
              "lengths": list(acc.lengths), "intercept": intercept}  # fmt: skip
    return ProbeResult(precision_name(policy.rollout), precision_name(policy.train), metrics, slope,
                       time.perf_counter() - t0, points)  # fmt: skip


def run_probe(cfg: ProbeConfig) -> list[ProbeResult]:
    device = resolve_device(cfg.device)
    policies = [PrecisionPolicy.from_names(r, t) for r, t in cfg.settings_names()]
    for pol in policies:
        check_dtype_supported(pol.rollout, device)
        check_dtype_supported(pol.train, device)
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    from unison.trainer import load_model_config

    load_model_config(model_dir)  # an unsupported architecture is refused here
    task = load_task(cfg.prompts, prompt_key=cfg.prompt_key, require_answer=False)
    split = "test" if cfg.prompts in ("builtin", "countdown", "") else "train"
    examples = task.examples(split, n=cfg.num_prompts, seed=cfg.seed)
    prompt_ids = encode_all(tokenizer, examples, cfg.template)
    results = [probe_setting(cfg, pol, model_dir, tokenizer, prompt_ids, device) for pol in policies]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = results_json(cfg, results)
    if cfg.activations:
        payload["activations"] = probe_activations(cfg, model_dir, tokenizer, prompt_ids, device)
    (out / "probe.json").write_text(json.dumps(payload, indent=1))
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_path).write_text(json.dumps(payload, indent=1))
    plot_token_scatter(results, out / "pi_vs_mu.png")
    plot_sequence_drift(results, out / "seq_log_ratio_vs_length.png")
    return results


def probe_activations(cfg: ProbeConfig, model_dir, tokenizer, prompt_ids, device) -> list[dict]:
    """Largest |activation| per layer over the prompts, each with one response sampled in fp32 (`unison.overflow`)."""
    from unison.overflow import activation_stats

    engine = make_engine(cfg.engine, model_dir, dtype=torch.float32, device=device, seed=cfg.seed, matmul=cfg.matmul)
    ro = engine.generate(prompt_ids, SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, 0, eos_token_ids(tokenizer)))
    seqs = [torch.tensor([p + ro.response_ids[i, : int(ro.lengths[i])].tolist()], device=device) for i, p in enumerate(prompt_ids)]
    return activation_stats(load_model(model_dir, device=device), seqs)


def results_json(cfg: ProbeConfig, results: list[ProbeResult]) -> dict:
    def clean(v):
        return v if not isinstance(v, float) or math.isfinite(v) else str(v)

    return {
        "model": cfg.model, "engine": cfg.engine, "prompts": cfg.prompts, "num_prompts": cfg.num_prompts,
        "samples": cfg.samples, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
        "results": [
            {"rollout_precision": r.rollout_precision, "train_precision": r.train_precision,
             "metrics": {k: clean(v) for k, v in {**r.metrics, "seq_slope_per_1k_tokens": r.slope_per_1k}.items()},
             "seconds": r.seconds}
            for r in results
        ],
    }  # fmt: skip


TABLE_KEYS = [
    "abs_log_ratio_mean", "prob_abs_diff_mean", "prob_abs_diff_max", "log_ratio_mean", "log_ratio_min", "log_ratio_max",
    "k1", "k2", "k3", "chi2_token", "seq_log_ratio_mean", "seq_log_ratio_abs_mean", "seq_log_ratio_min",
    "seq_log_ratio_max", "seq_kl", "chi2_seq", "seq_slope_per_1k_tokens", "num_tokens", "num_seqs",
]  # fmt: skip


def format_table(results: list[ProbeResult]) -> str:
    """Every metric per setting, and the bf16/fp16 ratio where both were probed with matching dtypes."""
    cols = [f"{r.rollout_precision}/{r.train_precision}" for r in results]
    values = [{**r.metrics, "seq_slope_per_1k_tokens": r.slope_per_1k} for r in results]
    by = {c: v for c, v in zip(cols, values)}
    ratio = "bf16/bf16" in by and "fp16/fp16" in by
    head = f"{'metric (rollout/train)':26s}" + "".join(f"{c:>13s}" for c in cols) + (f"{'bf16÷fp16':>12s}" if ratio else "")
    lines = [head, "-" * len(head)]
    for key in TABLE_KEYS:
        row = f"{key:26s}" + "".join(f"{v.get(key, float('nan')):>13.3e}" for v in values)
        if ratio:
            a, b = by["bf16/bf16"].get(key, 0.0), by["fp16/fp16"].get(key, 0.0)
            row += f"{(a / b if b else float('nan')):>12.1f}"
        lines.append(row)
    return "\n".join(lines)


def _colors():
    return {"fp32": "tab:green", "fp16": "tab:blue", "bf16": "tab:red"}


def plot_token_scatter(results: list[ProbeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        ax.scatter(r.points["mu"], r.points["pi"], s=2, alpha=0.3, color=_colors().get(r.train_precision, "k"))
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(f"{r.rollout_precision} rollout / {r.train_precision} train\n"
                     f"mean |log pi - log mu| = {r.metrics['abs_log_ratio_mean']:.2e}", fontsize=9)  # fmt: skip
        ax.set_xlabel("mu(y_t)  (rollout engine)")
        ax.set_ylabel("pi(y_t)  (learner)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sequence_drift(results: list[ProbeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in results:
        c = _colors().get(r.train_precision, None) if r.rollout_precision == r.train_precision else None
        xs, ys = r.points["lengths"], r.points["seq_log_ratio"]
        label = (f"{r.rollout_precision}/{r.train_precision}: slope {r.slope_per_1k:+.3f} per 1K tokens, "
                 f"KL {r.metrics['seq_kl']:.2e}")  # fmt: skip
        ax.scatter(xs, ys, s=4, alpha=0.4, color=c)
        if xs:
            x0, x1 = min(xs), max(xs)
            b = r.points["intercept"]
            ax.plot([x0, x1], [b + r.slope_per_1k * x0 / 1000, b + r.slope_per_1k * x1 / 1000], color=c, label=label)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("log pi(y) - log mu(y)  (sequence)")
    ax.set_title("sequence-level mismatch against length")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
