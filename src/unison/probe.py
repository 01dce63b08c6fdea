"""`unison probe`: the paper's offline analysis of the train-inference mismatch.

For each precision setting: the rollout engine samples N responses per prompt with the weights cast to the rollout
dtype (by default temperature 1, no top-k or top-p, as in the paper; the rollout section's sampling otherwise, and
the learner recomputes the same truncated distribution); the learner recomputes the log-probs of those responses
with one full-sequence forward in the train dtype; every mismatch metric of `unison.mismatch` is computed over all
tokens and sequences. Two figures as in the paper: pi(y_t) against mu(y_t) per setting, and the sequence log-ratio
sum_t(log pi - log mu) against response length with the fitted slope per 1K tokens and the sequence-level KL.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from unison import threads
from unison.advice import advise, gradient_stats
from unison.attribution import COMPONENTS, check_supported, upcast
from unison.config import (
    DataConfig,
    ModelConfig,
    MoeConfig,
    PrecisionConfig,
    RolloutConfig,
    RunBase,
    check,
    doc,
    validate_sections,
)
from unison.mismatch import EXACT_KEYS, ExactAccumulator, MismatchAccumulator
from unison.overflow import OverflowGuard, activation_stats
from unison.precision import PRECISIONS, PrecisionPolicy, precision_name
from unison.rollout import capable, check_capability
from unison.routing import RoutingAccumulator
from unison.runfolder import check_output_file, check_output_folder
from unison.setup import Setup, build


@dataclass
class ProbeSection:
    precisions: list = doc(
        ["fp32", "fp16", "bf16"],
        "settings to probe: a precision for rollout and train alike, or rollout/train (e.g. fp32/bf16)",
        separator=",",
    )
    batch_size: int = doc(256, "sequences per generate call")
    activations: bool = doc(
        False, "also measure each layer's largest |activation| (fp32 forward) against the FP16 limit 65504"
    )
    json: str = doc("", "also write the results JSON here")
    advise: bool = doc(
        False,
        "also recommend a precision from what the probe measures (activation headroom, fp16 "
        "gradient underflow, fp16 and bf16 mismatch); implies probe.activations",
    )
    routing_replay: bool = doc(
        False,
        "MoE models: also recompute with the learner routing each token with the "
        "engine's experts (routing replay), the mismatch with it as replay_*",
    )
    attribute: bool = doc(
        False,
        "also repeat each fp16/bf16 setting with one component (lm_head, attention, mlp, "
        "norms, residual) in fp32 in both engines, then all: the share of the mismatch "
        "each removes (native engine)",
    )
    lm_head: str = doc(
        "same",
        "the LM head's dtype in both engines: same (each setting's), or fp32 (native engine)",
        choices=("same", "fp32"),
        what="choice",
        lower=True,
    )
    exact: str = doc(
        "auto",
        "the exact per-position KL(mu||pi), KL(pi||mu) and total variation from both engines' "
        "whole distributions: on, off, or auto (on with the native engine)",
        choices=("auto", "on", "off"),
        what="choice",
    )
    bitwise: bool = doc(
        False,
        "both engines in precision.bitwise's exact mode (settings with one dtype in both): the mismatch "
        "metrics then show what is left of it (mismatch bit_equal_frac 1 and every other 0 where it holds)",
    )


@dataclass
class ProbeConfig:
    """`unison probe`: data.max_prompts prompts x rollout.group_size responses, per precision setting."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_prompts=32))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    probe: ProbeSection = field(default_factory=ProbeSection)
    run: RunBase = field(default_factory=lambda: RunBase(out="runs/probe"))

    def validate(self) -> ProbeConfig:
        validate_sections(self)
        check(self.rollout.temperature > 0, "rollout.temperature", "must be > 0")
        check(bool(self.probe.precisions), "probe.precisions", "list at least one setting, e.g. [fp32, fp16, bf16]")
        check(self.probe.batch_size >= 1, "probe.batch_size", "must be at least 1")
        check(self.data.max_prompts >= 1, "data.max_prompts", "must be at least 1 (the prompts to sample from)")
        engine = self.rollout.engine
        if self.probe.lm_head == "fp32":
            check_capability(engine, "fp32_lm_head", "probe.lm_head=fp32")
        if self.probe.attribute:
            check_capability(engine, "attribution", "probe.attribute=true")
        if self.probe.bitwise:
            check_capability(engine, "bitwise", "probe.bitwise=true")
            check(not self.probe.attribute, "probe.bitwise", "cannot go with probe.attribute; probe one at a time")
        check(
            not self.probe.attribute or self.probe.lm_head == "same",
            "probe.attribute",
            "varies the LM head's dtype itself; leave probe.lm_head=same",
        )
        if self.probe.exact == "on":
            check_capability(engine, "distributions", "probe.exact=on")
        self.probe.precisions = [str(name).lower() for name in self.probe.precisions]
        for name in self.probe.precisions:
            parts = str(name).split("/")
            check(
                len(parts) in (1, 2) and all(x in PRECISIONS for x in parts),
                "probe.precisions",
                f"unknown setting {name!r}; give a precision ({', '.join(sorted(PRECISIONS))}) or rollout/train",
            )
        check(
            not self.probe.attribute or any(p != ("fp32", "fp32") for p in self.settings_names()),
            "probe.attribute",
            "attributes the mismatch of fp16 and bf16 settings, and --precisions has fp32 alone; add fp16 or bf16 "
            "(e.g. --precisions fp16,bf16)",
        )
        return self

    def settings_names(self) -> list[tuple[str, str]]:
        pairs = [str(name).split("/") for name in self.probe.precisions]
        return [(p[0], p[-1]) for p in pairs]


