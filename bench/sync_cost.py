"""The weight sync and its verification against the RL step, before and after the one-pass checksum.

For each model (the built-in one, and the random Qwen2s `30m` (25M parameters) and `120m` (104M) of
bench/bench_models.py) the learner (fp16 train, fp32 master) syncs a native fp16 engine:

    export+load  the master weights cast to fp16 and copied into the engine
    verify       the learner's and the engine's checksums (`unison.precision.checksum`); `before` is the checksum the
                 previous release computed (a position-weighted sum over each tensor's bits widened to int64, with
                 a fresh position vector per tensor), run on the same tensors in the same process
    step         one RL step of `unison train` (`--prompts` x `--group` samples of at most `--new-tokens` tokens, one
                 update), timed in the same process, with the sync inside it

    OMP_NUM_THREADS=1 python bench/sync_cost.py [--models builtin,30m,120m] [--repeats 3]

Writes its table into docs/distributed.md (section `sync-cost`) and ends with a line
`RESULT sync_share_<model>=...`.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import build  # noqa: E402
from docsection import replace_section  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs/distributed.md"


def old_checksum(named_tensors) -> str:
    """The checksum of the previous release: per tensor, bits widened to int64, times a fresh position vector."""
    h = hashlib.sha256()
    int_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        flat = t.detach().contiguous().reshape(-1)
        bits = flat.view(int_view[flat.element_size()]).long()
        weight = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
        value = int(((bits & 0xFFFFFFFF) * weight).sum().item())
        h.update(f"{name}|{flat.dtype}|{tuple(t.shape)}|{value};".encode())
    return h.hexdigest()[:16]


def measure(name: str, args) -> dict:
    from unison.config import TrainConfig
    from unison.models import load_tokenizer, resolve_model_dir
    from unison.step import RLStep
    from unison.trainer import PromptStream, build_run

    folder = Path(tempfile.mkdtemp(prefix=f"sync-{name}-"))
    if name == "builtin":
        folder = resolve_model_dir("builtin")
    else:
        build(name).save_pretrained(folder)
        load_tokenizer(resolve_model_dir("builtin")).save_pretrained(folder)
    cfg = TrainConfig()
    cfg.model.path, cfg.data.subset = str(folder), "builtin"
    cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.max_new_tokens = (
        args.prompts,
        args.group,
        args.new_tokens,
    )
    cfg.optim.train_batch_size = args.prompts * args.group
    cfg.run.self_test = False
    run = build_run(cfg)
    learner = run.setup.learner(run.policy, optim=cfg.optim, precision=cfg.precision, moe=cfg.moe)
    engine = run.setup.engine(run.policy.rollout)
    rl_step = RLStep(cfg, run, learner, engine)
    params = sum(p.numel() for p in learner.weights.params)
    rows = {"load": [], "verify_before": [], "verify_after": [], "step": [], "sync_in_step": []}
    stream, shuffle = PromptStream(run.train_examples, 0), torch.Generator().manual_seed(1)
    learner.sync(engine)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        exported = learner.export_weights(engine.dtype)
        engine.load_weights(exported)
        t1 = time.perf_counter()
        assert old_checksum(exported) == old_checksum(engine.model.named_parameters())
        t2 = time.perf_counter()
        m = learner.sync(engine)
        rows["load"].append(t1 - t0)
        rows["verify_before"].append(t2 - t1)
        rows["verify_after"].append(m["perf/sync_verify_seconds"])
        s = rl_step(0, stream, shuffle)
        rows["step"].append(s["perf/step_seconds"])
        rows["sync_in_step"].append(s["perf/sync_seconds"])
    med = {k: statistics.median(v) for k, v in rows.items()}
    before_step = med["step"] - med["verify_after"] + med["verify_before"]
    return {
        "model": name,
        "params": params,
        **med,
        "share_before": (med["load"] + med["verify_before"]) / before_step,
        "share_after": med["sync_in_step"] / med["step"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="builtin,30m,120m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="the built-in model, 1 repeat; print only")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.repeats = "builtin", 1
    results = [measure(m, args) for m in args.models.split(",")]
    lines = [
        "| model | parameters | export + load (s) | verify before (s) | verify after (s) | RL step (s) | "
        "sync share before | sync share after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['load']:.3f} | {r['verify_before']:.3f} | "
            f"{r['verify_after']:.3f} | {r['step']:.2f} | {r['share_before']:.1%} | {r['share_after']:.1%} |"
        )
    table = "\n".join(lines)
    how = (
        f"`OMP_NUM_THREADS=1 python bench/sync_cost.py --models {args.models} --repeats {args.repeats}` "
        f"(fp16 engine and train, fp32 master, matmul native; RL step of {args.prompts} x {args.group} samples of "
        f"at most {args.new_tokens} tokens; medians; one thread)"
    )
    if args.quick:
        print(table)
    else:
        replace_section("sync-cost", f"{how}\n\n{table}", DOC)
        print(table)
    print(
        "RESULT "
        + " ".join(f"sync_share_{r['model']}={r['share_after']:.3f}" for r in results)
        + " "
        + " ".join(f"sync_share_before_{r['model']}={r['share_before']:.3f}" for r in results)
    )


if __name__ == "__main__":
    main()
