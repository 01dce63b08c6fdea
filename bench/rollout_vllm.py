"""Rollout engines side by side: vLLM against unison's native engine, per model size and precision.

For each (model, precision, engine) it measures
    mismatch   mean |log pi - log mu| over sampled tokens: the engine samples `--probe-tokens` tokens per prompt at
               temperature 1 (no stop token), the learner (same precision) recomputes log pi
    sync_s     seconds of one weight sync (Learner.sync: load the weights in place, then verify the checksum),
               the median of three
    tok_s      rollout throughput: `--batch` prompts x `--new-tokens` new tokens (no stop token), tokens per second

Models are random Qwen2 models with the built-in tokenizer: `3m` (hidden 256, 4 layers, 3.2M parameters) and `30m`
(hidden 512, 8 layers, 30M). vLLM must be installed (scripts/install-vllm.sh). The machine's load is printed: on a
shared 2-core machine other processes change the timings.

    python bench/rollout_vllm.py            # full: 3m and 30m, fp32/fp16/bf16, batch 64 x 256 new tokens
    python bench/rollout_vllm.py --quick    # 3m only, batch 16 x 64 new tokens, 8 x 64 probe tokens

The last line is `RESULT key=value ...` with one key per measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import build  # noqa: E402
from docsection import count, listed  # noqa: E402

from unison.precision import parse_precision  # noqa: E402


def make_model(name: str, root: Path) -> Path:
    from unison.models import build_tokenizer, save_model

    return save_model(build(name), build_tokenizer(), root / name)


def prompts(n: int) -> list[list[int]]:
    from unison.models import build_tokenizer

    tok = build_tokenizer()
    return [tok(f"{17 * i + 3}-{i % 9 + 1}:").input_ids for i in range(n)]


def start(engine: str, model_dir: Path, dtype: torch.dtype):
    from unison.rollout import make_engine

    kwargs = {"kv_cache_memory_bytes": 2**29} if engine == "vllm" else {}
    return make_engine(engine, model_dir, dtype=dtype, device="cpu", seed=0, **kwargs)


def measure(engine_name: str, model_dir: Path, dtype: torch.dtype, args) -> dict:
    from unison.learner import Learner
    from unison.mismatch import mismatch_metrics
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import SamplingParams

    t0 = time.perf_counter()
    engine = start(engine_name, model_dir, dtype)
    startup = time.perf_counter() - t0
    learner = Learner.from_pretrained(model_dir, PrecisionPolicy(dtype, dtype))
    syncs = [learner.sync(engine)["perf/sync_seconds"] for _ in range(3)]
    probe = engine.generate(prompts(args.probe_prompts), SamplingParams(max_new_tokens=args.probe_tokens))
    mismatch = mismatch_metrics(learner.recompute(probe), probe.logprobs, probe.mask)["abs_log_ratio_mean"]
    batch = prompts(args.batch)
    engine.generate(batch[:2], SamplingParams(max_new_tokens=4))  # warm-up
    t0 = time.perf_counter()
    out = engine.generate(batch, SamplingParams(max_new_tokens=args.new_tokens))
    seconds = time.perf_counter() - t0
    if hasattr(engine, "close"):
        engine.close()
    return {
        "mismatch": mismatch,
        "sync_s": statistics.median(syncs),
        "tok_s": int(out.lengths.sum()) / seconds,
        "start_s": startup,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3m model, batch 16 x 64 tokens, 8 x 64 probe tokens")
    parser.add_argument("--models", type=listed(["3m", "30m", "120m"]), default=None, help="comma-separated: 3m,30m")
    parser.add_argument("--dtypes", type=listed(["fp32", "fp16", "bf16"]), default=["fp32", "fp16", "bf16"])
    parser.add_argument("--engines", type=listed(["native", "vllm"]), default=["native", "vllm"])
    parser.add_argument("--batch", type=count, default=None)
    parser.add_argument("--new-tokens", type=count, default=None)
    parser.add_argument("--probe-prompts", type=count, default=None)
    parser.add_argument("--probe-tokens", type=count, default=None)
    args = parser.parse_args()
    quick = dict(models=["3m"], batch=16, new_tokens=64, probe_prompts=8, probe_tokens=64)
    full = dict(models=["3m", "30m"], batch=64, new_tokens=256, probe_prompts=16, probe_tokens=200)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import vllm  # noqa: F401 - fail early, before any model is built

    print(
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, "
        f"batch {args.batch} x {args.new_tokens} new tokens, probe {args.probe_prompts} x {args.probe_tokens}"
    )
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="unison-bench-") as tmp:
        for model in args.models:
            model_dir = make_model(model, Path(tmp))
            for dname in args.dtypes:
                for engine in args.engines:
                    m = measure(engine, model_dir, parse_precision(dname), args)
                    rows.append((model, dname, engine, m))
                    for k in ("mismatch", "sync_s", "tok_s"):
                        results[f"{model}_{dname}_{engine}_{k}"] = m[k]
                    print(
                        f"  {model:>4} {dname} {engine:<6} mismatch {m['mismatch']:.3e}  sync {m['sync_s']:.3f} s  "
                        f"{m['tok_s']:8.1f} tok/s  (start {m['start_s']:.1f} s)",
                        flush=True,
                    )
    print()
    print("| model | precision | engine | mean abs(log pi - log mu) | sync s/step | rollout tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, dname, engine, m in rows:
        print(f"| {model} | {dname} | {engine} | {m['mismatch']:.2e} | {m['sync_s']:.3f} | {m['tok_s']:.0f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("RESULT " + " ".join(f"{k}={v:.4g}" for k, v in results.items()))


if __name__ == "__main__":
    main()
