"""The mismatch guard: thresholds on what each training step measures, to stop a run before it collapses.

The paper saw the BF16 sequence-level KL(mu || pi) climb from about 1e-3 toward 1 before every collapse. The guard
watches three numbers of every step (`unison.trainer.rl_step`'s metrics):

    mismatch/seq_kl     the sequence-level KL(mu || pi) estimate (mean over sequences of -sum_t log pi/mu)
    mismatch/k3         the per-token KL(mu || pi) estimate k3
    is/masked_frac      the share of response tokens the rollout correction masks (for a sequence-level
                        correction, the tokens of the sequences it masks); absent without a masking correction

Each has a warning and a stop threshold (`guard.*`, 0: off). Above a warning threshold the step logs
`guard/warnings` and prints one line; above a stop threshold for `guard.patience` steps in a row the run stops with
`MismatchGuardStop`, which says what the numbers were and what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from unison.config import GuardConfig

WATCHED = {"seq_kl": "mismatch/seq_kl", "k3": "mismatch/k3", "masked": "is/masked_frac"}
NAMES = {"seq_kl": "sequence-level KL(mu||pi)", "k3": "per-token KL k3", "masked": "share of tokens masked"}


class MismatchGuardStop(RuntimeError):
    """The train-inference mismatch stayed above a stop threshold of `guard.*`."""


@dataclass
class Guard:
    """The thresholds of `guard.*` (0: off) and the count of steps in a row above a stop threshold."""

    limits: GuardConfig = field(default_factory=GuardConfig)
    streak: int = 0

    @property
    def active(self) -> bool:
        return any(getattr(self.limits, f"{k}_{level}") > 0 for k in WATCHED for level in ("warn", "stop"))

    def check(self, step: int, metrics: dict, advice: str = "") -> list[str]:
        """The warnings of step `step` (1-based) from its metrics; raises `MismatchGuardStop` once a stop threshold
        has been crossed `patience` steps in a row. A value that is not finite counts as crossing."""
        warnings, stops = [], []
        for key, metric in WATCHED.items():
            if metric not in metrics:
                continue
            value = metrics[metric]
            for level, out in (("stop", stops), ("warn", warnings)):
                limit = getattr(self.limits, f"{key}_{level}")
                if limit > 0 and not (math.isfinite(value) and value <= limit):
                    out.append(f"{NAMES[key]} {value:.3g} > {limit:g} ({metric})")
                    break
        self.streak = self.streak + 1 if stops else 0
        patience = self.limits.patience
        if stops and self.streak >= patience:
            steps = f"{self.streak} steps in a row" if self.streak > 1 else "this step"
            raise MismatchGuardStop(
                f"mismatch guard at step {step}: {'; '.join(stops)}, {steps}; {advice or advice_for('', '', '')}"
            )
        return warnings + [f"{s} (stop threshold; {self.streak} of {patience} steps)" for s in stops]

    def state_dict(self) -> dict:
        return {"streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state.get("streak", 0))


def advice_for(precision_rollout: str, precision_train: str, preset: str) -> str:
    """What to change, given the run's settings (nothing it already does)."""
    parts = []
    if precision_rollout != "fp16" or precision_train != "fp16":
        parts.append("train and sample in fp16 (precision.rollout=fp16 precision.train=fp16)")
    if "seq" not in preset:
        parts.append("add a sequence-level correction (--preset grpo-seq-mis)")
    parts.append("lower optim.lr")
    return (
        "the policy being trained is drifting from the one that samples: "
        + ", or ".join(parts)
        + "; then resume with --resume --allow-changes"
    )
