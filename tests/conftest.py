"""Shared fixtures. Real data comes from $MEDSIGHT_DATA_DIR (CI sets it to ../shared/data/medmnist).

Tests that need the real files FAIL, not skip, when the data is missing: CI must never go green without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# the dataset cache of this test session (subprocesses inherit it): never the user's own ~/.cache/medsight
if "MEDSIGHT_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["MEDSIGHT_CACHE_DIR"] = tempfile.mkdtemp(prefix="medsight-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MEDSIGHT_CACHE_DIR"], True)


# --- lanes: markers that tell the truth -----------------------------------------------------------------------
# Every test gets the markers of what it needs, from the fixtures it uses (directly or through other fixtures),
# so a new test is classified without anyone remembering to mark it:
#   realdata         needs the real MedMNIST files or sample scans (fixtures below, or listed in REALDATA)
#   network_service  starts a server process it talks to over loopback (MLflow, ...)
#   browser          drives chromium (test_browser.py marks itself)
#   slow             marked by hand (@pytest.mark.slow), or measured at over ~5 s on 2 cores (SLOW below)
#   unit             none of the above: the fast lane, `bash scripts/test.sh -m unit` (under 60 s on 2 cores)
REALDATA_FIXTURES = {"medmnist_dir", "samples_dir", "breast", "served_bundle", "breast_files"}
NETWORK_FIXTURES = {"mlflow_server"}
# Tests that read the real data without those fixtures (found by running the unit lane with MEDSIGHT_DATA_DIR
# pointing at an empty folder): "file.py::test_name" (parametrized ids included) or "file.py" for every test in it.
REALDATA: set[str] = set()
# Unmarked tests measured at over ~5 s with the 2 cores shared (load ~14; about 1 s and more on a quiet machine;
# pytest --durations=0 -m unit): training runs, ensembles, subprocess starts, connection timeouts. They run in the
# full suite, not in the unit lane.
SLOW: set[str] = {
    "data/test_deid.py::test_corpus_zero_values_survive",
    "test_consistency.py::test_every_path_gives_the_same_probabilities[3d-binary-ensemble]",
    "test_consistency.py::test_every_path_gives_the_same_probabilities[multiclass-ensemble]",
    "test_consistency.py::test_every_path_gives_the_same_probabilities[2d-binary-ensemble]",
    "test_consistency.py::test_every_path_gives_the_same_probabilities[2d-binary-pretrained]",
    "test_consistency.py::test_every_command_on_an_image_plus_clinical_bundle",
    "test_fusion.py::test_fusion_bundle_in_predictor_cli_and_service",
    "test_tracking.py::test_unreachable_server_warns_and_the_bundle_is_written",
    "test_tracking.py::test_required_unreachable_server_is_one_line_exit_2",
    "test_tracking.py::test_silent_server_check_takes_seconds_not_minutes",
    "test_cli.py::test_tiny_train_and_evaluate_in_process",
    "test_cli.py::test_unknown_dataset_in_a_real_process",
    "test_pretrained.py::test_fine_tuning_run_records_the_weights_and_trains_the_backbone_slower",
    "test_pretrained.py::test_medicalnet_has_no_published_digest_so_the_first_one_is_pinned",
    "test_augment.py::test_training_with_mixup_is_reproducible_and_changes_the_weights",
    # the next ones by CPU seconds (scripts/lane_modules.py), about 1-2 s each: room under the minute
    "test_autorecipe.py::test_a_new_set_of_a_known_shape_gets_a_sensible_recipe_saved_in_the_bundle",
    "test_explain.py::test_find_target_layer_variants",
    "test_export.py::test_export_parity_dynamic_batch[resnet18-2-28]",
    "test_streaming.py::test_predict_workers_memory_stays_bounded",
    "test_cli.py::test_usage_errors_in_a_real_process",
    "test_metrics.py::test_bootstrap_ci_coverage",
    "data/test_deid.py::test_verifier_catches_a_leak_in_the_corpus",
}
LANE_MARKERS = ("realdata", "network_service", "browser", "slow")


def _listed(item, names: set[str]) -> bool:
    rel = item.nodeid.split("::", 1)[0].removeprefix("tests/")
    base = rel + "::" + item.nodeid.split("::", 1)[1].split("[", 1)[0] if "::" in item.nodeid else rel
    return rel in names or base in names or item.nodeid.removeprefix("tests/") in names


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & REALDATA_FIXTURES or _listed(item, REALDATA):
            item.add_marker(pytest.mark.realdata)
        if used & NETWORK_FIXTURES:
            item.add_marker(pytest.mark.network_service)
        if _listed(item, SLOW):
            item.add_marker(pytest.mark.slow)
        if not any(item.get_closest_marker(m) for m in LANE_MARKERS):
            item.add_marker(pytest.mark.unit)


def _medmnist_dir() -> Path:
    env = os.environ.get("MEDSIGHT_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "medmnist"


@pytest.fixture(scope="session")
def medmnist_dir() -> Path:
    d = _medmnist_dir()
    if not (d / "breastmnist.npz").is_file():
        pytest.fail(f"real MedMNIST data not found in {d}; set MEDSIGHT_DATA_DIR to the folder holding breastmnist.npz")
    return d


@pytest.fixture(autouse=True)
def _logging_isolated():
    """A test that drives the CLI's typer app directly (not through ``cli.main``, which undoes its logging set-up)
    must not leave the ``medsight`` logger detached from the root for the tests after it (caplog reads the root)."""
    import logging

    log = logging.getLogger("medsight")
    saved = (log.level, log.propagate, list(log.handlers))
    yield
    log.setLevel(saved[0])
    log.propagate = saved[1]
    for h in [h for h in log.handlers if h not in saved[2]]:
        log.removeHandler(h)


@pytest.fixture(autouse=True)
def _data_env(monkeypatch):
    """Point the product at the real data dir and never let a test reach the network."""
    monkeypatch.setenv("MEDSIGHT_DATA_DIR", str(_medmnist_dir()))


@pytest.fixture(scope="session")
def breast(medmnist_dir):
    from medsight.data.sources import load_medmnist

    return load_medmnist("breastmnist", 28, root=medmnist_dir, download_missing=False)


def make_npz(path: Path, n=(24, 8, 8), shape=(16, 16), classes=2, seed=0, **override) -> Path:
    """A small synthetic MedMNIST-layout archive."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 255, size=(k, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, size=(k, 1)).astype(np.uint8)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    return make_npz(tmp_path / "tiny.npz")


