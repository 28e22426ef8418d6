"""The automatic recipe (``medsight train --data X`` with no flags): a rule over the data's own facts, explicit
settings win, and what it chose is saved in the bundle (config.yaml and bundle.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from medsight import autorecipe
from medsight.autorecipe import DataFacts, choose, choose_size
from medsight.cli import main
from medsight.config import load_config
from medsight.pipeline import run_training
from tests.conftest import make_npz


def _facts(**kw):
    base = dict(spatial_dims=2, channels=1, n_train=546, task="binary", n_classes=2, stored_size=[28, 28])
    return DataFacts(**{**base, **kw})


def test_small_2d_set_gets_the_small_image_cnn_with_augmentation_and_long_schedule():
    r = choose(_facts())
    s = r.settings
    assert s["model.name"] == "cnn6" and s["model.stem"] == "small" and s["model.width"] == 1.0
    assert s["augment.enabled"] and s["augment.flip"] == [2] and s["train.tta_flip"] == [2]
    assert s["augment.rotate"] == 15.0
    # 546 images, batch 64 -> 9 steps/epoch; 1200 steps would be 134 epochs: capped at MAX_EPOCHS
    assert s["train.epochs"] == autorecipe.MAX_EPOCHS
    assert any("546 training images" in line for line in r.reasons)


def test_more_images_mean_fewer_epochs_within_the_cpu_budget():
    few, many = choose(_facts(n_train=2000)), choose(_facts(n_train=20000))
    assert many.settings["train.epochs"] < few.settings["train.epochs"]
    n = 20000
    assert many.settings["train.epochs"] * n <= max(autorecipe.BUDGET[2], autorecipe.MIN_EPOCHS * n)


def test_3d_volumes_get_a_strided_half_width_cnn_and_flips_on_every_axis():
    s = choose(_facts(spatial_dims=3, stored_size=[28, 28, 28], n_train=1188)).settings
    assert s["model.name"] == "cnn6" and s["model.width"] == 0.5 and s["model.stem"] == "standard"
    assert s["augment.flip"] == [1, 2, 3] and s["augment.rotate"] == 0.0 and s["train.batch_size"] == 32
    assert autorecipe.MIN_EPOCHS <= s["train.epochs"] <= autorecipe.MAX_EPOCHS


@pytest.mark.parametrize("native,size", [([30, 30], 28), ([60, 70], 64), ([100, 120], 128), ([512, 512], 224)])
def test_files_get_an_input_size_from_their_own_size(native, size):
    assert choose_size(_facts(native_median=native, resizable=True)) == size
    # fixed arrays (MedMNIST, .npz) keep their stored size
    assert choose_size(_facts(native_median=native, resizable=False)) is None


def test_large_inputs_get_a_strided_first_conv():
    assert choose(_facts(), size=224).settings["model.stem"] == "standard"
    assert choose(_facts(), size=64).settings["model.stem"] == "standard"
    assert choose(_facts(), size=32).settings["model.stem"] == "small"
    assert choose(_facts()).settings["model.stem"] == "small"  # 28 px


def test_explicit_settings_win_over_the_rule():
    cfg = load_config(None, {"train.epochs": 3, "model.width": 2.0, "augment.enabled": False})
    applied = autorecipe.apply(cfg, choose(_facts()))
    assert cfg.train.epochs == 3 and cfg.model.width == 2.0 and cfg.augment.enabled is False
    assert "train.epochs" not in applied and "model.width" not in applied and cfg.model.name == "cnn6"
    assert cfg.model.dropout == 0.3 and applied["model.dropout"] == 0.3
    # a model chosen by the user keeps its own width, stem and dropout; the schedule still comes from the rule
    own = load_config(None, {"model.name": "resnet18"})
    applied = autorecipe.apply(own, choose(_facts(spatial_dims=3, stored_size=[28, 28, 28])))
    assert own.model.width == 1.0 and own.model.dropout == 0.0 and own.model.stem == "auto"
    assert not any(k.startswith("model.") for k in applied) and own.train.batch_size == 32
    # a second application changes nothing: every setting is now explicit (what a resumed run relies on)
    assert autorecipe.apply(cfg, choose(_facts(n_train=10))) == {}


def test_a_new_set_of_a_known_shape_gets_a_sensible_recipe_saved_in_the_bundle(tmp_path):
    """A PNG folder of 60 px images, 3 classes: 64 px input, cnn6, augmentation; chosen settings in config.yaml and
    bundle.json."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for split, n in (("train", 18), ("val", 9), ("test", 6)):
        for c in ("a", "b", "c"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n // 3):
                Image.fromarray(rng.integers(0, 256, (60, 60), dtype=np.uint8)).save(d / f"{i}.png")
    cfg = load_config(None, {"data.name": str(root), "auto": True, "train.epochs": 1, "train.n_boot": 0,
                             "train.threads": 1})
    out, _, _ = run_training(cfg, tmp_path / "bundle")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    meta = json.loads((out / "bundle.json").read_text())
    assert saved["data"]["size"] == 64 and meta["input"]["size"] == [64, 64]
    assert saved["model"]["name"] == "cnn6" and saved["augment"]["enabled"] is True
    assert saved["train"]["epochs"] == 1  # given explicitly: kept
    applied = meta["auto_recipe"]["applied"]
    assert applied["data.size"] == 64 and applied["model.name"] == "cnn6" and "train.epochs" not in applied
    assert meta["tta_flip"] == [2]
    assert any("input size 64x64" in line for line in meta["training_summary"])


def test_cli_train_without_flags_uses_the_automatic_recipe_and_recipe_turns_it_off(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz", n=(32, 16, 8))
    assert main(["train", "--data", str(npz), "--epochs", "1", "--out", str(tmp_path / "auto"), "--no-progress",
                 "--set", "train.n_boot=0"]) == 0
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert saved["auto"] is True and saved["model"]["name"] == "cnn6" and saved["model"]["dropout"] == 0.3
    meta = json.loads((tmp_path / "auto" / "bundle.json").read_text())
    assert meta["input"]["size"] == [16, 16]  # an .npz keeps its stored size and meta["model"]["name"] == "cnn6"
    assert main(["train", "--data", str(npz), "--epochs", "1", "--out", str(tmp_path / "plain"), "--no-progress",
                 "--no-auto", "--set", "train.n_boot=0"]) == 0
    plain = yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())
    assert plain["auto"] is False and plain["model"]["name"] == "simple_cnn" and plain["augment"]["enabled"] is False


# the official MedMNIST training-split sizes: facts of the data, not of a benchmark
_OFFICIAL = {"breastmnist": _facts(n_train=546),
             "pneumoniamnist": _facts(n_train=4708),
             "adrenalmnist3d": _facts(spatial_dims=3, n_train=1188, stored_size=[28, 28, 28])}


@pytest.mark.parametrize("name", sorted(_OFFICIAL))
def test_packaged_28px_recipes_are_the_rule_plus_a_seed_ensemble(name):
    """benchmarks/search.py chose, on validation, the automatic recipe trained as a 3-member ensemble for the three
    28 px sets; the packaged recipes must stay exactly that (a change to the rule shows up here)."""
    cfg = load_config(None, recipe=name)
    assert cfg.train.ensemble == 3 and not cfg.auto
    for key, value in choose(_OFFICIAL[name]).settings.items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value, key


def test_the_rule_notes_installed_imagenet_weights_but_keeps_cnn6(monkeypatch):
    """Validation (benchmarks/results/pretrained.md) did not favour the packaged ImageNet weights at the CPU budget:
    the rule keeps cnn6 from scratch whether or not medsight[pretrained] is installed, and says so when it is."""
    import sys

    installed = choose(_facts())
    assert installed.settings["model.name"] == "cnn6" and "model.pretrained" not in installed.settings
    assert any("medsight[pretrained]" in line and "not used" in line for line in installed.reasons)
    monkeypatch.setitem(sys.modules, autorecipe.PRETRAINED_PACKAGE, None)  # as if the extra were not installed
    missing = choose(_facts())
    assert missing.settings == installed.settings
    assert not any("medsight[pretrained]" in line for line in missing.reasons)
    assert not any("medsight[pretrained]" in line
                   for line in choose(_facts(spatial_dims=3, stored_size=[28, 28, 28], n_train=1188)).reasons)


def test_the_pretrained_note_is_dropped_when_the_user_chose_the_model_or_weights():
    for given in ({"model.name": "efficientnet_lite0", "model.pretrained": "imagenet"}, {"model.pretrained": "x.pth"}):
        cfg = load_config(None, {"data.name": "breastmnist", **given})
        recipe = choose(_facts())
        autorecipe.apply(cfg, recipe)
        assert not any("medsight[pretrained]" in line for line in recipe.reasons)
    recipe = choose(_facts())
    autorecipe.apply(load_config(None, {"data.name": "breastmnist"}), recipe)
    assert any("medsight[pretrained]" in line for line in recipe.reasons)
