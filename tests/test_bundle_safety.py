"""Bundles that cannot lie or run code: crafted checkpoints and weights are refused, artefacts are hashed, a
failed write leaves the previous bundle as it was, and outputs honour the umask."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from medsight.bundle import load_bundle, seal, staging_dir
from medsight.config import load_config
from medsight.errors import MedsightError
from medsight.pipeline import run_training
from medsight.utils import sha256_file
from tests.conftest import make_npz

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "bundle_v1"


class _Exploit:
    """Unpickling this runs ``open(marker, 'w')``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _reseal(folder, meta: dict) -> None:
    """Write ``meta`` as bundle.json with a manifest that matches it (a forger who knows the format)."""
    meta = {k: v for k, v in meta.items() if k != "integrity"}
    meta["integrity"] = seal(meta)
    (folder / "bundle.json").write_text(json.dumps(meta))


def _edit(folder, **changes) -> None:
    """Hand-edit bundle.json (the manifest left as published)."""
    meta = json.loads((folder / "bundle.json").read_text())
    meta.update(changes)
    (folder / "bundle.json").write_text(json.dumps(meta, indent=2))


def _cfg(npz, **extra):
    return load_config(None, {"data.name": str(npz), "data.size": 16, "model.width": 0.25, "train.epochs": 1,
                              "train.n_boot": 0, "train.threads": 1, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    npz = make_npz(root / "d.npz", n=(48, 16, 16))
    out, _, _ = run_training(_cfg(npz), root / "bundle")
    return npz, out



def _edited_copy(out, tmp_path, keys: tuple, value):
    """A copy of the bundle whose bundle.json has ``value`` at ``keys`` (a hand edit, not republished)."""
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    d = meta
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value
    (copy / "bundle.json").write_text(json.dumps(meta))
    return copy

def test_crafted_checkpoint_runs_no_code_on_resume(trained, tmp_path):
    npz, _ = trained
    out = tmp_path / "run"
    (staging_dir(out) / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(staging_dir(out) / "checkpoints" / "last.pt", "wb") as fh:
        pickle.dump({"model": _Exploit(marker)}, fh)
    with pytest.raises(MedsightError, match="unreadable"):
        run_training(_cfg(npz), out, resume=True)
    assert not marker.exists()


def test_crafted_weights_run_no_code(trained, tmp_path):
    import shutil

    _, out = trained
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    marker = tmp_path / "pwned"
    with open(copy / "model.pt", "wb") as fh:
        pickle.dump(_Exploit(marker), fh)
    meta = json.loads((copy / "bundle.json").read_text())
    # even with the hash check and the manifest forged to match, weights_only=True refuses to run code
    meta["files"]["model.pt"] = sha256_file(copy / "model.pt")
    _reseal(copy, meta)
    with pytest.raises(MedsightError, match="cannot load weights"):
        load_bundle(copy)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "ood.npz", "config.yaml", "history.csv"])
def test_artefacts_are_hashed_and_checked(trained, tmp_path, name):
    import shutil

    npz, out = trained
    meta = json.loads((out / "bundle.json").read_text())
    assert name in meta["files"] and len(meta["files"][name]) == 64
    other_root = tmp_path / "other"
    other, _, _ = run_training(_cfg(npz, **{"train.seed": 3}), other_root) if name in ("model.pt", "ood.npz") \
        else (None, None, None)
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    if other is not None:  # another run's file mixed into this bundle
        shutil.copy(other / name, copy / name)
    else:
        with open(copy / name, "a") as fh:
            fh.write("\n# edited\n")
    with pytest.raises(MedsightError, match=f"{name} does not match the sha256"):
        load_bundle(copy)


def test_disk_full_is_one_line_and_keeps_the_old_bundle(trained, tmp_path, monkeypatch):
    import shutil

    import medsight.pipeline as pipeline

    npz, out = trained
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_history", full)
    with pytest.raises(MedsightError, match="No space left on device") as e:
        run_training(_cfg(npz), copy, overwrite=True)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    load_bundle(copy)


def test_outputs_honour_the_umask(trained, tmp_path):
    npz, _ = trained
    old = os.umask(0o022)
    try:
        out, _, _ = run_training(_cfg(npz), tmp_path / "b")
    finally:
        os.umask(old)
    for name in ("model.pt", "bundle.json", "metrics.json", "ood.npz"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


# --- the typed contract -----------------------------------------------------------------------------------------

def test_load_returns_a_typed_immutable_bundle(trained):
    import dataclasses

    from pydantic import ValidationError

    _, out = trained
    b = load_bundle(out)
    assert b.meta.task == "binary" and b.meta.model.name == "simple_cnn" and b.meta.input.size == [16, 16]
    assert b.weights_sha256 == sha256_file(out / "model.pt") and len(b.digest) == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.meta = None
    with pytest.raises(ValidationError):
        b.meta.threshold = 0.99
    assert not hasattr(b, "logits_cache")


@pytest.mark.parametrize("field, value", [
    ("threshold", "high"), ("threshold", 5), ("temperature", -1), ("task", "segmentation"), ("tta_flip", [7]),
    ("classes", ["only"]), ("unknown_key", 1), ("model", {"name": "simple_cnn"}), ("review", {"rule": "x"}),
])
def test_an_invalid_value_is_refused_in_one_line_naming_the_field(trained, tmp_path, field, value):
    _, out = trained
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta[field] = value
    _reseal(copy, meta)  # the manifest matches: only the schema can refuse it
    with pytest.raises(MedsightError) as e:
        load_bundle(copy)
    msg = str(e.value)
    assert "\n" not in msg and "bundle.json" in msg and (f"'{field}" in msg or field in msg), msg


# --- every byte checked ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("threshold", 0.99), ("temperature", 2.5), ("classes", ["1", "0"]), ("threshold_rule", "f1"),
    ("tta_flip", [1]), ("ood", {"file": "ood.npz", "score": "combined", "quantile": 0.5, "threshold": 99.0}),
    ("calibration", None), ("training_summary", ["edited"]),
    ("review", {"rule": "margin", "margin": 0.2, "target_share": 0.1, "val_share": 0.1}),
])
def test_a_hand_edit_is_refused_naming_the_field(trained, tmp_path, field, value):
    _, out = trained
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    _edit(copy, **{field: value})
    with pytest.raises(MedsightError, match=f"field '{field}'.* changed after the bundle was published") as e:
        load_bundle(copy)
    assert "\n" not in str(e.value)


