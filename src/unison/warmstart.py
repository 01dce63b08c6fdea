"""Supervised warm start of the built-in model on the built-in countdown task.

    python -m unison.warmstart [--out DIR] [--seed 0] [--target 0.35]

Trains the random-initialised tiny Qwen2 (`unison.models.random_model`) on reference responses of the training
split (teacher forcing, loss on response tokens only, fp32, AdamW) and stops at the first evaluation where the
accuracy of responses sampled at temperature 1 reaches `--target`, so that RL starts from a model that solves some
prompts but not most (the paper's setting: a model that can solve the task but does not yet do so reliably). The
result is the checkpoint shipped in `unison/assets/countdown-tiny`. Deterministic for a seed on one machine.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from unison.evaluation import evaluate
from unison.models import BUILTIN_DIR, build_tokenizer, random_model, save_model
from unison.rollout.base import SamplingParams
from unison.rollout.native import NativeEngine
from unison.tasks.countdown import CountdownTask


def sft_batch(tokenizer, task, examples, device):
    """Right-padded [prompt, reference, EOS] rows with labels on the response only."""
    rows, labels = [], []
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=False).input_ids
        r = tokenizer(task.reference(ex), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(p + r)
        labels.append([-100] * len(p) + r)
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), tokenizer.pad_token_id)
    lab = torch.full((len(rows), L), -100)
    for i, (x, y) in enumerate(zip(rows, labels)):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
    return ids.to(device), lab.to(device)


def warm_start(out: Path, seed: int = 0, target: float = 0.35, batch_size: int = 32, lr: float = 3e-3,
               max_steps: int = 3000, eval_every: int = 50, eval_prompts: int = 64, log=print) -> dict:
    torch.manual_seed(seed)
    random.seed(seed)
    tokenizer = build_tokenizer()
    task = CountdownTask()
    train = task.examples("train", seed=seed)
    probe = task.examples("train", n=eval_prompts, seed=seed + 1)
    model = random_model(seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(seed)
    stops = (tokenizer.eos_token_id,)
    params = SamplingParams(max_new_tokens=256, temperature=1.0, stop_token_ids=stops)
    t0 = time.time()
    acc = 0.0
    for step in range(1, max_steps + 1):
        ids, labels = sft_batch(tokenizer, task, rng.sample(train, batch_size), "cpu")
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0:
            model.eval()
            engine = NativeEngine(random_model(seed=seed), torch.float32, "cpu", seed=seed, pad_token_id=tokenizer.pad_token_id)
            engine.load_weights(model.named_parameters())
            acc = evaluate(engine, tokenizer, task, probe, params, k=1, template="plain")["avg@1"]
            model.train()
            log(f"step {step}  loss {loss.item():.4f}  sampled accuracy {acc:.3f}  {time.time() - t0:.0f}s")
            if acc >= target:
                break
        elif step % 10 == 0:
            log(f"step {step}  loss {loss.item():.4f}  {time.time() - t0:.0f}s")
    if not math.isfinite(loss.item()):
        raise RuntimeError("warm start diverged")
    model.eval()
    save_model(model, tokenizer, out)
    return {"steps": step, "accuracy": acc, "seconds": time.time() - t0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(BUILTIN_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.35)
    ap.add_argument("--max-steps", type=int, default=3000)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    result = warm_start(Path(args.out), seed=args.seed, target=args.target, max_steps=args.max_steps)
    print(f"saved {args.out}: {result}")


if __name__ == "__main__":
    main()
