from pathlib import Path

import pytest

from unison.config import TrainConfig, describe, load_config
from unison.errors import UserError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config(TrainConfig)
    assert cfg.precision.train == "fp16" and cfg.algorithm.preset == "grpo"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    from unison.demo import DemoConfig

    cls = DemoConfig if path.stem.endswith("demo") else TrainConfig
    cfg = load_config(cls, path)
    cfg.algorithm_fields()


def test_shipped_configs_exist():
    assert len(CONFIGS) >= 4


def test_dotted_overrides_and_types():
    cfg = load_config(
        TrainConfig, None, ["optim.lr=3e-6", "rollout.group_size=4", "run.loggers=[jsonl]", "optim.train_batch_size=16"]
    )
    assert cfg.optim.lr == 3e-6 and cfg.rollout.group_size == 4 and cfg.run.loggers == ["jsonl"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["nope.x=1"], "'nope' is not in the top level"),
        (["optim.lr=fast"], "optim.lr: expected a number"),
        (["rollout.group_size=2.5"], "rollout.group_size: expected an integer"),
        (["rollout.top_p=1.5"], "rollout.top_p"),
        (["optim.train_batch_size=24"], "does not divide the rollout batch 128"),
        (["algorithm.preset=ppo"], "choose one of: dr-grpo, grpo"),
        (["algorithm.correction=tis"], "unknown correction 'tis'"),
        (["algorithm.objective=dpo"], "unknown objective 'dpo'"),
        (["precision.train=fp8"], "precision.train"),
        (["rollout"], "not key=value"),
        (["rollout=3"], "is a section"),
        (["run.progress=maybe"], "expected true or false"),
    ],
)
def test_validation_errors_name_the_field(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(TrainConfig, None, overrides)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1,\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(TrainConfig, bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(UserError, match="unknown config key 'optim.learning_rate'"):
        load_config(TrainConfig, unknown)
    with pytest.raises(UserError, match="not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_every_field_is_documented():
    lines = describe(TrainConfig)
    assert all(len(line.split(None, 2)) == 3 for line in lines)
    assert any(line.startswith("optim.lr") for line in lines)


def test_partial_section_keeps_the_commands_own_defaults():
    from unison.demo import DemoConfig

    cfg = load_config(DemoConfig, None, ["run.progress=false"])
    assert cfg.run.out == "runs/demo" and cfg.run.steps == DemoConfig().run.steps and cfg.run.progress is False
