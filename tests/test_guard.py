"""The mismatch guard: warnings and the stop on a synthetic metric stream, the message, its settings refused when
they contradict each other, and a run it stops."""

from __future__ import annotations

import math

import pytest

from unison.config import GuardConfig
from unison.guard import Guard, MismatchGuardStop, advice_for


def stream(values, key="mismatch/seq_kl"):
    return [{key: v} for v in values]


def test_warns_then_stops_after_patience_steps():
    g = Guard(GuardConfig(seq_kl_warn=1e-3, seq_kl_stop=0.1, patience=2))
    said = [g.check(i + 1, m) for i, m in enumerate(stream([1e-4, 5e-3, 0.2]))]
    assert said[0] == [] and "1 of 2" not in said[1][0] and "> 0.001" in said[1][0]
    assert "stop threshold; 1 of 2 steps" in said[2][0]
    with pytest.raises(MismatchGuardStop, match=r"step 4: sequence-level KL\(mu\|\|pi\) 0.5 > 0.1 .*2 steps in a row"):
        g.check(4, {"mismatch/seq_kl": 0.5})


def test_a_step_back_under_the_stop_threshold_resets_the_count():
    g = Guard(GuardConfig(k3_stop=1e-2, patience=2))
    for i, v in enumerate([0.5, 1e-3, 0.5]):
        g.check(i + 1, {"mismatch/k3": v})
    assert g.streak == 1
    g.load_state_dict(Guard(GuardConfig(k3_stop=1e-2), streak=1).state_dict())  # resumed mid-streak
    with pytest.raises(MismatchGuardStop):
        g.check(4, {"mismatch/k3": 0.5})


def test_non_finite_counts_as_crossing_and_missing_metrics_are_skipped():
    g = Guard(GuardConfig(masked_stop=0.5, k3_warn=1.0))
    assert g.check(1, {"mismatch/k3": 0.1}) == []  # no correction: no is/masked_frac, nothing to check
    with pytest.raises(MismatchGuardStop, match="share of tokens masked nan"):
        g.check(2, {"is/masked_frac": math.nan})


def test_off_by_default_and_the_advice_names_what_to_change():
    assert not Guard().active and Guard(GuardConfig(k3_warn=1e-3)).active
    bf16 = advice_for("bf16", "bf16", "grpo")
    assert "precision.rollout=fp16" in bf16 and "grpo-seq-mis" in bf16 and "optim.lr" in bf16
    fp16 = advice_for("fp16", "fp16", "grpo-seq-mis")
    assert "fp16 (" not in fp16 and "grpo-seq-mis" not in fp16 and "optim.lr" in fp16


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["guard.k3_warn=-1"], "guard.k3_warn: must be a number >= 0"),
        (["guard.seq_kl_warn=0.5", "guard.seq_kl_stop=0.1"], "is above guard.seq_kl_stop"),
        (["guard.masked_stop=1.5"], "at most 1"),
        (["guard.patience=0"], "guard.patience: must be at least 1"),
    ],
)
def test_contradicting_or_negative_thresholds_are_refused(tmp_path, overrides, says, capsys):
    from unison.cli import main

    code = main(["train", "run.steps=1", f"run.out={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_run_the_guard_stops(tmp_path, capsys):
    from unison.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "data.subset=builtin",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=32",
            "optim.train_batch_size=16",
            "run.steps=3",
            "run.progress=false",
            "precision.rollout=bf16",
            "precision.train=bf16",
            "guard.k3_stop=1e-12",
            f"run.out={out}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "stopped: mismatch guard at step 1: per-token KL k3" in err and "precision.rollout=fp16" in err
    assert "no checkpoint was saved yet" in err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # the step it stopped at is logged
