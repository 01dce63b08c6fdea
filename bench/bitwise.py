"""precision.bitwise measured: how many sampled tokens' log-probs agree to the bit, and what the exact mode costs.

    OMP_NUM_THREADS=1 python bench/bitwise.py agreement [--families all] [--tokens 24]
    OMP_NUM_THREADS=1 python bench/bitwise.py cost [--models builtin,30m,smollm2-135m-instruct] [--rounds 3]

`agreement`: for every architecture family of `unison.archs` (tiny random checkpoints), the built-in model and the
real model where it is fetched, in fp32, fp16 and bf16: the share of sampled tokens whose log mu (native engine)
and log pi_old (learner's recompute) have the same fp32 bits, on the ordinary paths (the engine's fast path or
fallback, the learner's shared-prompt forward) and in exact mode; 3 prompts x 4 samples of `--tokens` tokens.

`cost`: on the same batch, the engine's sampling time (tokens/s) and one learner update (forward, backward, step),
ordinary against exact mode taking turns, `--rounds` rounds, medians; the ratio exact / ordinary.

Writes the sections `bitwise-agreement` and `bitwise-cost` of docs/exact.md; the matmul mode is `auto` (say which
it resolved to on this machine in the header the script writes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import build  # noqa: E402
from docsection import machine_description, replace_section  # noqa: E402

from unison.archs import ARCHS, save_tiny  # noqa: E402
from unison.config import PrecisionConfig  # noqa: E402
from unison.learner import Learner  # noqa: E402
from unison.matmul import matmul_mode  # noqa: E402
from unison.mismatch import bits_equal  # noqa: E402
from unison.models import load_model, load_tokenizer, resolve_model_dir, save_model  # noqa: E402
from unison.precision import PrecisionPolicy  # noqa: E402
from unison.rollout.base import SamplingParams  # noqa: E402
from unison.rollout.native import NativeEngine  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "exact.md"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pair(folder: Path, precision: str, bitwise: bool):
    dtype = DTYPES[precision]
    engine = NativeEngine.from_pretrained(folder, dtype, "cpu", seed=0, bitwise=bitwise)
    tok = load_tokenizer(folder)
    learner = Learner(
        load_model(folder),
        PrecisionPolicy(dtype, dtype),
        pad_token_id=tok.pad_token_id or 0,
        precision=PrecisionConfig(rollout=precision, train=precision, bitwise=bitwise),
    )
    learner.sync(engine)
    return engine, learner


def prompts_for(folder: Path, n: int = 3) -> list[list[int]]:
    vocab = min(load_model(folder).config.vocab_size, 260)
    g = torch.Generator().manual_seed(1)
    return [torch.randint(5, vocab, (length,), generator=g).tolist() for length in (12, 20, 9)[:n]]


def agreement(folder: Path, precision: str, bitwise: bool, tokens: int) -> float:
    engine, learner = pair(folder, precision, bitwise)
    ro = engine.generate([p for p in prompts_for(folder) for _ in range(4)], SamplingParams(tokens, 1.0))
    return float(bits_equal(learner.recompute(ro), ro.logprobs)[ro.mask].float().mean())


def folders(args, tmp: Path) -> dict[str, Path]:
    out = {}
    names = sorted(ARCHS) if args.families == "all" else args.families.split(",")
    for name in names:
        out[name] = save_tiny(name, tmp / name)
    out["builtin"] = resolve_model_dir("builtin")
    try:
        out["smollm2-135m-instruct"] = resolve_model_dir("smollm2-135m-instruct")
    except Exception:  # noqa: BLE001 - not fetched: left out
        pass
    return out


def run_agreement(args) -> None:
    rows = [
        "| model | fp32 ordinary | fp32 exact | fp16 ordinary | fp16 exact | bf16 ordinary | bf16 exact |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in folders(args, Path(tmp)).items():
            cells = [f"{agreement(folder, p, b, args.tokens):.3f}" for p in DTYPES for b in (False, True)]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    modes = ", ".join(f"{p}: {matmul_mode('auto', torch.device('cpu'), d)}" for p, d in DTYPES.items())
    text = (
        f"Command: `OMP_NUM_THREADS=1 python bench/bitwise.py agreement --tokens {args.tokens}`. Machine: "
        f"{machine_description()}; `model.matmul=auto` ({modes}). Share of sampled tokens whose log mu and log "
        "pi_old have the same fp32 bits, 3 prompts x 4 samples.\n\n" + "\n".join(rows)
    )
    replace_section("bitwise-agreement", text, DOC)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cost_of(folder: Path, precision: str, bitwise: bool, batch: list, tokens: int) -> tuple[float, float, int]:
    """(sampling seconds, one update's seconds, tokens sampled) on one batch."""
    engine, learner = pair(folder, precision, bitwise)
    params = SamplingParams(tokens, 1.0)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ro = engine.generate(batch, params)
    sample = time.perf_counter() - t0
    total = int(ro.mask.sum())
    step = timed(lambda: learner.update(ro, torch.arange(len(ro)), lambda mb: -(mb.logp * mb.batch.mask).sum() / total))
    return sample, step, total


def run_cost(args) -> None:
    rows = [
        "| model | precision | sampling tokens/s ordinary | exact | ratio | update s ordinary | exact | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = resolve_model_dir(name) if name not in ("30m",) else _saved(name, Path(tmp))
            batch = [p for p in prompts_for(folder, 2) for _ in range(args.group)]
            for precision in args.precisions.split(","):
                got = {False: [], True: []}
                for _ in range(args.rounds):
                    for bitwise in (False, True):  # taking turns
                        got[bitwise].append(cost_of(folder, precision, bitwise, batch, args.tokens))
                med = {b: [statistics.median(x[i] for x in got[b]) for i in range(3)] for b in got}
                speed = {b: med[b][2] / med[b][0] for b in med}
                rows.append(
                    f"| {name} | {precision} | {speed[False]:.0f} | {speed[True]:.0f} | "
                    f"{speed[False] / speed[True]:.2f}x | {med[False][1]:.3f} | {med[True][1]:.3f} | "
                    f"{med[True][1] / med[False][1]:.2f}x |"
                )
                print(rows[-1], flush=True)
    text = (
        f"Command: `OMP_NUM_THREADS=1 python bench/bitwise.py cost --models {args.models} --rounds "
        f"{args.rounds}`. Machine: {machine_description()}; one thread; `model.matmul=auto`. 2 prompts x "
        f"{args.group} samples of {args.tokens} tokens; the two modes taking turns, medians of {args.rounds}; "
        "ratio: exact time / ordinary time.\n\n" + "\n".join(rows)
    )
    replace_section("bitwise-cost", text, DOC)


def _saved(name: str, tmp: Path) -> Path:
    return save_model(build(name), load_tokenizer(resolve_model_dir("builtin")), tmp / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("agreement")
    a.add_argument("--families", default="all")
    a.add_argument("--tokens", type=int, default=24)
    c = sub.add_parser("cost")
    c.add_argument("--models", default="builtin,30m,smollm2-135m-instruct")
    c.add_argument("--precisions", default="fp32,fp16,bf16")
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--group", type=int, default=8)
    c.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    (run_agreement if args.what == "agreement" else run_cost)(args)


if __name__ == "__main__":
    main()
