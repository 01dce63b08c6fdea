"""Supervised warm start of the built-in model on the built-in countdown task.

    python -m unison.warmstart [--out DIR] [--seed 0]

Two phases of teacher forcing on the training split (loss on response tokens only, fp32, AdamW), both
deterministic for a seed on one machine:

1. the random-initialised tiny Qwen2 (`unison.models.random_model`) learns the reference responses until the
   accuracy of responses sampled at temperature 1 reaches `--target` (0.35): it can count down, with slips;
2. it goes on learning the chains for `--phase2-steps` more steps, but the final answer line of each training
   response names the last number of the chain only with probability 1 - `--answer-noise` and the number before
   it otherwise, so the model knows how to reach the answer but does not reliably report it.

The result is a model in the paper's starting situation: it can solve the task and does so some of the time (the
sampled accuracy lands between 10% and 60%), and RL has a consistent signal to learn from. It is the checkpoint
shipped in `unison/assets/countdown-tiny`.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from unison.models import BUILTIN_DIR, build_tokenizer, random_model, save_model
from unison.rollout.base import SamplingParams
from unison.rollout.native import NativeEngine
from unison.tasks.countdown import CountdownTask, chain, parse_prompt


def training_response(task, ex, rng: random.Random, answer_noise: float) -> str:
    """The reference response; with probability `answer_noise` its answer line names the number before the last."""
    start, step = parse_prompt(ex.prompt)
    numbers = chain(start, step)
    noisy = answer_noise > 0 and len(numbers) > 1 and rng.random() < answer_noise
    answer = numbers[-2] if noisy else numbers[-1]
    return ",".join(map(str, numbers)) + f"\n#{answer}"


def sft_batch(tokenizer, texts: list[tuple[str, str]], device):
    """Right-padded [prompt, response, EOS] rows with labels on the response only."""
    rows, labels = [], []
    for prompt, response in texts:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        r = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(p + r)
        labels.append([-100] * len(p) + r)
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    lab = torch.full((len(rows), L), -100)
    for i, (x, y) in enumerate(zip(rows, labels)):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
    return ids.to(device), lab.to(device)


@torch.no_grad()
def sampled_accuracy(model, tokenizer, task, examples, seed: int) -> tuple[float, float]:
    """(answer accuracy, chain accuracy) of responses sampled at temperature 1, one per prompt."""
    engine = NativeEngine(random_model(seed=seed), torch.float32, "cpu", seed=seed, pad_token_id=tokenizer.pad_token_id)
    engine.load_weights(model.named_parameters())
    prompts = [tokenizer(e.prompt, add_special_tokens=False).input_ids for e in examples]
    ro = engine.generate(prompts, SamplingParams(max_new_tokens=256, stop_token_ids=(tokenizer.eos_token_id,)))
    texts = tokenizer.batch_decode(ro.responses(), skip_special_tokens=True)
    answers = [task.reward(t, e, bool(f)) for t, e, f in zip(texts, examples, ro.finished.tolist())]
    chains = [t.split("\n")[0] == task.reference(e).split("\n")[0] for t, e in zip(texts, examples)]
    return sum(answers) / len(answers), sum(chains) / len(chains)


def warm_start(out: Path, seed: int = 0, target: float = 0.35, phase2_steps: int = 600, answer_noise: float = 0.5,
               batch_size: int = 32, lr: float = 3e-3, phase2_lr: float = 1e-3, max_steps: int = 3000,
               eval_every: int = 50, eval_prompts: int = 64, init: Path | None = None, log=print) -> dict:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    task = CountdownTask()
    train = task.examples("train", seed=seed)
    probe = task.examples("train", n=eval_prompts, seed=seed + 1)
    t0 = time.time()
    history = []

    def run_phase(model, steps, lr, noise, stop_at, rng):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
        acc = chain_acc = 0.0
        for step in range(1, steps + 1):
            batch = [(e.prompt, training_response(task, e, rng, noise)) for e in rng.sample(train, batch_size)]
            ids, labels = sft_batch(tokenizer, batch, "cpu")
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if not math.isfinite(loss.item()):
                raise RuntimeError("warm start diverged")
            if step % eval_every == 0 or step == steps:
                model.eval()
                acc, chain_acc = sampled_accuracy(model, tokenizer, task, probe, seed)
                model.train()
                history.append((step, loss.item(), acc, chain_acc))
                log(f"step {step}  loss {loss.item():.4f}  sampled accuracy {acc:.3f}  chain {chain_acc:.3f}  "
                    f"{time.time() - t0:.0f}s")  # fmt: skip
                if stop_at is not None and acc >= stop_at:
                    break
        model.eval()
        return step, acc, chain_acc

    if init is None:
        model = random_model(seed=seed)
        phase1 = run_phase(model, max_steps, lr, 0.0, target, random.Random(seed))
    else:  # phase 1 done before (its output saved at `init`)
        from unison.models import load_model

        model, phase1 = load_model(init), None
    phase2 = run_phase(model, phase2_steps, phase2_lr, answer_noise, None, random.Random(seed + 7))
    save_model(model, tokenizer, out)
    return {"phase1": phase1, "phase2": phase2, "seconds": time.time() - t0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(BUILTIN_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.35, help="phase 1 stops at this sampled accuracy")
    ap.add_argument("--phase2-steps", type=int, default=600)
    ap.add_argument("--answer-noise", type=float, default=0.5)
    ap.add_argument("--init", default=None, help="skip phase 1: start phase 2 from this checkpoint (phase 1's output)")
    args = ap.parse_args(argv)
    result = warm_start(Path(args.out), seed=args.seed, target=args.target, phase2_steps=args.phase2_steps,
                        answer_noise=args.answer_noise, init=Path(args.init) if args.init else None)  # fmt: skip
    print(f"saved {args.out}: {result}")


if __name__ == "__main__":
    main()