def test_an_edited_recipe_field_is_refused(trained, tmp_path):
    _, out = trained
    copy = _edited_copy(out, tmp_path, ('preprocessing', 'window'), [0.0, 100.0])
    with pytest.raises(MedsightError, match="field 'preprocessing'"):
        load_bundle(copy)


def test_an_edited_manifest_is_refused(trained, tmp_path):
    _, out = trained
    copy = _edited_copy(out, tmp_path, ('integrity', 'digest'), "0" * 64)
    with pytest.raises(MedsightError, match="integrity.digest"):
        load_bundle(copy)


def test_model_version_covers_the_decision_fields(trained, tmp_path):
    from medsight.predict import model_version

    _, out = trained
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    before = model_version(load_bundle(copy))
    meta = json.loads((copy / "bundle.json").read_text())
    meta["threshold"] = 0.99
    _reseal(copy, meta)  # re-published with another threshold: same weights, another version
    after = model_version(load_bundle(copy))
    assert before.split("-")[0] == after.split("-")[0] == "simple_cnn" and before != after


def test_predict_refuses_an_edited_bundle(trained, tmp_path, capsys):
    from PIL import Image

    from medsight.cli import main

    _, out = trained
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    assert main(["predict", str(copy), str(png)]) == 0
    _edit(copy, threshold=0.99)
    capsys.readouterr()
    assert main(["predict", str(copy), str(png)]) == 2
    err = capsys.readouterr().err.strip()
    assert "field 'threshold'" in err and len(err.splitlines()) == 1, err