@dataclass
class ProbeResult:
    rollout_precision: str
    train_precision: str
    metrics: dict
    slope_per_1k: float
    seconds: float
    points: dict = field(default_factory=dict, repr=False)  # subsampled pi/mu pairs and per-sequence values


# memory the whole distributions of one batch may take (both engines' [rows, tokens, vocabulary] fp32)
EXACT_BATCH_BYTES = 2**30


def exact_on(cfg: ProbeConfig) -> bool:
    """Whether the probe computes the exact divergences: `probe.exact`, auto meaning with the native engine."""
    return cfg.probe.exact == "on" or (cfg.probe.exact == "auto" and capable(cfg.rollout.engine, "distributions"))


class SettingAccumulators:
    """What the probe of one setting adds up over its batches: the mismatch estimators, the exact divergences, an
    MoE model's routing mismatch and the mismatch with routing replay, and the pi/mu pairs of the figures."""

    def __init__(self, exact: bool, sampling: dict):
        self.exact, self.sampling = exact, sampling
        self.acc, self.exact_acc, self.routing_acc = MismatchAccumulator(), ExactAccumulator(), RoutingAccumulator()
        self.replay_acc = MismatchAccumulator()
        self.pis, self.mus = [], []

    def add(self, ro, learner, replayer) -> None:
        logp_pi = learner.recompute(ro, micro_batch_size=64, **self.sampling)
        self.acc.add(logp_pi, ro.logprobs, ro.mask)
        if self.exact:
            logq = learner.distributions(ro, micro_batch_size=64, **self.sampling)
            self.exact_acc.add(logq, ro.distributions, ro.mask)
        if learner.moe and ro.routing is not None:
            self.routing_acc.add(*ro.routing, *learner.routing(ro), ro.mask)
            if replayer is not None:
                self.replay_acc.add(replayer.recompute(ro, micro_batch_size=64, **self.sampling), ro.logprobs, ro.mask)
        self.pis.append(logp_pi[ro.mask].exp())
        self.mus.append(ro.logprobs[ro.mask].exp())

    def metrics(self) -> dict:
        metrics = self.acc.result()
        if self.exact:
            metrics.update(self.exact_acc.result(metrics))
        if self.routing_acc.flip:
            metrics.update(self.routing_acc.result())
        if self.replay_acc.lengths:
            replayed = self.replay_acc.result()
            metrics.update({f"replay_{k}": replayed[k] for k in ("abs_log_ratio_mean", "k3", "seq_kl")})
        return metrics

    def points(self) -> dict:
        """Up to 20,000 (pi, mu) pairs of sampled tokens (a seeded choice), and every sequence's log-ratio."""
        pi, mu = torch.cat(self.pis), torch.cat(self.mus)
        keep = torch.randperm(len(pi), generator=torch.Generator().manual_seed(0))[:20000]
        return {
            "pi": pi[keep].tolist(),
            "mu": mu[keep].tolist(),
            "seq_log_ratio": list(self.acc.seq_log_ratios),
            "lengths": list(self.acc.lengths),
            "intercept": self.acc.length_slope()[1],
        }


