"""Results as DICOM: a Comprehensive SR with the model's findings and a Secondary Capture with the heatmap.

Both go into the source study with new UIDs derived from (series UID, bundle version, kind): a job redone
after a crash re-sends the very same instances, so the PACS keeps one copy. The SR content tree::

    CONTAINER Diagnostic imaging report (LN 18748-4)
      TEXT  Algorithm Name (DCM 111001)           model name
      TEXT  Algorithm Version (DCM 111003)        medsight.predict.model_version (name-sha12)
      TEXT  Weights SHA-256 (99MEDSIGHT)          sha256 of model.pt
      TEXT  Bundle route (99MEDSIGHT)             the routing rule's name
      TEXT  Comment (DCM 121106)                  "research use, not for diagnosis"
      CONTAINER Measurement Group (DCM 125007)    one per model input (a 2D image, or a 3D series)
        IMAGE Source of Measurement (DCM 121112)  each source instance used
        TEXT  Finding (DCM 121071)                predicted class name(s)
        NUM   Probability of positive class       (binary) or Probability of <class> per class
        NUM   Threshold                           the operating threshold (binary)
        TEXT  Threshold rule                      how the threshold was chosen (bundle.decision_text)
        TEXT  Decision                            0/1 (or the list for multi-label)
        TEXT  Needs review                        yes / no (medsight.review: the same rule as predict and the service)
        TEXT  Review reason                       one per reason
        NUM   OOD score                           when the bundle has a detector

:func:`read_sr` reads these values back (tests compare them with ``medsight predict``).
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsight.review import NO_VERDICT

CAPTION = "research use, not for diagnosis"
SCHEME = "99MEDSIGHT"
MANUFACTURER = "medsight"


def review_of(pred) -> tuple[bool, list[str]]:
    """The Prediction's needs-review flag and its reasons, as medsight.review decided them (the same decision
    and wording as ``predict``, the REST response and the page)."""
    return bool(pred.review), [str(r) for r in pred.review_reasons]


def result_uid(series_uid: str, bundle_version: str, kind: str) -> str:
    """A UID fixed by (source series, bundle version, kind): the same inputs always give the same UID."""
    import hashlib

    digest = hashlib.sha256(f"medsight-node\0{series_uid}\0{bundle_version}\0{kind}".encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"  # a 128-bit integer under the UUID-derived root


@functools.lru_cache(maxsize=512)
def _code(value: str, meaning: str, scheme: str = SCHEME):
    """One CodedConcept per code (building them is most of an SR's cost; highdicom copies them into items)."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _text(name, value: str):
    from highdicom.sr import RelationshipTypeValues, TextContentItem

    return TextContentItem(name=name, value=str(value)[:1024], relationship_type=RelationshipTypeValues.CONTAINS)


def _num(name, value: float):
    from highdicom.sr import NumContentItem, RelationshipTypeValues

    return NumContentItem(name=name, value=float(value), unit=_code("1", "no units", "UCUM"),
                          relationship_type=RelationshipTypeValues.CONTAINS)


C_ROOT = ("18748-4", "Diagnostic imaging report", "LN")
C_ALGO = ("111001", "Algorithm Name", "DCM")
C_VERSION = ("111003", "Algorithm Version", "DCM")
C_SHA = ("WSHA256", "Weights SHA-256", SCHEME)
C_ROUTE = ("ROUTE", "Bundle route", SCHEME)
C_COMMENT = ("121106", "Comment", "DCM")
C_GROUP = ("125007", "Measurement Group", "DCM")
C_SOURCE = ("121112", "Source of Measurement", "DCM")
C_FINDING = ("121071", "Finding", "DCM")
C_PPOS = ("PPOS", "Probability of positive class", SCHEME)
C_THR = ("THR", "Threshold", SCHEME)
C_RULE = ("THRRULE", "Threshold rule", SCHEME)
C_DECISION = ("DECISION", "Decision", SCHEME)
C_REVIEW = ("REVIEW", "Needs review", SCHEME)
C_REASON = ("REVREASON", "Review reason", SCHEME)
C_OOD = ("OODSCORE", "OOD score", SCHEME)


def _c(t):
    return _code(t[0], t[1], t[2])


@dataclass
class Finding:
    """One model input's result: the source instances it was computed from and its Prediction."""

    sources: list  # pydicom Datasets (headers) of the instances used
    prediction: object


def _group(f: Finding, *, positive_class: str | None, rule: str):
    from highdicom.sr import (
        ContainerContentItem,
        ImageContentItem,
        RelationshipTypeValues,
    )

    p = f.prediction
    g = ContainerContentItem(name=_c(C_GROUP), relationship_type=RelationshipTypeValues.CONTAINS)
    items = []
    for ds in f.sources:
        items.append(ImageContentItem(name=_c(C_SOURCE), referenced_sop_class_uid=ds.SOPClassUID,
                                      referenced_sop_instance_uid=ds.SOPInstanceUID,
                                      relationship_type=RelationshipTypeValues.CONTAINS))
    if p.predicted is None:  # out of distribution: no class verdict, anywhere
        items.append(_text(_c(C_FINDING), NO_VERDICT))
    else:
        predicted = p.predicted if isinstance(p.predicted, list) else [p.predicted]
        items.append(_text(_c(C_FINDING), ", ".join(str(x) for x in predicted) or "none"))
    if positive_class is not None:
        items.append(_num(_c(C_PPOS), p.probabilities[positive_class]))
    else:
        for i, (cls, v) in enumerate(p.probabilities.items()):
            items.append(_num(_code(f"PCLASS{i}", f"Probability of {cls}"[:64]), v))
    thr = p.threshold
    if thr is not None and not isinstance(thr, list):
        items.append(_num(_c(C_THR), thr))
    elif isinstance(thr, list):
        items.append(_text(_c(C_THR), ", ".join(f"{t:.6g}" for t in thr)))
    items.append(_text(_c(C_RULE), rule))
    items.append(_text(_c(C_DECISION), NO_VERDICT if p.decision is None else str(p.decision)
                       if not isinstance(p.decision, list) else ", ".join(str(d) for d in p.decision)))
    review, reasons = review_of(p)
    items.append(_text(_c(C_REVIEW), "yes" if review else "no"))
    for r in reasons:
        items.append(_text(_c(C_REASON), r))
    if getattr(p, "ood_score", None) is not None:
        items.append(_num(_c(C_OOD), p.ood_score))
    g.ContentSequence = items
    return g


def series_description(route: str, kind: str) -> str:
    return f"medsight {route} {kind}"[:64]


def build_sr(findings: Sequence[Finding], *, bundle, version: str, route: str, series_uid: str):
    """The Comprehensive SR for one source series (``findings``: one per model input)."""
    from highdicom.sr import ComprehensiveSR, ContainerContentItem

    from medsight.bundle import decision_text

    sources = [ds for f in findings for ds in f.sources]
    root = ContainerContentItem(name=_c(C_ROOT))
    items = [_text(_c(C_ALGO), bundle.meta.model.name), _text(_c(C_VERSION), version),
             _text(_c(C_SHA), bundle.weights_sha256), _text(_c(C_ROUTE), route), _text(_c(C_COMMENT), CAPTION)]
    rule = decision_text(bundle.meta)
    for f in findings:
        items.append(_group(f, positive_class=bundle.positive_class, rule=rule))
    root.ContentSequence = items
    sr = ComprehensiveSR(evidence=sources, content=root,
                         series_instance_uid=result_uid(series_uid, version, "sr-series"), series_number=9901,
                         sop_instance_uid=result_uid(series_uid, version, "sr"), instance_number=1,
                         manufacturer=MANUFACTURER, is_complete=True)
    sr.SeriesDescription = series_description(route, "SR")
    return sr


def _caption_image(png: bytes, lines: Sequence[str], min_width: int = 384) -> np.ndarray:
    """The overlay PNG scaled up (nearest, integer factor) with a black caption strip burned in below it."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.open(io.BytesIO(png)).convert("RGB")
    k = max(1, -(-min_width // img.width))
    img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    font = ImageFont.load_default()
    line_h = 14
    canvas = Image.new("RGB", (img.width, img.height + line_h * len(lines) + 6), (0, 0, 0))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        draw.text((4, img.height + 3 + i * line_h), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _orientation(ds) -> tuple[str, str] | None:
    """PatientOrientation of a 2D source (its own, or from ImageOrientationPatient); None when unknown."""
    po = list(getattr(ds, "PatientOrientation", None) or [])
    if len(po) == 2 and all(re.fullmatch(r"[LRAPHF]{1,3}", str(v)) for v in po):
        return str(po[0]), str(po[1])
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return None

    def letters(v) -> str:
        pos, neg = "LPH", "RAF"
        order = np.argsort(-np.abs(v))
        return "".join((pos if v[i] > 0 else neg)[i] for i in order if abs(v[i]) > 0.1)[:3] or None

    row, col = letters(np.asarray(iop[:3], float)), letters(np.asarray(iop[3:], float))
    return (row, col) if row and col else None


def build_sc(finding: Finding, *, predictor, version: str, route: str, series_uid: str):
    """Secondary Capture: the heatmap over the model input with the caption burned in."""
    from highdicom.sc import SCImage

    p = finding.prediction
    png = predictor.overlay(p.image, p.heatmap)
    pos = predictor.bundle.positive_class
    head = (f"P({pos}) = {p.probabilities[pos]:.3f}" if pos is not None else f"finding: {p.predicted}")
    pixels = _caption_image(png, [CAPTION.upper(), f"medsight {version}"[:60], head[:60]])
    ref = finding.sources[0]
    orient = _orientation(ref) if len(finding.sources) == 1 else None
    sc = SCImage.from_ref_dataset(
        ref, pixels, "RGB", 8, "PATIENT", series_instance_uid=result_uid(series_uid, version, "sc-series"),
        series_number=9902, sop_instance_uid=result_uid(series_uid, version, "sc"), instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=orient or ("L", "F"), transfer_syntax_uid="1.2.840.10008.1.2.1")
    if orient is None:  # not derivable (a montage of a volume, or no orientation in the source): left empty
        sc.PatientOrientation = ""
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = series_description(route, "heatmap")
    sc.ImageComments = CAPTION
    return sc


def strongest(findings: Sequence[Finding], positive_class: str | None) -> Finding:
    """The finding shown in the Secondary Capture: the highest positive-class (or top-class) probability."""
    def key(f):
        pr = f.prediction.probabilities
        return pr[positive_class] if positive_class is not None else max(pr.values())
    return max(findings, key=key)


def read_sr(ds) -> dict:
    """The values of an SR written by :func:`build_sr`: model fields and one dict per measurement group."""
    def name(item):
        return str(item.ConceptNameCodeSequence[0].CodeMeaning)

    def value(item):
        vt = item.ValueType
        if vt == "TEXT":
            return str(item.TextValue)
        if vt == "NUM":
            return float(item.MeasuredValueSequence[0].NumericValue)
        if vt == "IMAGE":
            return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        return None

    out: dict = {"groups": []}
    for item in ds.ContentSequence:
        if item.ValueType == "CONTAINER":
            g: dict = {"sources": [], "reasons": []}
            for sub in item.ContentSequence:
                n, v = name(sub), value(sub)
                if n == C_SOURCE[1]:
                    g["sources"].append(v)
                elif n == C_REASON[1]:
                    g["reasons"].append(v)
                else:
                    g[n] = v
            out["groups"].append(g)
        else:
            out[name(item)] = value(item)
    return out
