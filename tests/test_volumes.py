"""3D end to end on the real AdrenalMNIST3D release: volumes -> NIfTI files + CSV manifest -> Dataset -> train a
3D simple_cnn and a 3D MONAI ResNet-18 for one epoch -> bundle -> predict NIfTI files with the Predictor."""

import csv

import numpy as np
import pytest
import torch

from medsight.bundle import load_bundle
from medsight.config import load_config
from medsight.data.sources import load_dataset
from medsight.errors import DataError
from medsight.evaluate import split_logits
from medsight.inference import to_float
from medsight.pipeline import run_training
from medsight.predict import Predictor
from medsight.volumes import write_nifti_manifest

COUNTS = {"train": 120, "val": 40, "test": 40}


@pytest.fixture(scope="module")
def adrenal(medmnist_dir):
    from medsight.data.sources import load_medmnist

    return load_medmnist("adrenalmnist3d", 28, root=medmnist_dir, download_missing=False)


@pytest.fixture(scope="module")
def manifest(adrenal, tmp_path_factory):
    images, labels, splits = [], [], []
    for s, k in COUNTS.items():
        images.append(adrenal.splits[s].images[:k])
        labels += list(adrenal.splits[s].labels[:k])
        splits += [s] * k
    return write_nifti_manifest(np.concatenate(images), labels, splits, tmp_path_factory.mktemp("nii"))


def test_nifti_manifest_reads_back_the_volumes(manifest, adrenal):
    ds = load_dataset(str(manifest), size=28)
    assert ds.spatial_dims == 3 and ds.splits["train"].images.shape == (120, 1, 28, 28, 28)
    assert ds.recipe["spatial_dims"] == 3 and ds.recipe["size"] == [28, 28, 28]
    src = adrenal.splits["train"].images[:120].astype(np.float32) / 255
    # same voxels (binary shape masks: any per-volume normalisation maps {0, 255} to {0, 1})
    assert np.allclose(to_float(torch.as_tensor(ds.splits["train"].images)).numpy(), src, atol=1e-6)
    small = load_dataset(str(manifest), size=16)
    assert small.splits["val"].images.shape == (40, 1, 16, 16, 16)


@pytest.mark.parametrize("model,extra", [
    ("simple_cnn", {"model.width": 0.5}),
    ("resnet18", {"model.width": 0.25, "model.stem": "standard"}),
])
def test_train_3d_and_predict_nifti(tmp_path, manifest, model, extra):
    ds = load_dataset(str(manifest), size=28)
    cfg = load_config(None, {"data.name": str(manifest), "model.name": model, "train.epochs": 1,
                             "train.batch_size": 16, "train.seed": 0, "train.device": "cpu", "train.threads": 1,
                             "augment.enabled": True, "train.n_boot": 0, **extra})
    threads = torch.get_num_threads()
    try:
        out, result, metrics = run_training(cfg, tmp_path / model, data=ds)
    finally:
        torch.set_num_threads(threads)
    assert result.best_epoch == 1 and 0 <= metrics["test"]["auc"]["value"] <= 1
    bundle = load_bundle(out)
    assert bundle.meta.input.model_dump() == {"spatial_dims": 3, "channels": 1, "size": [28, 28, 28]}
    files = [manifest.parent / ds.splits["test"].ids[i] for i in range(4)]
    preds = Predictor(bundle, backend="torch").predict_paths(files)
    p_split = bundle.task.probabilities(split_logits(bundle, ds, "test"), bundle.temperature).numpy()[:4]
    got = np.array([r.probabilities[bundle.classes[1]] for r in preds])
    np.testing.assert_allclose(got, p_split, atol=1e-5)
    r = Predictor(bundle, backend="torch").predict_file(files[0], explain=True)
    assert r.heatmap.shape == (28, 28, 28)


def _write_csv(path, rows, header=("path", "label", "split")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_manifest_errors(tmp_path, manifest):
    vol = manifest.parent / "vol_00000.nii.gz"
    with pytest.raises(DataError, match="none.csv.*neither"):
        load_dataset(str(tmp_path / "none.csv"))
    with pytest.raises(DataError, match="split"):
        load_dataset(str(_write_csv(tmp_path / "c.csv", [[vol, 0, "dev"], [vol, 1, "train"]])))
    with pytest.raises(DataError, match="missing.nii.gz"):
        load_dataset(str(_write_csv(tmp_path / "g.csv", [[vol, 0, "train"], [tmp_path / "missing.nii.gz", 1, "val"]])))
    with pytest.raises(DataError, match="identical image"):
        load_dataset(str(_write_csv(tmp_path / "f.csv", [[vol, 0, "train"], [vol, 1, "val"]])))
    vol1 = manifest.parent / "vol_00001.nii.gz"
    with pytest.raises(DataError, match="only one class"):
        load_dataset(str(_write_csv(tmp_path / "h.csv", [[vol, 0, "train"], [vol1, 0, "val"]])))
    with pytest.raises(DataError, match="write_nifti_manifest"):
        write_nifti_manifest(np.zeros((2, 4, 4)), [0, 1], ["train", "val"], tmp_path / "x")
