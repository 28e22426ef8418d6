"""Cohort export for research: query the PACS, retrieve the labelled studies, de-identify them on the way in
(:func:`medsight.data.deid.deidentify`) and write a dataset ``medsight train --data <out>/manifest.csv`` reads.

The identified files only ever exist in a private (0700) working folder next to the output, removed when the
export ends; the de-identification mapping is kept only when asked for (it re-identifies the output).
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path

from medsight.errors import ConfigError, DataError
from medsight.node.config import NodeConfig
from medsight.node.transport import BadInstance, DicomWebClient, check_instance
from medsight.utils import atomic_write_bytes

KEYS = {"accession": "accession_number", "study": "study_uid"}


def read_labels(path: str | Path, key: str) -> dict[str, str]:
    """Labels CSV -> {key value: label}; ``key`` is 'accession' (column accession_number) or 'study'
    (column study_uid); the label column is ``label``."""
    if key not in KEYS:
        raise ConfigError(f"--key must be one of {', '.join(KEYS)}, got {key!r}")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"cannot read labels {p}: {e.strerror}") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    col = KEYS[key]
    if not rows or col not in rows[0] or "label" not in rows[0]:
        raise DataError(f"labels {p}: expected the columns {col} and label")
    out: dict[str, str] = {}
    for i, r in enumerate(rows, start=2):
        k, v = (r.get(col) or "").strip(), (r.get("label") or "").strip()
        if not k or not v:
            raise DataError(f"labels {p} line {i}: empty {col} or label")
        if k in out and out[k] != v:
            raise DataError(f"labels {p} line {i}: {col} given twice with different labels")
        out[k] = v
    return out


def export_cohort(cfg: NodeConfig, out_dir: str | Path, labels_csv: str | Path, *, key: str = "accession",
                  filters: dict | None = None, secret: str | None = None, mapping_csv: str | Path | None = None) -> dict:
    """Retrieve (WADO-RS) every series whose study has a label, de-identify into ``out_dir/images`` and write
    ``out_dir/manifest.csv`` (path, label, patient_id). Returns a summary (counts only, no identifiers)."""
    from medsight.data.deid import deidentify

    if cfg.dicomweb is None:
        raise ConfigError("node export retrieves by DICOMweb: the config needs pacs.dicomweb")
    labels = read_labels(labels_csv, key)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"cannot export into {out}: the folder is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    client = DicomWebClient(cfg.dicomweb)
    work = Path(tempfile.mkdtemp(prefix=".medsight-export-", dir=out.parent))  # 0700
    summary = {"series": 0, "instances": 0, "refused": 0, "unlabelled_series": 0}
    try:
        raw = work / "raw"
        label_of: dict[str, str] = {}
        n = 0
        for row in client.series_rows(filters or {}):
            k = row["accession"] if key == "accession" else row["study"]
            if k not in labels:
                summary["unlabelled_series"] += 1
                continue
            summary["series"] += 1
            for data in client.retrieve_series(row["study"], row["series"]):
                try:
                    check_instance(data, cfg.max_instance_bytes)
                except BadInstance:
                    summary["refused"] += 1
                    continue
                rel = f"{n:07d}.dcm"
                n += 1
                atomic_write_bytes(raw / rel, data, private=True)
                label_of[rel] = labels[k]
                summary["instances"] += 1
        if not label_of:
            raise DataError("node export: no instance of a labelled study was found on the PACS")
        mp = Path(mapping_csv) if mapping_csv is not None else work / "mapping.csv"
        deid = deidentify(raw, out / "images", mapping_csv=mp, secret=secret)
        files = {}
        with open(mp, newline="") as fh:
            for kind, old, new in csv.reader(fh):
                if kind == "file":
                    files[old] = new
        lines = ["path,label,patient_id"]
        for rel, label in sorted(label_of.items()):
            new = files.get(rel)
            if new is None:  # held back by de-identification (burned-in text, unreadable)
                continue
            lines.append(f"images/{new},{_csv(label)},{new.split('/')[0]}")
        if len(lines) == 1:
            raise DataError("node export: every retrieved instance was held back by de-identification")
        atomic_write_bytes(out / "manifest.csv", ("\n".join(lines) + "\n").encode(), private=True)
        summary.update(written=len(lines) - 1, held_back=len(deid["burned_in"]) + len(deid["errors"]),
                       patients=deid["patients"], manifest=str(out / "manifest.csv"))
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _csv(v: str) -> str:
    return '"' + v.replace('"', '""') + '"' if any(c in v for c in ',"\n') else v
