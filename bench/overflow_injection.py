"""FP16 overflow injection: 1,000 fp16 optimizer steps with an overflow forced on a random 5% of them.

    OMP_NUM_THREADS=1 python bench/overflow_injection.py --steps 1000 --rate 0.05

A small model of the built-in architecture (1 layer, hidden 64) trains in fp16 over fp32 master weights, every step
through `unison.precision.backward_and_step`, on a next-token loss over random sequences. On the chosen steps the
loss is multiplied either by inf (a non-finite loss) or by 1e6 (finite, but its scaled fp16 gradients overflow),
alternately. Counted: skipped steps, steps whose master weights changed although skipped, the loss scale, and the
non-finite values in the master weights after every step (must stay 0). Run twice: with growth_interval 10 (the
scale recovers between overflows and the run completes) and with the default 400 (overflows every ~20 steps halve
the scale faster than it grows, so the loss-scale floor stops the run with its message). Writes the section
`overflow_injection` of docs/reliability.md.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from docsection import count, replace_section  # noqa: E402

from unison.matmul import set_matmul  # noqa: E402
from unison.models import random_model  # noqa: E402
from unison.precision import LossScaleFloorError, LossScaler, MasterWeights, backward_and_step  # noqa: E402


def run(steps: int, rate: float, growth_interval: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = random_model(seed=seed, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    model.train()
    weights = MasterWeights(model, torch.float16)
    set_matmul(model, "fp32-accumulate")
    opt = torch.optim.AdamW(weights.params, lr=1e-3)
    scaler = LossScaler(enabled=True, growth_interval=growth_interval)
    rng = random.Random(seed)
    forced = sorted(rng.sample(range(steps), int(round(rate * steps))))
    forced_set = set(forced)
    data = torch.Generator().manual_seed(seed)
    out = {
        "growth_interval": growth_interval,
        "steps_asked": steps,
        "forced": len(forced),
        "skipped": 0,
        "skipped_unforced": 0,
        "changed_while_skipped": 0,
        "nonfinite_master_max": 0,
        "min_scale": scaler.scale,
        "max_scale": scaler.scale,
        "stopped": None,
        "steps_done": 0,
    }
    for step in range(steps):
        ids = torch.randint(5, 272, (4, 17), generator=data)
        kind = ("inf" if forced.index(step) % 2 == 0 else "1e6") if step in forced_set else None

        def loss_fn(ids=ids, kind=kind):
            logits = model(input_ids=ids[:, :-1]).logits.float()  # [B, T, V]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            return loss * float("inf") if kind == "inf" else loss * 1e6 if kind == "1e6" else loss

        before = [p.detach().clone() for p in weights.params]
        try:
            res = backward_and_step([loss_fn()], weights, opt, scaler, max_grad_norm=1.0)
        except LossScaleFloorError as exc:
            out["stopped"] = f"step {step + 1}: {exc}"
            out["skipped"] += 1
            break
        out["steps_done"] = step + 1
        if res.skipped:
            out["skipped"] += 1
            out["skipped_unforced"] += kind is None
            out["changed_while_skipped"] += any(not torch.equal(a, b) for a, b in zip(before, weights.params))
        bad = sum(int((~torch.isfinite(p)).sum()) for p in weights.params)
        out["nonfinite_master_max"] = max(out["nonfinite_master_max"], bad)
        out["min_scale"] = min(out["min_scale"], scaler.scale)
        out["max_scale"] = max(out["max_scale"], scaler.scale)
    out["final_scale"] = scaler.scale
    out["skipped_counter"] = scaler.skipped_steps
    return out


def guard_cost(repeats: int = 5) -> dict:
    """Seconds per native-engine generate call (fp16, 16 prompts x 64 new tokens) and per learner recompute, with
    the activation guard in stop mode and without it (best of `repeats`)."""
    import time

    from unison.learner import Learner
    from unison.overflow import OverflowGuard
    from unison.precision import PrecisionPolicy
    from unison.rollout.base import SamplingParams
    from unison.rollout.native import NativeEngine

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 272, (12,), generator=g).tolist() for _ in range(16)]
    params = SamplingParams(max_new_tokens=64)
    res = {}
    for guarded in (False, True):
        eng = NativeEngine(random_model(seed=1), torch.float16, "cpu", seed=0)
        learner = Learner(random_model(seed=1), PrecisionPolicy(torch.float16, torch.float16))
        if guarded:
            eng.overflow_guard("stop", "engine")
            OverflowGuard.attach(learner.model, "stop", "learner")
        t_gen, t_rec = [], []
        for _ in range(repeats):
            eng.generator.manual_seed(0)
            t0 = time.perf_counter()
            ro = eng.generate(prompts, params)
            t_gen.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            learner.recompute(ro)
            t_rec.append(time.perf_counter() - t0)
        res["guard" if guarded else "none"] = (min(t_gen), min(t_rec))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=count, default=1000)
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    results = [run(a.steps, a.rate, gi, a.seed) for gi in (10, 400)]
    lines = [
        f"Command: `OMP_NUM_THREADS=1 python bench/overflow_injection.py --steps {a.steps} --rate {a.rate} "
        f"--seed {a.seed}`",
        "",
        "| growth_interval | steps run | overflows forced | steps skipped | skipped without a forced overflow "
        "| master weights changed on a skipped step | non-finite values in master weights (max over steps) | "
        "loss scale min / max / final | stopped |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        forced_run = r["forced"] if r["stopped"] is None else f"{r['forced']} planned"
        lines.append(
            f"| {r['growth_interval']} | {r['steps_done']} | {forced_run} | {r['skipped']} | "
            f"{r['skipped_unforced']} | {r['changed_while_skipped']} | {r['nonfinite_master_max']} | "
            f"{r['min_scale']:g} / {r['max_scale']:g} / {r['final_scale']:g} | "
            f"{r['stopped'] or 'no'} |"
        )
        print(r, flush=True)
    replace_section("overflow_injection", "\n".join(lines))
    cost = guard_cost()
    (g0, r0), (g1, r1) = cost["none"], cost["guard"]
    print(cost, flush=True)
    replace_section(
        "guard_cost",
        "\n".join(
            [
                "Cost of the activation guard (`stop` mode), measured by the same script (built-in architecture, "
                "4 layers, fp16 with fp32-accumulate matmuls on CPU, 16 prompts x 64 new tokens, best of 5):",
                "",
                "| | without guard | with guard | overhead |",
                "| --- | --- | --- | --- |",
                f"| native engine generate | {g0:.3f} s | {g1:.3f} s | {100 * (g1 / g0 - 1):+.1f}% |",
                f"| learner recompute (full-sequence forward) | {r0:.3f} s | {r1:.3f} s "
                f"| {100 * (r1 / r0 - 1):+.1f}% |",
            ]
        ),
    )


if __name__ == "__main__":
    main()