def test_export_refuses_an_edited_bundle(trained, tmp_path, capsys):
    pytest.importorskip("onnx")
    from medsight.cli import main

    _, out = trained
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    _edit(copy, temperature=3.0)
    assert main(["export", str(copy), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "field 'temperature'" in err and len(err.splitlines()) == 1, err
    assert not (copy / "model.onnx").exists()


def test_signed_bundles(trained, tmp_path, monkeypatch):
    npz, _ = trained
    monkeypatch.setenv("MEDSIGHT_BUNDLE_KEY", "publisher-secret")
    out, _, _ = run_training(_cfg(npz), tmp_path / "signed")
    meta = json.loads((out / "bundle.json").read_text())
    assert len(meta["integrity"]["signature"]) == 64
    load_bundle(out)  # the same key verifies
    monkeypatch.setenv("MEDSIGHT_BUNDLE_KEY", "another-key")
    with pytest.raises(MedsightError, match="signature' does not verify"):
        load_bundle(out)
    monkeypatch.delenv("MEDSIGHT_BUNDLE_KEY")
    load_bundle(out)  # no key at load: the manifest is still checked, the signature cannot be
    unsigned, _, _ = run_training(_cfg(npz), tmp_path / "unsigned")
    monkeypatch.setenv("MEDSIGHT_BUNDLE_KEY", "publisher-secret")
    with pytest.raises(MedsightError, match="not signed") as e:
        load_bundle(unsigned)
    assert "publisher-secret" not in str(e.value)


def test_a_crash_between_the_renames_is_recovered_on_the_next_read(trained, tmp_path):
    """SIGKILL after publish's first rename (bundle -> .bundle.old) and before the second (.partial -> bundle):
    the next read puts the previous bundle back."""
    from medsight.cli import main

    _, out = trained
    target = tmp_path / "bundle"
    shutil.copytree(out, staging_dir(target))  # the finished new bundle, not yet renamed into place
    shutil.copytree(out, tmp_path / ".bundle.old")  # the previous one, already renamed away
    assert not target.exists()
    b = load_bundle(target)
    assert target.is_dir() and not (tmp_path / ".bundle.old").exists() and b.path == target
    shutil.rmtree(target / "checkpoints", ignore_errors=True)
    os.rename(target, tmp_path / ".bundle.old")  # again, now through `medsight predict`
    from PIL import Image

    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    assert main(["predict", str(target), str(png)]) == 0 and target.is_dir()


# --- bundles of the last release -----------------------------------------------------------------------------------

def _v1_bundle(tmp_path) -> Path:
    """A bundle as the last release (medsight-bundle/1) wrote it: bundle.json, config.yaml and history.csv are
    that release's own files (tests/fixtures/bundle_v1); model.pt is rebuilt from its spec (binary files are not
    kept in the repository), so only its sha256 entry in ``files`` is updated."""
    from medsight.bundle import build_from_spec, save_weights

    b = tmp_path / "v1"
    shutil.copytree(FIXTURE_V1, b)
    meta = json.loads((b / "bundle.json").read_text())
    assert meta["format"] == "medsight-bundle/1" and "integrity" not in meta
    torch.manual_seed(0)
    save_weights(b, build_from_spec(meta["model"]))
    meta["files"]["model.pt"] = sha256_file(b / "model.pt")
    del meta["files"]["ood.npz"]  # the detector's arrays are not kept either
    (b / "bundle.json").write_text(json.dumps(meta, indent=2))
    return b


def test_a_bundle_of_the_last_release_loads_with_a_note(tmp_path, caplog):
    import logging

    b = _v1_bundle(tmp_path)
    with caplog.at_level(logging.WARNING, logger="medsight.bundle"):
        bundle = load_bundle(b)
    notes = [r.getMessage() for r in caplog.records if r.name == "medsight.bundle"]
    assert len(notes) == 1 and "medsight-bundle/1" in notes[0] and "\n" not in notes[0]
    raw = json.loads((b / "bundle.json").read_text())
    assert bundle.meta.threshold == raw["threshold"] and bundle.meta.threshold_rule == "youden"
    assert bundle.tta_flip == [2] and bundle.classes == ["0", "1"] and bundle.positive_class == "1"
    assert bundle.meta.ood.score == "combined" and bundle.meta.calibration.temperature == raw["temperature"]
    assert bundle.recipe == raw["preprocessing"]
    from medsight.predict import Predictor

    r = Predictor(b).predict_array(np.zeros((1, 16, 16), np.float32))
    assert set(r.probabilities) == {"0", "1"}


def test_an_edited_bundle_of_the_last_release_shows_as_a_new_version(tmp_path):
    from medsight.predict import model_version

    b = _v1_bundle(tmp_path)
    before = model_version(load_bundle(b))
    _edit(b, threshold=0.99)
    assert model_version(load_bundle(b)) != before


def test_an_unknown_format_is_refused_in_one_line(tmp_path):
    b = _v1_bundle(tmp_path)
    _edit(b, format="medsight-bundle/9")
    with pytest.raises(MedsightError, match="field 'format' is 'medsight-bundle/9'"):
        load_bundle(b)
