"""Patient-level stratified splits and leakage checks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from medsight.data.splits import check_leakage, hashed_id, patient_split
from medsight.errors import DataError


def _records(n_patients=60, per_patient=3, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for p in range(n_patients):
        label = "pos" if p % 4 == 0 else "neg"  # 25 % positive
        for k in range(int(rng.integers(1, per_patient + 1))):
            recs.append({"path": f"/x/{p}_{k}.png", "label": label, "patient_id": f"PAT{p:04d}", "split": None})
    return recs


def test_no_patient_spans_two_splits_and_strata_kept():
    recs = _records()
    out = patient_split(recs, seed=1)
    assert len(out) == len(recs) and all(r["split"] in ("train", "val", "test") for r in out)
    by_patient = {}
    for r in out:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    counts = Counter(r["split"] for r in out)
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    for split in ("train", "val", "test"):
        labels = [r["label"] for r in out if r["split"] == split]
        frac = labels.count("pos") / len(labels)
        assert 0.1 < frac < 0.45, (split, frac)
    check_leakage(out)  # does not raise
    assert recs[0]["split"] is None  # input not mutated


def test_deterministic_and_seed_dependent():
    recs = _records()
    a = [r["split"] for r in patient_split(recs, seed=3)]
    b = [r["split"] for r in patient_split(recs, seed=3)]
    c = [r["split"] for r in patient_split(recs, seed=4)]
    assert a == b and a != c


def test_two_fractions_and_records_without_patient():
    recs = [{"path": f"/{i}.png", "label": str(i % 2)} for i in range(40)]
    out = patient_split(recs, fractions=(0.8, 0.2), stratify=False)
    assert {r["split"] for r in out} == {"train", "val"}
    assert sum(r["split"] == "val" for r in out) == pytest.approx(8, abs=2)


@pytest.mark.parametrize("fractions", [(0.5, 0.6), (1.0,), (0.7, -0.1, 0.4), (0.25,) * 4])
def test_bad_fractions(fractions):
    with pytest.raises(DataError, match="invalid split fractions"):
        patient_split(_records(5), fractions=fractions)


def test_empty_records():
    with pytest.raises(DataError, match="empty"):
        patient_split([])


def test_leakage_patient_ids_are_hashed():
    recs = [
        {"patient_id": "Jane Doe 1970", "split": "train"},
        {"patient_id": "Jane Doe 1970", "split": "test"},
        {"patient_id": "John", "split": "train"},
    ]
    with pytest.raises(DataError) as ei:
        check_leakage(recs)
    msg = str(ei.value)
    assert "Jane" not in msg and hashed_id("Jane Doe 1970") in msg and "1 patient(s)" in msg


def test_leakage_identical_images():
    imgs = np.zeros((3, 1, 4, 4), np.float32)
    imgs[1] = 1
    recs = [{"split": "train"}, {"split": "train"}, {"split": "test"}]
    with pytest.raises(DataError, match=r"identical image\(s\) in different splits: #0 \(train\) = #2 \(test\)"):
        check_leakage(recs, imgs)
    recs[2]["split"] = "train"
    assert check_leakage(recs, imgs)["ok"]
    with pytest.raises(DataError, match="2 images for 3 records"):
        check_leakage(recs, imgs[:2])


def test_accepted_leakage_is_counted_not_raised():
    imgs = np.zeros((4, 1, 4, 4), np.float32)
    imgs[1] = 1
    recs = [{"split": "train", "patient_id": "Jane"}, {"split": "train", "patient_id": "Bob"},
            {"split": "test", "patient_id": "Jane"}, {"split": "val", "patient_id": "Al"}]
    with pytest.raises(DataError, match=r"data.allow_leakage=true, or qc --allow-leakage"):
        check_leakage(recs, imgs)
    got = check_leakage(recs, imgs, allow=True)
    # Jane is in train and test; image #0 = #2 (train/test) and = #3 (val): two pairs across splits
    assert got["findings"] == {"patients_in_several_splits": 1, "identical_images_across_splits": 2}
    assert got["ok"] is False and got["accepted"] is True and "Jane" not in got["message"]
    assert check_leakage(recs[:2], imgs[:2], allow=True)["findings"] == {}