# --- serving (predict / export / serve / browser) -------------------------------------------------------------

N_SERVE_IMAGES = 24


def write_dicom(path: Path, pixels: np.ndarray, *, patient_name: str = "Doe^Jane", patient_id: str = "PID-12345") -> Path:
    """A valid Secondary Capture DICOM (explicit VR little endian) holding uint8 MONOCHROME2 pixels."""
    from pydicom.dataset import FileMetaDataset, FileDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def served_bundle(tmp_path_factory, breast) -> Path:
    """A tiny simple_cnn bundle trained for one epoch on the real BreastMNIST."""
    from medsight.config import load_config
    from medsight.pipeline import run_training

    cfg = load_config(None, {"data.name": "breastmnist", "model.name": "simple_cnn", "train.epochs": 1,
                             "train.operating_point": "0.5"})  # a fixed threshold the serving tests can assert
    out, _, _ = run_training(cfg, tmp_path_factory.mktemp("serve") / "bundle", data=breast)
    return out


@pytest.fixture(scope="session")
def breast_files(tmp_path_factory, breast) -> dict:
    """The first test images of BreastMNIST as PNG files and as DICOM files (same pixels)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("breast_files")
    images = np.asarray(breast.splits["test"].images[:N_SERVE_IMAGES])
    pngs, dcms = [], []
    (root / "png").mkdir()
    (root / "dcm").mkdir()
    for i, img in enumerate(images):
        img2d = img.reshape(img.shape[-2:])
        p = root / "png" / f"test_{i:03d}.png"
        Image.fromarray(img2d.astype(np.uint8)).save(p)
        pngs.append(p)
        dcms.append(write_dicom(root / "dcm" / f"test_{i:03d}.dcm", img2d))
    return {"root": root, "png": pngs, "dcm": dcms, "images": images}
