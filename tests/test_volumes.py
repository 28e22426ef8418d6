"""3D end to end on the real AdrenalMNIST3D release: volumes -> NIfTI files + CSV manifest -> Dataset -> train a
3D simple_cnn and a 3D MONAI ResNet-18 for one epoch -> bundle -> predict a NIfTI file with the bundle's recipe."""

import csv

import numpy as np
import pytest
import torch

from medsight.bundle import load_bundle
from medsight.config import load_config
from medsight.errors import DataError
from medsight.evaluate import split_logits
from medsight.pipeline import run_training
from medsight.preprocess import apply_recipe
from medsight.volumes import load_nifti_manifest, read_nifti, write_nifti_manifest

COUNTS = {"train": 120, "val": 40, "test": 40}
RANGE = {"mode": "range", "min": 0, "max": 255}


@pytest.fixture(scope="module")
def adrenal(medmnist_dir):
    from medsight.data.sources import load_medmnist

    if not (medmnist_dir / "adrenalmnist3d.npz").is_file():
        pytest.fail(f"adrenalmnist3d.npz not found in {medmnist_dir}; set MEDSIGHT_DATA_DIR")
    return load_medmnist("adrenalmnist3d", 28, root=medmnist_dir, download_missing=False)


@pytest.fixture(scope="module")
def manifest(adrenal, tmp_path_factory):
    images, labels, splits = [], [], []
    for s, k in COUNTS.items():
        images.append(adrenal.splits[s].images[:k])
        labels += list(adrenal.splits[s].labels[:k])
        splits += [s] * k
    return write_nifti_manifest(np.concatenate(images), labels, splits, tmp_path_factory.mktemp("nii"))


