"""The optional measurements of an RL step: each says what it needs the rollout engine to keep of a batch (`asks`,
keywords of `generate`) and which engine capability that takes (`needs`), measures pi_old before the update changes
it (`before_update`), and gives its metrics once the batch is whole (`metrics`).

    ExactDivergences   metrics.exact_divergence: the exact per-position KL(mu||pi), KL(pi||mu) and total variation
                       from both engines' whole distributions
    RoutingMismatch    metrics.routing on an MoE model: the share of tokens the two engines route to other experts
                       and the router-probability gap, per layer

The mismatch estimators on the sampled tokens (`unison.mismatch.mismatch_metrics`) are not optional: every step
logs them.
"""

from __future__ import annotations

import time
from typing import Protocol

from unison.config import TrainConfig
from unison.distributed import World
from unison.mismatch import ExactAccumulator
from unison.rollout import capable
from unison.rollout.base import Rollouts
from unison.routing import RoutingAccumulator


class Measurement(Protocol):
    asks: dict[str, bool]  # what the engine keeps of a batch for it (keywords of `generate`)
    needs: str  # the engine capability that takes (`unison.rollout.CAPABILITIES`)

    def before_update(self, learner, rollouts: Rollouts, micro_batch_size: int, sampling: tuple) -> None: ...

    def metrics(self, estimated: dict[str, float]) -> dict[str, float]: ...


class ExactDivergences:
    """The exact divergences between the engine's and the learner's whole distributions (`ExactAccumulator`), over
    every rank's rows, with the sampled-token estimators held against them."""

    asks = {"keep_distributions": True}
    needs = "distributions"

    def __init__(self, world: World):
        self.world, self.acc, self.seconds = world, ExactAccumulator(), 0.0

    def before_update(self, learner, rollouts: Rollouts, micro_batch_size: int, sampling: tuple) -> None:
        t0 = time.perf_counter()
        self.acc = ExactAccumulator()
        self.acc.add(
            learner.distributions(rollouts, micro_batch_size, *sampling), rollouts.distributions, rollouts.mask
        )
        rollouts.distributions = None  # (not gathered nor kept)
        self.acc.merge(self.world.gather_others(self.acc))
        self.seconds = time.perf_counter() - t0

    def metrics(self, estimated: dict[str, float]) -> dict[str, float]:
        out = {f"mismatch/{k}": v for k, v in self.acc.result(estimated).items()}
        return {**out, "perf/exact_divergence_seconds": self.seconds}


class RoutingMismatch:
    """An MoE model's routing mismatch: the engine's router decisions against the learner's at pi_old."""

    asks = {"keep_routing": True}
    needs = "routing"

    def __init__(self, world: World):
        self.world, self.acc = world, None

    def before_update(self, learner, rollouts: Rollouts, micro_batch_size: int, sampling: tuple) -> None:
        self.acc = None
        if rollouts.routing is None:
            return
        self.acc = RoutingAccumulator()
        self.acc.add(*rollouts.routing, *learner.routing(rollouts, micro_batch_size), rollouts.mask)
        rollouts.routing = None  # (the experts to replay stay in rollouts.replay)
        self.acc.merge(self.world.gather_others(self.acc))

    def metrics(self, estimated: dict[str, float]) -> dict[str, float]:
        return {} if self.acc is None else {f"routing/{k}": v for k, v in self.acc.result().items()}


def measurements_for(cfg: TrainConfig, moe: bool, world: World) -> list[Measurement]:
    """The measurements a run's config asks for, in the order the step takes them (`moe`: the model is one). Those
    on by default (metrics.routing) are left out where the engine cannot give what they need; one asked for is
    refused there when the config is checked."""
    found: list[Measurement] = []
    if cfg.metrics.exact_divergence:
        found.append(ExactDivergences(world))
    if cfg.metrics.routing and moe:
        found.append(RoutingMismatch(world))
    return [m for m in found if capable(cfg.rollout.engine, m.needs)]
