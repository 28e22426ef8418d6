"""Packaged recipes load and validate; `--recipe` layers under --config and flags; a `--quick` bench smoke run."""

import json

import pytest
import yaml

from medsight.cli import main
from medsight.config import RECIPES_DIR, list_recipes, load_config
from medsight.errors import ConfigError

EXPECTED = {"breastmnist", "breastmnist_64", "pneumoniamnist", "adrenalmnist3d"}


def test_all_expected_recipes_are_packaged():
    assert EXPECTED <= set(list_recipes())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_validates_and_names_its_dataset(name):
    cfg = load_config(None, recipe=name)
    assert cfg.data.name == name.replace("_64", "")
    assert cfg.data.size == (64 if name.endswith("_64") else 28)
    raw = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    assert raw["train"]["epochs"] == cfg.train.epochs


def test_recipe_then_config_then_flags(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text("train: {epochs: 3, lr: 0.01}\n")
    cfg = load_config(c, {"train.lr": 0.5}, recipe="breastmnist")
    assert cfg.model.name == "cnn6" and cfg.train.ensemble == 3  # from the recipe
    assert cfg.train.epochs == 3  # config over recipe
    assert cfg.train.lr == 0.5  # flag over config


def test_unknown_recipe_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="breastmnist"):
        load_config(None, recipe="nosuch")


def test_train_recipe_flag_on_cli(tmp_path, capsys):
    rc = main(["train", "--recipe", "nosuch", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2


@pytest.mark.slow
def test_bench_quick_smoke(tmp_path):
    rc = main(["bench", "medmnist", "--datasets", "breastmnist", "--seeds", "0", "--quick", "--device", "cpu",
               "--out-dir", str(tmp_path), "--threads", "2"])
    assert rc == 0
    res = json.loads((tmp_path / "medmnist.json").read_text())
    methods = [r["method"] for r in res["rows"]]
    assert any(m.startswith("medsight recipe") for m in methods)
    assert any(m.startswith("reference ResNet-18") for m in methods)
    assert any(m.startswith("paper:") for m in methods)
    rec = next(r for r in res["rows"] if r["method"].startswith("medsight recipe"))
    assert 0 <= rec["auc"][0] <= 1 and rec["images_per_s"] > 0 and rec["peak_mem_mb"] > 0
    assert "| breastmnist |" in (tmp_path / "medmnist.md").read_text()


def test_bench_results_table_and_unknown_dataset(tmp_path):
    """The benchmark's table and files from a result (no training), and an unknown key refused before any work."""
    from medsight.bench import run_benchmark, write_results
    from medsight.errors import ConfigError

    result = {"meta": {"device": "cpu", "device_name": "x86_64", "threads": 2, "amp": "off", "torch": "2.x",
                       "quick": False},
              "rows": [{"dataset": "breastmnist", "method": "medsight recipe", "auc": (0.9, 0.01), "acc": (0.85, None),
                        "epochs_run": 3, "epochs_recipe": 30, "wall_s": 12.0, "train_s_full_est": 120.0,
                        "images_per_s": 900.0, "peak_mem_mb": 300.0},
                       {"dataset": "breastmnist", "method": "paper: ResNet-18 (28)", "auc": (0.901, None),
                        "acc": (0.863, None)}]}
    md, js = write_results(result, tmp_path)
    text = md.read_text()
    assert "| breastmnist | medsight recipe | 0.900 ± 0.010 | 0.850 | 3/30 | 12.0 | 120.0 | 900 | 300 |" in text
    assert "| breastmnist | paper: ResNet-18 (28) | 0.901 | 0.863 | 100 | - | - | - | - |" in text
    assert json.loads(js.read_text())["rows"][0]["method"] == "medsight recipe"
    with pytest.raises(ConfigError, match="unknown benchmark dataset 'nosuch'"):
        run_benchmark(["nosuch"], [0], device="cpu", log=lambda m: None)


def test_youden_threshold_and_flip_tta_are_chosen_on_val_and_stored(tmp_path):
    from tests.conftest import make_npz

    from medsight.bundle import load_bundle
    from medsight.pipeline import run_training

    npz = make_npz(tmp_path / "t.npz", n=(32, 16, 16), shape=(12, 12))
    cfg = load_config(None, {"data.name": str(npz), "model.name": "simple_cnn", "train.epochs": 1,
                             "train.batch_size": 16, "train.operating_point": "youden", "train.tta_flip": [1]})
    out, _, metrics = run_training(cfg, tmp_path / "run")
    b = load_bundle(out)
    assert isinstance(b.meta.threshold, float) and 0.0 <= b.meta.threshold <= 1.0
    assert b.meta.threshold_rule == "youden" and b.meta.tta_flip == [1]
    assert set(metrics) >= {"val", "test"}
