import pytest
from pydantic import ValidationError

from medsight.config import RunConfig, dump_config, load_config
from medsight.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, {"train.epochs": 3, "model.name": "resnet18", "data.size": 64})
    assert cfg.train.epochs == 3 and cfg.model.name == "resnet18" and cfg.data.size == 64
    assert cfg.train.optimizer == "adam"


def test_yaml_then_flags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 7\n  lr: 0.01\nmodel:\n  name: resnet18\n")
    cfg = load_config(p, {"train.epochs": 2})
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.01 and cfg.model.name == "resnet18"


def test_roundtrip(tmp_path):
    cfg = load_config(None, {"train.epochs": 4})
    p = tmp_path / "r.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("overrides, needle", [
    ({"train.lr": -1}, "train.lr"),
    ({"train.epochs": 0}, "train.epochs"),
    ({"train.optimizer": "lbfgs"}, "train.optimizer"),
    ({"train.bogus": 1}, "train.bogus"),
    ({"data.task": "regression"}, "data.task"),
    ({"augment.rotate": 500}, "augment.rotate"),
])
def test_invalid_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_runconfig_is_strict():
    with pytest.raises(ValidationError, match="nope"):
        RunConfig.model_validate({"nope": {}})