def test_manifest_roundtrip_is_lossless(adrenal, manifest):
    ds = load_nifti_manifest(manifest, intensity=RANGE)
    assert ds.spatial_dims == 3 and ds.task == "binary" and ds.classes == ["0", "1"]
    assert {s: len(v) for s, v in ds.splits.items()} == COUNTS
    assert ds.splits["train"].images.shape == (120, 1, 28, 28, 28) and ds.splits["train"].images.dtype == np.float32
    np.testing.assert_allclose(ds.splits["test"].images, adrenal.splits["test"].images[:40] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(ds.splits["val"].labels, adrenal.splits["val"].labels[:40])
    assert ds.recipe["spatial_dims"] == 3 and ds.recipe["size"] == [28, 28, 28]
    small = load_nifti_manifest(manifest, intensity=RANGE, size=16)
    assert small.splits["train"].images.shape[2:] == (16, 16, 16)
    assert read_nifti(manifest.parent / ds.splits["train"].ids[0]).shape == (1, 28, 28, 28)


@pytest.mark.parametrize("model,extra", [
    ("simple_cnn", {"model.width": 0.5}),
    ("resnet18", {"model.width": 0.25, "model.stem": "standard"}),
])
def test_train_3d_and_predict_nifti(tmp_path, manifest, model, extra):
    ds = load_nifti_manifest(manifest, intensity=RANGE)
    cfg = load_config(None, {"model.name": model, "train.epochs": 1, "train.batch_size": 16, "train.seed": 0,
                             "train.device": "cpu", "train.threads": 1, "augment.enabled": True, **extra})
    threads = torch.get_num_threads()
    try:
        out, result, metrics = run_training(cfg, tmp_path / model, data=ds)
    finally:
        torch.set_num_threads(threads)
    assert result.best_epoch == 1 and 0 <= metrics["test"]["auc"]["value"] <= 1
    bundle = load_bundle(out)
    assert bundle.meta["input"] == {"spatial_dims": 3, "channels": 1, "size": [28, 28, 28]}
    # predict one test NIfTI file the way a predictor would: read -> bundle recipe -> model
    i = 3
    path = manifest.parent / ds.splits["test"].ids[i]
    x = apply_recipe(read_nifti(path), bundle.recipe, name=str(path))
    with torch.inference_mode():
        p_file = bundle.task.probabilities(bundle.model(torch.from_numpy(x)[None])).numpy()[0]
    p_split = bundle.task.probabilities(split_logits(bundle, ds, "test")).numpy()[i]
    assert p_file == pytest.approx(p_split, abs=1e-5)


def _write_csv(path, rows, header=("path", "label", "split")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_manifest_errors(tmp_path, manifest):
    vol = manifest.parent / "vol_00000.nii.gz"
    with pytest.raises(DataError, match="manifest .* not found"):
        load_nifti_manifest(tmp_path / "none.csv")
    with pytest.raises(DataError, match="lacks column\\(s\\) split; it needs path, label, split"):
        load_nifti_manifest(_write_csv(tmp_path / "a.csv", [[vol, 0]], header=("path", "label")))
    with pytest.raises(DataError, match="has no rows"):
        load_nifti_manifest(_write_csv(tmp_path / "b.csv", []))
    with pytest.raises(DataError, match="line 2: split 'dev' is not one of train, val, test"):
        load_nifti_manifest(_write_csv(tmp_path / "c.csv", [[vol, 0, "dev"]]))
    with pytest.raises(DataError, match="line 3: empty path"):
        load_nifti_manifest(_write_csv(tmp_path / "d.csv", [[vol, 0, "train"], ["", 1, "train"]]))
    with pytest.raises(DataError, match="line 3: label 'cat' is not a class index 0..1 or one of 0, 1"):
        load_nifti_manifest(_write_csv(tmp_path / "e.csv", [[vol, 0, "train"], [vol, "cat", "train"]]),
                            classes=["0", "1"])
    with pytest.raises(DataError, match="single class"):
        load_nifti_manifest(_write_csv(tmp_path / "f.csv", [[vol, "a", "train"], [vol, "a", "test"]]))
    with pytest.raises(DataError, match="NIfTI file .*missing.nii.gz not found"):
        load_nifti_manifest(_write_csv(tmp_path / "g.csv", [[vol, 0, "train"], ["missing.nii.gz", 1, "train"]]))
    with pytest.raises(DataError, match="no rows with split 'train'"):
        load_nifti_manifest(_write_csv(tmp_path / "h.csv", [[vol, 0, "val"], [vol, 1, "test"]]))
    with pytest.raises(DataError, match="intensity mode 'zscore'"):
        load_nifti_manifest(_write_csv(tmp_path / "i.csv", [[vol, 0, "train"], [vol, 1, "train"]]),
                            intensity={"mode": "zscore"})
    with pytest.raises(DataError, match="volume size must have 3 sides"):
        load_nifti_manifest(_write_csv(tmp_path / "j.csv", [[vol, 0, "train"], [vol, 1, "train"]]), size=(8, 8))
    (tmp_path / "bad.nii.gz").write_bytes(b"not nifti")
    with pytest.raises(DataError, match="cannot read NIfTI file .*bad.nii.gz"):
        read_nifti(tmp_path / "bad.nii.gz")
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(DataError, match="has 2 dimensions; expected a 3D volume"):
        read_nifti(tmp_path / "flat.nii.gz")
    with pytest.raises(DataError, match="must match"):
        write_nifti_manifest(np.zeros((2, 4, 4, 4)), [0], ["train", "train"], tmp_path / "w")
    with pytest.raises(DataError, match="volumes of shape"):
        write_nifti_manifest(np.zeros((2, 4, 4)), [0, 1], ["train", "train"], tmp_path / "w")


def test_named_labels_and_4d_channels(tmp_path):
    import nibabel as nib

    rows = []
    for i, lab in enumerate(["benign", "malignant", "benign", "malignant"]):
        vol = np.full((6, 6, 6, 2), i * 10.0, np.float32)  # 4D: two channels, last axis
        vol[..., 1] += 1
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / f"v{i}.nii"))
        rows.append([f"v{i}.nii", lab, "train" if i < 2 else "val"])
    ds = load_nifti_manifest(_write_csv(tmp_path / "m.csv", rows), intensity={"mode": "range", "min": 0, "max": 40})
    assert ds.classes == ["benign", "malignant"] and ds.splits["train"].labels.tolist() == [0, 1]
    assert ds.in_channels == 2 and ds.splits["val"].images.shape == (2, 2, 6, 6, 6)
