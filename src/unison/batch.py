"""What one RL step sampled and computed, row by row (`Batch`), and its form in a checkpoint (`state`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unison.rollout.base import Rollouts


@dataclass
class Batch:
    """What one step sampled and computed, row by row (B rows; on one rank its share, after `gather` the whole).

    rollouts     the engine's samples with log mu                       rewards     [B]
    texts        the decoded responses                                  examples    each row's prompt
    logp_old     [B, T] log pi_old (filled by the first update's forward where it has no pass of its own)
    entropy      [B, T] pi_old's entropy at each position               advantages  [B]
    kl           the KL-in-the-reward metrics (kl/ref, kl/ref_seq), where it applies
    version      the weights it was sampled with (the updates they had: `unison.ahead`'s schedule)
    sync         the metrics of loading those weights into the engine (sampling ahead)
    split_rows   the rows on which the learner also ran at the sampling weights, giving logp_sampled [b, T]
    """

    rollouts: Rollouts
    rewards: torch.Tensor
    texts: list[str]
    examples: list
    logp_old: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    kl: dict = field(default_factory=dict)
    version: int = 0
    sync: dict = field(default_factory=dict)
    split_rows: torch.Tensor | None = None
    logp_sampled: torch.Tensor | None = None

    def state(self, where: dict) -> dict:
        """What a checkpoint keeps of a batch sampled ahead (before its step computed anything); `where` maps each
        example (by `id`) to its position in the run's examples."""
        ro = self.rollouts
        return {
            "rollouts": {f: getattr(ro, f) for f in _ROLLOUT_FIELDS},
            "rewards": self.rewards,
            "texts": self.texts,
            "examples": [where[id(e)] for e in self.examples],
            "version": self.version,
            "sync": self.sync,
            "split_rows": self.split_rows,
            "logp_sampled": self.logp_sampled,
        }

    @classmethod
    def from_state(cls, state: dict, examples: list) -> Batch:
        """The batch `state` holds, its examples taken from the run's `examples`."""
        return cls(
            Rollouts(**state["rollouts"]),
            state["rewards"],
            state["texts"],
            [examples[i] for i in state["examples"]],
            version=state["version"],
            sync=state["sync"],
            split_rows=state["split_rows"],
            logp_sampled=state["logp_sampled"],
        )


_ROLLOUT_FIELDS = (
    "prompt_ids",
    "response_ids",
    "logprobs",
    "mask",
    "lengths",
    "finished",
    "distributions",
    "routing",
    "replay",
)