def probe_setting(
    cfg: ProbeConfig, policy: PrecisionPolicy, s: Setup, prompt_ids, components: tuple | None = None
) -> ProbeResult:
    """One setting: sample, recompute, every metric. With `components` (a tuple, maybe empty), those computed in
    fp32 in both engines, which run the model's own modules (`unison.attribution`)."""
    t0 = time.perf_counter()
    bitwise = cfg.probe.bitwise and policy.rollout == policy.train
    learner = s.learner(policy, precision=PrecisionConfig(bitwise=bitwise))
    label = f"{precision_name(policy.rollout)}/{precision_name(policy.train)}" + " bitwise" * bitwise
    if components is not None:
        label += " " + ("+".join(components) or "baseline") + " in fp32" * bool(components)
    exact = exact_on(cfg)
    batch = cfg.probe.batch_size
    if exact:  # rows whose two [tokens, vocabulary] distributions fit the budget
        batch = max(1, min(batch, EXACT_BATCH_BYTES // (8 * s.max_new_tokens * s.config.vocab_size)))
    params = s.sampling()
    acc = SettingAccumulators(exact, {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p})
    with s.engine(policy.rollout, lm_head=cfg.probe.lm_head, **({"bitwise": True} if bitwise else {})) as engine:
        learner.sync(engine)  # the engine holds exactly the learner's weights cast to the rollout dtype
        if components is not None:  # then both run the same components in fp32 (the weights' values unchanged)
            engine.upcast_components(components)
            upcast(learner.model, policy.train, components)
        # fp16 activations that leave its range stop the probe, named, as they stop a run
        engine.overflow_guard("stop", "rollout engine (decode)")
        OverflowGuard.attach(learner.model, "stop" if policy.train == torch.float16 else "off", "learner (recompute)")
        print(f"probe {label}: {s.describe(engine)}", flush=True)
        moe = learner.moe  # then the routing mismatch too (`unison.routing`)
        replayer = s.learner(policy, moe=MoeConfig(routing_replay=True)) if moe and cfg.probe.routing_replay else None
        rows = [p for p in prompt_ids for _ in range(cfg.rollout.group_size)]
        bar = tqdm(total=len(rows), desc=f"probe {label}", unit="seq", disable=not cfg.run.progress)
        for start in range(0, len(rows), batch):
            threads.adapt()
            ro = engine.generate(
                rows[start : start + batch], params, keep_distributions=exact, **({"keep_routing": True} if moe else {})
            )
            acc.add(ro, learner, replayer)
            bar.update(len(ro))
        bar.close()
    slope = acc.acc.length_slope()[0]
    rollout, train = precision_name(policy.rollout), precision_name(policy.train)
    return ProbeResult(rollout, train, acc.metrics(), slope, time.perf_counter() - t0, acc.points())


def run_probe(cfg: ProbeConfig) -> list[ProbeResult]:
    check_output_folder(cfg.run.out, "run.out (the probe's folder)")
    if cfg.probe.json:
        check_output_file(cfg.probe.json, "probe.json")
    policies = [PrecisionPolicy.from_names(r, t, cfg.probe.lm_head) for r, t in cfg.settings_names()]
    dtypes = [d for pol in policies for d in (pol.rollout, pol.train)]
    s = build(cfg.model, cfg.data, cfg.rollout, dtypes=dtypes, seed=cfg.run.seed, require_answer=False)
    threads.configure(cfg.run.threads)
    split = "test" if cfg.data.source in ("builtin", "countdown", "") else "train"
    examples = s.examples(split, cfg.data.max_prompts)
    prompt_ids = s.encode(examples)
    if cfg.probe.attribute:  # before any sampling: the model's structure, built without its weights
        with torch.device("meta"):
            check_supported(AutoModelForCausalLM.from_config(s.config))
    results = [probe_setting(cfg, pol, s, prompt_ids) for pol in policies]
    attribution = attribute(cfg, policies, s, prompt_ids) if cfg.probe.attribute else None
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = results_json(cfg, results, s.max_new_tokens)  # (clamped to the context where the config asks)
    if attribution is not None:
        payload["attribution"] = attribution
    if cfg.probe.activations or cfg.probe.advise:
        payload["activations"], payload["activations_tokens"] = probe_activations(cfg, s, prompt_ids)
    if cfg.probe.advise:
        payload["advice"] = probe_advice(cfg, s, prompt_ids, results, payload)
    (out / "probe.json").write_text(json.dumps(payload, indent=1))
    if cfg.probe.json:
        Path(cfg.probe.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.probe.json).write_text(json.dumps(payload, indent=1))
    plot_token_scatter(results, out / "pi_vs_mu.png")
    plot_sequence_drift(results, out / "seq_log_ratio_vs_length.png")
    return results


ATTRIBUTION_KEYS = ("abs_log_ratio_mean", "k3", "exact_kl_mu_pi")


def attribute(cfg: ProbeConfig, policies: list[PrecisionPolicy], s: Setup, prompt_ids) -> list[dict]:
    """Per fp16/bf16 setting: the probe with no component, each component alone, and all of them in fp32 in both
    engines; each run's mismatch and the share of the baseline's it removes."""
    out = []
    for pol in policies:
        if pol.rollout == torch.float32 and pol.train == torch.float32:
            continue
        runs = [(), *((c,) for c in COMPONENTS), COMPONENTS]
        measured = {}
        for comps in runs:
            r = probe_setting(cfg, pol, s, prompt_ids, components=comps)
            measured["+".join(comps) or "baseline"] = {k: r.metrics.get(k, float("nan")) for k in ATTRIBUTION_KEYS}
        base = measured["baseline"]
        rows = [
            {
                "components": name,
                **values,
                "share_removed": {k: (1 - values[k] / base[k]) if base[k] else float("nan") for k in ATTRIBUTION_KEYS},
            }
            for name, values in measured.items()
        ]
        out.append(
            {
                "rollout_precision": precision_name(pol.rollout),
                "train_precision": precision_name(pol.train),
                "runs": rows,
            }
        )
    return out


def format_attribution(attribution: list[dict]) -> str:
    """One table per setting: each run's mean |log pi - log mu| and exact KL, and the share of the baseline's each
    component in fp32 removes."""
    lines = []
    for setting in attribution:
        lines.append(f"{setting['rollout_precision']}/{setting['train_precision']}:")
        lines.append(f"  {'in fp32':36s}{'|log pi/mu|':>13s}{'removes':>9s}{'exact KL':>12s}{'removes':>9s}")
        for r in setting["runs"]:
            share = r["share_removed"]
            lines.append(
                f"  {r['components']:36s}{r['abs_log_ratio_mean']:>13.3e}{share['abs_log_ratio_mean']:>9.0%}"
                f"{r['exact_kl_mu_pi']:>12.3e}{share['exact_kl_mu_pi']:>9.0%}"
            )
    return "\n".join(lines)


def probe_advice(cfg: ProbeConfig, s: Setup, prompt_ids, results: list[ProbeResult], payload: dict) -> dict:
    """`unison.advice.advise` on this probe: its activations, a few fp32 backward passes on fp32 samples at the
    initial fp16 loss scale, and the fp16 and bf16 settings' mismatch."""

    fp32 = PrecisionPolicy(torch.float32, torch.float32)
    learner = s.learner(fp32)
    with s.engine(torch.float32) as engine:
        learner.sync(engine)
        rollouts = engine.generate(prompt_ids[:16], s.sampling())
    grads = gradient_stats(learner, rollouts, scale=PrecisionConfig().init_scale)
    mismatch = {r.rollout_precision: r.metrics for r in results if r.rollout_precision == r.train_precision}
    return advise(payload["activations"], grads, mismatch, tokens=payload["activations_tokens"])


def probe_activations(cfg: ProbeConfig, s: Setup, prompt_ids) -> tuple[list[dict], int]:
    """Largest |activation| per layer over the prompts, each with one response sampled in fp32 (`unison.overflow`),
    and the number of tokens measured."""

    with s.engine(torch.float32) as engine:
        ro = engine.generate(prompt_ids, s.sampling())
    seqs = [
        torch.tensor([p + ro.response_ids[i, : int(ro.lengths[i])].tolist()], device=s.device)
        for i, p in enumerate(prompt_ids)
    ]
    return activation_stats(s.load_model(), seqs), sum(x.shape[1] for x in seqs)


def results_json(cfg: ProbeConfig, results: list[ProbeResult], max_new_tokens: int) -> dict:
    def clean(v):
        return v if not isinstance(v, float) or math.isfinite(v) else str(v)

    return {
        "model": cfg.model.path,
        "engine": cfg.rollout.engine,
        "prompts": cfg.data.source,
        "num_prompts": cfg.data.max_prompts,
        "samples": cfg.rollout.group_size,
        "max_new_tokens": max_new_tokens,
        "temperature": cfg.rollout.temperature,
        "results": [
            {
                "rollout_precision": r.rollout_precision,
                "train_precision": r.train_precision,
                "metrics": {k: clean(v) for k, v in {**r.metrics, "seq_slope_per_1k_tokens": r.slope_per_1k}.items()},
                "seconds": r.seconds,
            }
            for r in results
        ],
    }


TABLE_KEYS = [
    "abs_log_ratio_mean",
    "prob_abs_diff_mean",
    "prob_abs_diff_max",
    "log_ratio_mean",
    "log_ratio_min",
    "log_ratio_max",
    "k1",
    "k2",
    "k3",
    "chi2_token",
    "seq_log_ratio_mean",
    "seq_log_ratio_abs_mean",
    "seq_log_ratio_min",
    "seq_log_ratio_max",
    "seq_kl",
    "chi2_seq",
    "seq_slope_per_1k_tokens",
    "num_tokens",
    "num_seqs",
    "bit_equal_frac",
    "max_abs_log_ratio",
    *EXACT_KEYS,
    "routing_flip_frac",
    "router_prob_gap",
    "replay_abs_log_ratio_mean",
    "replay_k3",
]


def format_table(results: list[ProbeResult]) -> str:
    """Every metric per setting, and the bf16/fp16 ratio where both were probed with matching dtypes."""
    cols = [f"{r.rollout_precision}/{r.train_precision}" for r in results]
    values = [{**r.metrics, "seq_slope_per_1k_tokens": r.slope_per_1k} for r in results]
    by = {c: v for c, v in zip(cols, values)}
    ratio = "bf16/bf16" in by and "fp16/fp16" in by
    head = (
        f"{'metric (rollout/train)':26s}"
        + "".join(f"{c:>13s}" for c in cols)
        + (f"{'bf16÷fp16':>12s}" if ratio else "")
    )
    lines = [head, "-" * len(head)]
    for key in TABLE_KEYS:
        if not any(key in v for v in values):  # the exact divergences, where they were not computed
            continue
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
        ax.set_title(
            f"{r.rollout_precision} rollout / {r.train_precision} train\n"
            f"mean |log pi - log mu| = {r.metrics['abs_log_ratio_mean']:.2e}",
            fontsize=9,
        )
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
        label = (
            f"{r.rollout_precision}/{r.train_precision}: slope {r.slope_per_1k:+.3f} per 1K tokens, "
            f"KL {r.metrics['seq_kl']:.2e}"
        )
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
