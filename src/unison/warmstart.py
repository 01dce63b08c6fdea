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
shipped in `unison/assets/countdown-tiny`; `--arch qwen3-moe` makes its mixture-of-experts variant
(`unison/assets/countdown-tiny-moe`, `builtin-moe`), and `--long` goes on from it on the long-response variant
(`countdown-long`, a context of 2048 positions).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from pathlib import Path

import torch

from unison.archs import tiny_model
from unison.models import BUILTIN_DIR, build_tokenizer, load_model, random_model, save_model
from unison.rollout.base import SamplingParams
from unison.rollout.native import NativeEngine
from unison.tasks.countdown import LONG, CountdownTask, chain, parse_prompt


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
def sampled_accuracy(model, tokenizer, task, examples, seed: int, max_new_tokens: int = 256) -> tuple[float, float]:
    """(answer accuracy, chain accuracy) of responses sampled at temperature 1, one per prompt."""

    engine = NativeEngine(copy.deepcopy(model), torch.float32, "cpu", seed=seed, pad_token_id=tokenizer.pad_token_id)
    prompts = [tokenizer(e.prompt, add_special_tokens=False).input_ids for e in examples]
    ro = engine.generate(
        prompts, SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,))
    )
    texts = tokenizer.batch_decode(ro.responses(), skip_special_tokens=True)
    answers = [task.reward(t, e, bool(f)) for t, e, f in zip(texts, examples, ro.finished.tolist())]
    chains = [t.split("\n")[0] == task.reference(e).split("\n")[0] for t, e in zip(texts, examples)]
    return sum(answers) / len(answers), sum(chains) / len(chains)


# the mixture-of-experts variant of the built-in model (`--arch qwen3-moe`): the built-in model's attention and
# size, each dense MLP replaced by 4 experts of a third of its width, 2 chosen per token (two thirds of its active
# MLP compute per token)
MOE_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=1024,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    intermediate_size=384,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    initializer_range=0.02,
    tie_word_embeddings=True,
)


def initial_model(arch: str, seed: int):
    """The random-initialised model a warm start begins from: the built-in Qwen2, or its MoE variant."""
    if arch == "qwen2":
        return random_model(seed=seed)
    return tiny_model(arch, seed=seed, **MOE_CONFIG)


class _Phases:
    """Supervised fine-tuning on the task's worked responses, with the sampled accuracy measured as it goes."""

    def __init__(
        self, task, tokenizer, seed: int, batch_size: int, eval_every: int, eval_prompts: int, max_new_tokens: int, log
    ):
        self.task, self.tokenizer, self.seed, self.log = task, tokenizer, seed, log
        self.batch_size, self.eval_every, self.max_new_tokens = batch_size, eval_every, max_new_tokens
        self.train = task.examples("train", seed=seed)
        self.probe = task.examples("train", n=eval_prompts, seed=seed + 1)
        self.t0, self.history = time.time(), []

    def run(self, model, steps: int, lr: float, noise: float, stop_at: float | None, rng: random.Random):
        """Up to `steps` optimizer steps (fewer where the sampled accuracy reaches `stop_at`), the answers wrong with
        probability `noise`. -> (steps taken, sampled accuracy, chain accuracy)"""
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
        acc = chain_acc = 0.0
        for step in range(1, steps + 1):
            batch = [
                (e.prompt, training_response(self.task, e, rng, noise)) for e in rng.sample(self.train, self.batch_size)
            ]
            ids, labels = sft_batch(self.tokenizer, batch, "cpu")
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if not math.isfinite(loss.item()):
                raise RuntimeError("warm start diverged")
            if step % self.eval_every == 0 or step == steps:
                acc, chain_acc = self.evaluate(model, step, loss.item())
                if stop_at is not None and acc >= stop_at:
                    break
        model.eval()
        return step, acc, chain_acc

    def evaluate(self, model, step: int, loss: float) -> tuple[float, float]:
        model.eval()
        acc, chain_acc = sampled_accuracy(model, self.tokenizer, self.task, self.probe, self.seed, self.max_new_tokens)
        model.train()
        self.history.append((step, loss, acc, chain_acc))
        self.log(
            f"step {step}  loss {loss:.4f}  sampled accuracy {acc:.3f}  chain {chain_acc:.3f}  "
            f"{time.time() - self.t0:.0f}s"
        )
        return acc, chain_acc


def warm_start(
    out: Path,
    seed: int = 0,
    target: float = 0.35,
    phase2_steps: int = 600,
    answer_noise: float = 0.5,
    batch_size: int = 32,
    lr: float = 3e-3,
    phase2_lr: float = 1e-3,
    max_steps: int = 3000,
    eval_every: int = 50,
    eval_prompts: int = 64,
    init: Path | None = None,
    log=print,
    arch: str = "qwen2",
    long: bool = False,
    start: Path | None = None,
) -> dict:
    """The two phases (see the module docstring); `long`: on the long-response variant (`countdown-long`), with a
    context of 2048 positions; `start`: phase 1 begins from this checkpoint's weights instead of a random model."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    task = CountdownTask(**LONG) if long else CountdownTask()
    phases = _Phases(task, tokenizer, seed, batch_size, eval_every, eval_prompts, 1600 if long else 256, log)
    if init is None:
        model = load_model(start) if start is not None else initial_model(arch, seed)
        if long:  # responses of up to 1,300 tokens after a prompt
            model.config.max_position_embeddings = 2048
            tokenizer.model_max_length = 2048
        phase1 = phases.run(model, max_steps, lr, 0.0, target, random.Random(seed))
    else:  # phase 1 done before (its output saved at `init`)
        model, phase1 = load_model(init), None
    phase2 = phases.run(model, phase2_steps, phase2_lr, answer_noise, None, random.Random(seed + 7))
    save_model(model, tokenizer, out)
    return {"phase1": phase1, "phase2": phase2, "seconds": time.time() - phases.t0}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(BUILTIN_DIR))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.35, help="phase 1 stops at this sampled accuracy")
    ap.add_argument("--phase2-steps", type=int, default=600)
    ap.add_argument("--answer-noise", type=float, default=0.5)
    ap.add_argument("--init", default=None, help="skip phase 1: start phase 2 from this checkpoint (phase 1's output)")
    ap.add_argument(
        "--arch",
        default="qwen2",
        choices=("qwen2", "qwen3-moe"),
        help="qwen2: the built-in model; qwen3-moe: its variant with 4 experts, 2 per token",
    )
    ap.add_argument("--long", action="store_true", help="the long-response variant (countdown-long), from --start")
    ap.add_argument(
        "--start",
        default=None,
        help="phase 1 begins from this checkpoint (default: a random model; with --long: the built-in model)",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=3000, help="phase 1 stops here at the latest")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--phase2-lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    start = args.start or (str(BUILTIN_DIR) if args.long else None)
    result = warm_start(
        Path(args.out),
        seed=args.seed,
        target=args.target,
        phase2_steps=args.phase2_steps,
        answer_noise=args.answer_noise,
        init=Path(args.init) if args.init else None,
        arch=args.arch,
        long=args.long,
        start=Path(start) if start else None,
        batch_size=args.batch_size,
        lr=args.lr,
        phase2_lr=args.phase2_lr,
        max_steps=args.max_steps,
    )
    print(f"saved {args.out}: {result}")


if __name__ == "__main__":
    main()
