"""summary.py: what a training run says about its data, and the warnings its metrics deserve."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medsight import metrics as M
from medsight.config import load_config
from medsight.data.sources import load_dataset
from medsight.summary import describe_training, threshold_rule_sentence, warn_degenerate


def test_describe_breastmnist(breast):
    cfg = load_config(None, {"data.name": "breastmnist", "train.epochs": 3})
    lines = describe_training(breast, cfg, "cpu", 2)
    assert lines[0] == 'data: breastmnist, binary task, 2 classes: "normal, benign", "malignant"'
    assert "train: 546 images (normal, benign 399, malignant 147); prevalence of malignant 26.9%" in lines
    assert "test: 156 images (normal, benign 114, malignant 42); prevalence of malignant 26.9%" in lines
    assert any(line.startswith("positive class: malignant (MedMNIST default for breastmnist)") for line in lines)
    assert "splits: official MedMNIST split" in lines
    assert any(line.startswith("input size: 28x28, the MedMNIST release's own size (no resizing") for line in lines)
    assert "decision threshold: chosen on the validation split by Youden's J (sensitivity + specificity - 1, " \
           "maximised)" in lines
    assert lines[-1] == "device: cpu, 2 CPU thread(s)"
    assert not any(line.startswith("WARNING") for line in lines)


def test_describe_user_folder_warns_about_shrinking_and_states_the_split(tmp_path):
    rng = np.random.default_rng(0)
    for c, n in (("normal", 14), ("tumour", 6)):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(tmp_path / "d" / c / f"{i}.png")
    ds = load_dataset(str(tmp_path / "d"), size=28, seed=3)
    cfg = load_config(None, {"data.name": str(tmp_path / "d"), "data.size": 28})
    lines = describe_training(ds, cfg, "cuda:0")
    assert any(line.startswith("positive class: tumour (not set: the second class in sorted order") for line in lines)
    assert ("splits: made here: 70/15/15 stratified by class, seed 3, one group per file (no patient ids given, so "
            "files of one patient may share splits)") in lines
    assert "input size: 28x28 (data.size); the files are 256x256 px (median), so each is resized down 9.1x" in lines
    assert any(line.startswith("WARNING: images are shrunk 9.1x (256x256 -> 28x28)") for line in lines)
    n = {s: len(ds.splits[s]) for s in ds.splits}
    assert sum(n.values()) == 20
    assert f"train: {n['train']} images (normal {int((ds.splits['train'].labels == 0).sum())}, tumour " \
           f"{int((ds.splits['train'].labels == 1).sum())})" in lines[1]
    assert lines[-1] == "device: cuda:0"


def test_threshold_sentences():
    assert threshold_rule_sentence("0.5", 0.5) == "fixed threshold 0.5 (not tuned)"
    assert threshold_rule_sentence("sens=0.95", 0.214) == ("threshold 0.214, chosen on the validation split by "
                                                           "sensitivity >= 0.95")
    assert threshold_rule_sentence(None, None) == "fixed threshold 0.5 (default, not tuned)"


def test_warn_degenerate_one_class_and_undefined():
    y = np.array([0] * 15 + [1] * 5)
    m = {"test": M.to_jsonable(M.evaluate_predictions("binary", y, np.full(20, 0.1), threshold=0.5, n_boot=20,
                                                      positive_class="malignant")),
         "val": M.to_jsonable(M.evaluate_predictions("binary", y, np.r_[np.full(15, 0.1), np.full(5, 0.9)],
                                                     threshold=0.5, n_boot=0, positive_class="malignant"))}
    w = warn_degenerate(m, ["normal, benign", "malignant"])
    assert w[0] == ("WARNING: on the test split the model predicts one class only (normal, benign) for all 20 cases: "
                    "it has not learned to tell the classes apart")
    assert "test: PPV (malignant) undefined: no case predicted malignant" in w
    assert m["test"]["sensitivity"]["value"] == 0.0  # 0 of 5 found: defined, and no warning line of its own
    assert not any(line.startswith("val:") or "val split" in line for line in w)  # a perfect split: no warnings
    mc = {"test": M.evaluate_predictions("multiclass", [0, 1, 2, 1], np.tile([0.2, 0.5, 0.3], (4, 1)), n_boot=0)}
    assert warn_degenerate(mc, ["a", "b", "c"])[0].startswith(
        "WARNING: on the test split the model predicts one class only (b) for all 4 cases")


def test_describe_states_accepted_leakage(tmp_path):
    rng = np.random.default_rng(1)
    same = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "d" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(d / f"{i}.png")
    Image.fromarray(same).save(tmp_path / "d" / "train" / "a" / "dup.png")
    Image.fromarray(same).save(tmp_path / "d" / "val" / "a" / "dup.png")
    from medsight.errors import DataError

    with pytest.raises(DataError, match="1 identical image.*data.allow_leakage=true"):
        load_dataset(str(tmp_path / "d"), size=32)
    ds = load_dataset(str(tmp_path / "d"), size=32, allow_leakage=True)
    assert ds.leakage["findings"] == {"patients_in_several_splits": 0, "identical_images_across_splits": 1}
    assert ds.split_origin == "given in the folder tree (train/val/test folders)"
    lines = describe_training(ds, None)
    assert ("WARNING: leakage accepted (data.allow_leakage): 0 patient(s) in more than one split, 1 identical "
            "image(s) in different splits; test metrics may be optimistic") in lines
