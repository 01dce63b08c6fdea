"""One rank of the distributed tests (tests/test_distributed.py), started by torchrun: `python -m
torch.distributed.run --nproc-per-node N tests/_dist_worker.py MODE OUT`. Without torchrun it is the world of one
rank. Rank 0 writes what the test checks into OUT (a .pt file)."""

from __future__ import annotations

import sys

import torch

from unison import distributed
from unison.config import LoraConfig, ModelConfig, OptimConfig, TrainConfig
from unison.learner import Learner, WeightSyncError
from unison.lora import adapt
from unison.models import load_model, load_tokenizer, resolve_model_dir
from unison.precision import PrecisionPolicy, checksum, full_tensor
from unison.rollout.base import SamplingParams
from unison.rollout.native import NativeEngine
from unison.step import Batch, PolicyUpdate


def main(mode: str, out: str) -> None:
    world, device = distributed.init(torch.device("cpu"))
    path = resolve_model_dir("builtin")
    tok = load_tokenizer(path)
    dtype = torch.float32 if mode in ("same", "lora") else torch.float16
    policy = PrecisionPolicy(dtype, dtype)
    torch.manual_seed(0)  # the same LoRA initialisation on every rank
    lora = LoraConfig(enabled=True, rank=4, alpha=8.0) if mode == "lora" else None
    model = load_model(path, device="cpu", dtype=torch.float32)
    learner = Learner(
        adapt(model, lora) if lora else model,
        policy,
        optim=OptimConfig(lr=1e-3),
        world=world,
        model_cfg=ModelConfig(matmul="native"),
    )
    engine = NativeEngine(load_model(path, device="cpu", dtype=torch.float32), dtype, device, seed=0, matmul="native")
    prompts = [tok(f"{a}+{b}=")["input_ids"] for a, b in ((12, 34), (5, 7), (40, 2), (9, 9))]
    G = 4
    # the same global batch on every rank: one engine seed, every rank samples all of it and keeps its share
    rollouts = engine.generate([p for p in prompts for _ in range(G)], SamplingParams(max_new_tokens=24))
    B = len(rollouts)
    share = torch.arange(world.rank * B // world.size, (world.rank + 1) * B // world.size)
    mine = rollouts.select(share)
    result: dict = {}
    if mode in ("same", "lora"):  # 3 fp32 steps on the same global batch (full fine-tuning, or LoRA)
        cfg = TrainConfig()
        cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.optim.train_batch_size = G, 4, 16
        advantages = torch.linspace(-1.0, 1.0, B)[share]
        shuffle = torch.Generator().manual_seed(1)
        update = PolicyUpdate(cfg, learner, world, single_update=True, max_new_tokens=24)
        for _ in range(3):
            T = mine.response_ids.shape[1]
            zeros = torch.zeros(len(mine), T)
            update(Batch(mine, None, [], [], zeros, zeros.clone(), advantages), shuffle)
        result["master"] = learner.master_state()
        if lora is not None:  # and the merged weights the engines receive
            result["merged"] = dict(learner.export_weights(torch.float32))
    elif mode == "overflow":  # fp16: an inf loss on the last rank only
        scale = learner.scaler.scale
        bad = world.rank == world.size - 1

        def loss_fn(mb):
            loss = -(mb.logp * mb.batch.mask).sum() / 100
            return loss * float("inf") if bad else loss

        res = learner.update(mine, torch.arange(len(mine)), loss_fn)
        sums = world.gather(checksum(learner.master_state().items()))
        finite = all(bool(torch.isfinite(full_tensor(p)).all()) for p in learner.weights.params)
        result = {
            "skipped": world.gather(res.skipped),
            "scale": (scale, learner.scaler.scale),
            "finite": world.gather(finite),
            "checksums": sums,
        }
    elif mode == "corrupt":  # the engine of the last rank loads a flipped bit
        learner.sync(engine)
        if world.rank == world.size - 1:
            load = engine.load_weights

            def faulty(named):
                load(named)
                w = engine.model.model.embed_tokens.weight
                w.view(-1).view(torch.int16)[7] ^= 1

            engine.load_weights = faulty
        try:
            learner.sync(engine)
            caught = ""
        except WeightSyncError as exc:
            caught = str(exc)
        result = {"caught": world.gather(caught)}
    if world.main:
        torch.save(result, out)
    world.barrier()  # every rank done with the group before any leaves it
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
