
import numpy as np
import pytest

from medsight.data import medmnist as mm
from medsight.data.sources import dataset_from_npz, load_dataset, load_medmnist, local_status, md5sum, medmnist_path
from medsight.errors import DataError
from tests.conftest import make_npz


def test_real_breastmnist_official_file(medmnist_dir):
    p = medmnist_path("breastmnist", 28, medmnist_dir, download_missing=False)
    assert md5sum(p) == "750601b1f35ba3300ea97c75c52ff8f6"
    ds = load_medmnist("breastmnist", 28, root=medmnist_dir, download_missing=False)
    # the positive class (malignant, label 0 in the file) is put at index 1: see tests/test_positive_class.py
    assert ds.task == "binary" and ds.classes == ["normal, benign", "malignant"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 546, "val": 78, "test": 156}
    assert ds.splits["train"].images.shape[1:] == (1, 28, 28) and ds.splits["train"].images.dtype == np.uint8


@pytest.mark.parametrize("name,size,shape", [("breastmnist", 64, (1, 64, 64)), ("pneumoniamnist", 28, (1, 28, 28)),
                                             ("adrenalmnist3d", 28, (1, 28, 28, 28))])
def test_other_real_files(medmnist_dir, name, size, shape):
    ds = load_medmnist(name, size, root=medmnist_dir, download_missing=False)
    assert ds.splits["test"].images.shape[1:] == shape
    assert ds.spatial_dims == len(shape) - 1


def test_download_uses_official_url_and_checks_md5(tmp_path, medmnist_dir, monkeypatch):
    """The real download path, pointed at a file:// copy of the official release (no network here)."""
    monkeypatch.setattr(mm, "ZENODO", medmnist_dir.as_uri() + "/{file}")
    root = tmp_path / "cache"
    p = medmnist_path("breastmnist", 28, root)
    assert p.parent == root and md5sum(p) == mm.INFO["breastmnist"].md5[28]
    assert not list(root.glob(".*part"))  # no temp files left


def test_download_with_wrong_md5_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    make_npz(src / "breastmnist.npz")
    monkeypatch.setattr(mm, "ZENODO", src.as_uri() + "/{file}")
    root = tmp_path / "cache"
    with pytest.raises(DataError, match="MD5"):
        medmnist_path("breastmnist", 28, root)
    assert not (root / "breastmnist.npz").exists()


def test_unreachable_download(tmp_path, monkeypatch):
    monkeypatch.setattr(mm, "ZENODO", (tmp_path / "nowhere").as_uri() + "/{file}")
    with pytest.raises(DataError, match="could not be downloaded"):
        medmnist_path("breastmnist", 28, tmp_path / "cache")


def test_local_file_with_wrong_md5_is_refused(tmp_path):
    make_npz(tmp_path / "breastmnist.npz")
    with pytest.raises(DataError, match="MD5.*official"):
        load_medmnist("breastmnist", 28, root=tmp_path, download_missing=False)


def test_missing_dataset_without_download(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_medmnist("breastmnist", 28, root=tmp_path, download_missing=False)


def test_unknown_name_and_size():
    with pytest.raises(DataError, match="allowed: .*breastmnist"):
        load_medmnist("cifar10")
    with pytest.raises(DataError, match="sizes 28, 64"):
        load_medmnist("adrenalmnist3d", 224)


def test_npz_path(tiny_npz):
    ds = load_dataset(str(tiny_npz))
    assert ds.task == "binary" and ds.splits["train"].images.shape == (24, 1, 16, 16)
    assert ds.recipe["intensity"] == "range" and ds.recipe["range"] == [0.0, 255.0]


def test_npz_wrong_keys(tmp_path):
    p = make_npz(tmp_path / "x.npz", val_labels=None)
    with pytest.raises(DataError, match="lacks keys val_labels"):
        dataset_from_npz(p)


def test_npz_corrupt(tmp_path, tiny_npz):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(tiny_npz.read_bytes()[:300])
    with pytest.raises(DataError, match="is not an .npz archive"):
        dataset_from_npz(bad)
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match="text.npz"):
        dataset_from_npz(tmp_path / "text.npz")


def test_npz_length_mismatch_and_float_range(tmp_path):
    p = make_npz(tmp_path / "m.npz", train_labels=np.zeros((3, 1), np.uint8))
    with pytest.raises(DataError, match="train_images has 24 items but train_labels has 3"):
        dataset_from_npz(p)
    q = make_npz(tmp_path / "f.npz", train_images=np.full((24, 16, 16), 7.0, np.float32))
    with pytest.raises(DataError, match=r"uint8 or float in \[0, 1\]"):
        dataset_from_npz(q)


def test_unresolvable_data_spec(tmp_path):
    with pytest.raises(DataError, match="neither a MedMNIST name"):
        load_dataset(str(tmp_path / "nothing-here"))


def test_local_status_lists_present_files(medmnist_dir):
    rows = local_status(medmnist_dir)
    present = {(r["name"], r["size"]) for r in rows if r["present"]}
    assert ("breastmnist", 28) in present and ("adrenalmnist3d", 64) in present
    assert ("pathmnist", 28) not in present
