"""DICOM de-identification by allow-list, checked afterwards by a verifier.

What :func:`deidentify` does to each DICOM file below ``in_dir`` (the input is never modified):

* **Allow-list.** Only attributes in :data:`KEEP` are kept verbatim: the pixel data and what is needed
  to read it (image pixel module, rescale / LUT / window, geometry, multi-frame functional groups) and
  acquisition-technical numbers. Everything else is handled by its value representation:

  - ``PN``: ``PatientName`` becomes the patient pseudonym; the patient's other names are removed;
    every other person name becomes ``PERSON-<hmac>``.
  - ``PatientID`` becomes the patient pseudonym (secret-keyed HMAC: the same patient gets the same
    pseudonym, so patient-level splits still work).
  - ``DA`` and the date part of ``DT`` are shifted by one per-patient offset (1..3650 days back, from
    the secret), so intervals are preserved; ``PatientBirthDate`` is emptied. ``TM`` values and the
    time part of ``DT`` are kept: the shift is a whole number of days, so times stay consistent.
  - ``UI``: UIDs that name a class or a transfer syntax are kept; every other UID is replaced by
    ``generate_uid(entropy_srcs=[secret, uid])`` everywhere (file meta and nested sequences
    included), so references across files stay consistent.
  - everything else (AE titles, URLs, free text LO/LT/ST/UT/UC/SH, codes, numbers, OB/OW/UN
    payloads, unknown public tags, overlays, curves, sequences not on the list) is removed.
    Sequences on the list are walked with the same rules.
* private tags are removed (unless ``keep_private``).
* the file meta is rebuilt from the required elements only (SOP class, remapped SOP instance,
  transfer syntax, medsight's implementation class UID and version name).
* ``PatientIdentityRemoved`` = ``YES``, ``DeidentificationMethod``, the method code sequence
  (DCM 113100 Basic Profile, 113107 Modified Dates) and ``LongitudinalTemporalInformationModified``.
* outputs are named ``<pseudo-patient>/<study-uid>/<series-uid>/<sop-uid>.dcm`` (new UIDs), never by
  input file or folder names.
* files likely to carry burned-in text (``BurnedInAnnotation`` YES, or modality US/SC/XC/OT/ES or a
  Secondary Capture SOP class without ``BurnedInAnnotation`` NO) are held back, and listed, unless
  ``allow_burned_in``. Pixels are never re-encoded: burned-in text is not removed.
* the codestream: text-bearing segments not needed to decode are removed from every encapsulated frame
  (JPEG / JPEG-LS ``COM`` and ``APPn`` but a cut-down APP14 Adobe, JPEG 2000 ``COM`` in main and tile-part
  headers, bytes after the end marker; ``readers.codestream``); the 128-byte preamble is written as zeros.
* each file is read within a budget (``readers.TOOL_BUDGET``: capped inflation of deflated data sets, header
  sizes and codestream headers checked, nothing decoded), cleaned, written 0600 (folders 0700) and verified
  on its own: its bytes (deflated data sets inflated; native pixel data left out; compressed frames searched
  in every marker segment) and its relative path are searched for every identifying value of THAT input
  (removed or replaced names, identifiers, text, AE titles, URLs, dates, instance UIDs, the input's folder and
  file name parts; as UTF-8/Latin-1, and UTF-16 for values of 5 or more characters). A value the file also
  holds in a kept code or number, or in text medsight writes, is not counted. Then every output is checked
  against the run's original patient identifiers. A file that cannot be read, cleaned or verified is held
  back and listed by its input path with the reason (never the value, never a temporary path); the others
  are written (the run is built in a temporary folder renamed into place at the end).
* :func:`deidentify_file` does one file with pseudonyms, UIDs and offsets from the secret alone (any order,
  any process).

:data:`E1_1_TABLE` (``ps3_15_e1_1.csv``) is PS3.15 Table E.1-1 (tag, keyword, name, Basic Profile
action) kept as data; the tests plant a value in every row and check it does not survive.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import secrets as _secrets
import shutil
import tempfile
import warnings
from importlib import resources
from pathlib import Path

from medsight.errors import DataError

log = logging.getLogger(__name__)


def _load_table() -> list[dict]:
    with resources.files("medsight.data").joinpath("ps3_15_e1_1.csv").open("r", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


#: PS3.15 Table E.1-1 as rows {tag, keyword, name, basic_profile}.
E1_1_TABLE: list[dict] = _load_table()

#: Attributes kept verbatim (sequences among them are walked with the same rules). Nothing here
#: names a person, place, institution, device or time: pixels, how to read them, and geometry.
KEEP: frozenset[str] = frozenset(
    """
    SpecificCharacterSet ImageType Modality SeriesNumber InstanceNumber AcquisitionNumber ImagesInAcquisition
    PatientOrientation PatientPosition ViewPosition BodyPartExamined Laterality ImageLaterality ConversionType
    BurnedInAnnotation RecognizableVisualFeatures QualityControlImage PresentationLUTShape
    LossyImageCompression LossyImageCompressionRatio LossyImageCompressionMethod
    SamplesPerPixel PhotometricInterpretation Rows Columns BitsAllocated BitsStored HighBit PixelRepresentation
    PlanarConfiguration PixelAspectRatio SmallestImagePixelValue LargestImagePixelValue PixelPaddingValue
    PixelPaddingRangeLimit NumberOfFrames FrameIncrementPointer FrameTime
    RedPaletteColorLookupTableDescriptor GreenPaletteColorLookupTableDescriptor BluePaletteColorLookupTableDescriptor
    RedPaletteColorLookupTableData GreenPaletteColorLookupTableData BluePaletteColorLookupTableData
    SegmentedRedPaletteColorLookupTableData SegmentedGreenPaletteColorLookupTableData
    SegmentedBluePaletteColorLookupTableData
    PixelData FloatPixelData DoubleFloatPixelData ExtendedOffsetTable ExtendedOffsetTableLengths
    RescaleSlope RescaleIntercept RescaleType ModalityLUTSequence ModalityLUTType LUTDescriptor LUTData
    VOILUTSequence WindowCenter WindowWidth VOILUTFunction
    PixelSpacing ImagerPixelSpacing NominalScannedPixelSpacing PixelSpacingCalibrationType
    EstimatedRadiographicMagnificationFactor SliceThickness SpacingBetweenSlices ImagePositionPatient
    ImageOrientationPatient SliceLocation
    SharedFunctionalGroupsSequence PerFrameFunctionalGroupsSequence PixelMeasuresSequence PlanePositionSequence
    PlaneOrientationSequence PixelValueTransformationSequence FrameVOILUTSequence FrameContentSequence
    FrameAcquisitionNumber InStackPositionNumber TemporalPositionIndex DimensionIndexValues
    KVP XRayTubeCurrent ExposureTime Exposure ExposureInuAs ReconstructionDiameter GantryDetectorTilt
    TableHeight RotationDirection CTDIvol SpiralPitchFactor DataCollectionDiameter
    ScanningSequence SequenceVariant ScanOptions MRAcquisitionType RepetitionTime EchoTime InversionTime
    EchoTrainLength FlipAngle MagneticFieldStrength ImagingFrequency NumberOfAverages EchoNumbers
    DiffusionBValue PercentSampling PercentPhaseFieldOfView PixelBandwidth AcquisitionMatrix
    InPlanePhaseEncodingDirection
    DistanceSourceToDetector DistanceSourceToPatient BodyPartThickness CompressionForce
    Units DecayCorrection CorrectedImage SeriesType
    ReferencedImageSequence SourceImageSequence ReferencedSeriesSequence ReferencedFrameNumber
    """.split()
)

#: Kept LO attributes whose values are defined terms: kept only when the value is one of them.
_DEFINED_TERMS = {
    "RescaleType": {"OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"},
    "ModalityLUTType": {"OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"},
}
#: The patient's other names: removed, not pseudonymised.
_REMOVE_PN = {"OtherPatientNames", "PatientBirthName", "PatientMotherBirthName"}
#: UID attributes that name a class or syntax, not an instance: kept.
_KEEP_UIDS = {"TransferSyntaxUID", "CodingSchemeUID", "ContextUID", "MappingResourceUID", "PrivateInformationCreatorUID",
              "ImplementationClassUID"}
#: Modalities whose images often carry burned-in text; Secondary Capture SOP classes likewise.
BURNED_IN_MODALITIES = frozenset({"US", "SC", "XC", "OT", "ES"})
_SECONDARY_CAPTURE = ("1.2.840.10008.5.1.4.1.1.7",)

#: DeidentificationMethod (LO: at most 64 characters per value).
DEID_METHOD = ["medsight allow-list: technical attributes kept, rest removed",
               "names pseudonymised, UIDs remapped, dates shifted per patient"]
KEPT_PRIVATE = "except private attributes: kept as they were (keep_private)"
IMPLEMENTATION_VERSION_NAME = "MEDSIGHT_DEID"

_TEXT_VRS = {"PN", "LO", "SH", "LT", "ST", "UT", "UC", "AE", "UR"}
_KIND = {"PN": "person name", "LO": "identifier or text", "SH": "identifier or text", "LT": "free text", "ST": "free text",
         "UT": "free text", "UC": "free text", "AE": "application entity title", "UR": "URL", "DA": "date", "DT": "date",
         "UI": "UID"}


class _Context:
    def __init__(self, secret: bytes):
        self.secret = secret
        self.uid_map: dict[str, str] = {}
        self.patient_map: dict[str, str] = {}
        self.offsets: dict[str, int] = {}

    def digest(self, *parts: str) -> str:
        msg = "\x1f".join(parts).encode("utf-8")
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def uid(self, old: str) -> str:
        from pydicom.uid import generate_uid

        old = str(old).strip()
        if old not in self.uid_map:
            self.uid_map[old] = str(generate_uid(entropy_srcs=[self.secret.hex(), old]))
        return self.uid_map[old]

    def pseudonym(self, patient_key: str) -> str:
        if patient_key not in self.patient_map:
            self.patient_map[patient_key] = "ANON-" + self.digest("patient", patient_key)[:12].upper()
        return self.patient_map[patient_key]

    def person(self, name: str) -> str:
        return "PERSON-" + self.digest("person", name)[:10].upper()

    def offset_days(self, patient_key: str) -> int:
        if patient_key not in self.offsets:
            # between 1 and 3650 days into the past, fixed per patient and secret
            self.offsets[patient_key] = -(1 + int(self.digest("dateshift", patient_key)[:8], 16) % 3650)
        return self.offsets[patient_key]


def _shift_date(value: str, days: int) -> str:
    """Shift a DA or DT value by whole days (the time part of a DT is kept); '' when not a date."""
    v = str(value).strip()
    if len(v) < 8 or not v[:8].isdigit() or not re.fullmatch(r"\d{0,6}(\.\d{1,6})?([+-]\d{4})?", v[8:]):
        return ""  # not one date (a range, free text): dropped rather than half shifted
    try:
        d = dt.date(int(v[:4]), int(v[4:6]), int(v[6:8])) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return d.strftime("%Y%m%d") + v[8:]


def _values(value) -> list:
    from pydicom.multival import MultiValue

    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


#: UIDs the table says to replace (``U``) even though their name looks like a class UID.
_TABLE_U = frozenset(r["keyword"] for r in E1_1_TABLE if "U" in r["basic_profile"])


def _is_class_uid(keyword: str) -> bool:
    return keyword not in _TABLE_U and (keyword in _KEEP_UIDS or keyword.endswith("ClassUID"))


def _remap_uid(value: str, ctx: _Context) -> str:
    s = str(value).strip()
    if not s or s.startswith("1.2.840.10008."):
        return s  # a DICOM-defined UID (SOP class, transfer syntax, ...) identifies nobody
    return ctx.uid(s)


def _map_values(elem, fn) -> None:
    vals = [fn(v) for v in _values(elem.value)]
    elem.value = vals if len(vals) != 1 else vals[0]


class _Record:
    """Per input file: the identifying values removed or replaced (needles for the verifier), and the
    values the output legitimately holds (kept or generated), which are not leaks."""

    def __init__(self):
        self.needles: dict[str, str] = {}  # value -> kind
        self.allowed: set[str] = set()

    def needle(self, value, kind: str) -> None:
        s = str(value).strip().strip("\x00").strip()
        if len(s) >= 3:
            self.needles.setdefault(s, kind)

    def needle_elem(self, elem) -> None:
        if elem.VR == "SQ":
            for item in elem.value or []:
                for sub in item:
                    self.needle_elem(sub)
            return
        kind = _KIND.get(elem.VR)
        if kind is None:
            return
        for v in _values(elem.value):
            s = str(v)
            self.needle(s, kind)
            if elem.VR == "PN":
                for part in re.split(r"[\^=]", s):
                    self.needle(part, kind)
            elif elem.VR == "DT":
                self.needle(s[:8], kind)


def _clean(ds, ctx: _Context, patient_key: str, rec: _Record, keep_private: bool) -> None:
    """Apply the allow-list to ``ds`` and, recursively, to the items of kept sequences."""
    days = ctx.offset_days(patient_key)
    for elem in list(ds):
        tag = elem.tag
        if tag.is_private:
            if keep_private:
                continue
            rec.needle_elem(elem)
            del ds[tag]
            continue
        kw = elem.keyword or ""
        vr = elem.VR
        if tag.group == 0x0002 or not kw:
            rec.needle_elem(elem)
            del ds[tag]
        elif kw in ("PatientID", "PatientName"):
            rec.needle_elem(elem)
            elem.value = ctx.pseudonym(patient_key)
            rec.allowed.add(elem.value)
        elif kw in KEEP:
            if vr == "SQ":
                for item in elem.value or []:
                    _clean(item, ctx, patient_key, rec, keep_private)
            elif kw in _DEFINED_TERMS:
                value = str(elem.value or "").strip()
                if value in _DEFINED_TERMS[kw]:
                    rec.allowed.add(value)
                else:
                    rec.needle_elem(elem)
                    del ds[tag]
            elif vr == "UI":  # e.g. a UID kept inside a functional group: still remapped
                rec.needle_elem(elem)
                _map_values(elem, lambda v: _remap_uid(v, ctx))
                rec.allowed.update(str(v) for v in _values(elem.value))
            elif vr in _TEXT_VRS:
                rec.needle_elem(elem)  # text is never trusted: were it ever allow-listed, the verifier fails the run
            else:  # kept codes and numbers may contain a needle by chance
                rec.allowed.update(str(v).strip() for v in _values(elem.value) if isinstance(v, (str, int, float)))
        elif vr == "UI":
            if _is_class_uid(kw):
                rec.allowed.update(str(v).strip() for v in _values(elem.value))
                continue
            rec.needle_elem(elem)
            _map_values(elem, lambda v: _remap_uid(v, ctx))
            rec.allowed.update(str(v) for v in _values(elem.value))
        elif vr == "PN":
            rec.needle_elem(elem)
            if kw in _REMOVE_PN:
                del ds[tag]
            else:
                _map_values(elem, lambda v: ctx.person(str(v)) if str(v).strip() else "")
                rec.allowed.update(str(v) for v in _values(elem.value))
        elif vr in ("DA", "DT"):
            rec.needle_elem(elem)
            if kw == "PatientBirthDate":
                elem.value = ""
            else:
                _map_values(elem, lambda v: _shift_date(v, days))
                rec.allowed.update(str(v) for v in _values(elem.value))
        elif vr == "TM" and kw != "PatientBirthTime":
            rec.allowed.update(str(v).strip() for v in _values(elem.value))  # kept: the shift is whole days
        else:
            rec.needle_elem(elem)
            del ds[tag]


def _set_method(ds, keep_private: bool) -> None:
    from pydicom.dataset import Dataset

    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEID_METHOD + ([KEPT_PRIVATE] if keep_private else [])
    codes = []
    for value, meaning in (("113100", "Basic Application Confidentiality Profile"),
                           ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")):
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    ds.LongitudinalTemporalInformationModified = "MODIFIED"


def _generated_text() -> set[str]:
    return {*DEID_METHOD, KEPT_PRIVATE, "YES", "MODIFIED", "DCM", "ANON", "PERSON", "113100", "113107", IMPLEMENTATION_VERSION_NAME,
            "Basic Application Confidentiality Profile", "Retain Longitudinal Temporal Information Modified Dates Option"}


def implementation_class_uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["medsight de-identification"]))


def _file_meta(ds, old_meta, sop_uid: str):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    fm = FileMetaDataset()
    sop_class = ds.get("SOPClassUID") or (old_meta.get("MediaStorageSOPClassUID") if old_meta is not None else None)
    if sop_class:
        fm.MediaStorageSOPClassUID = str(sop_class)
    fm.MediaStorageSOPInstanceUID = sop_uid
    tsuid = old_meta.get("TransferSyntaxUID") if old_meta is not None else None
    fm.TransferSyntaxUID = tsuid or ExplicitVRLittleEndian
    fm.ImplementationClassUID = implementation_class_uid()
    fm.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return fm


def is_dicom_file(p: Path) -> bool:
    """Is ``p`` a DICOM file? Asked of the readers' registry (``medsight.data.readers.file_format``), the one
    owner of file signatures."""
    from medsight.data.readers import file_format

    return file_format(p) == "dicom"


def burned_in_reason(ds) -> str | None:
    """Why ``ds`` may carry burned-in text (None when it is not expected to)."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation YES"
    if flag == "NO":
        return None
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in BURNED_IN_MODALITIES:
        return f"modality {modality} without BurnedInAnnotation"
    if str(ds.get("SOPClassUID", "") or "").startswith(_SECONDARY_CAPTURE):
        return "Secondary Capture without BurnedInAnnotation"
    return None


def _path_needles(rel: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    parts = list(rel.parent.parts) + [rel.stem if rel.suffix.lower() in (".dcm", ".dicom", ".ima") else rel.name]
    for part in parts:
        for tok in [part, *re.split(r"[^A-Za-z0-9]+", part)]:
            if len(tok) >= 3:
                out.setdefault(tok, "file or folder name")
    return out


_ALNUM = re.compile(r"[A-Za-z0-9]+")
_NUMBER = re.compile(r"[0-9.]+")


def _tokens(text: str) -> set[str]:
    return set(_ALNUM.findall(text)) | set(_NUMBER.findall(text))


def _key(value: str) -> str | None:
    """A token every bounded occurrence of the needle shows whole: a number or UID itself, else the needle's
    longest letter/digit run."""
    if _NUMBER.fullmatch(value):
        return value
    runs = _ALNUM.findall(value)
    return max(runs, key=len) if runs else None


def _bounded(value: str, text: str) -> bool:
    """``value`` occurs in ``text`` not as part of a longer letter/digit run (digits and UIDs: of a longer
    dotted number)."""
    if value not in text:
        return False
    inner = "0-9." if re.fullmatch(r"[0-9.]+", value) else "A-Za-z0-9"
    return re.search(f"(?<![{inner}])" + re.escape(value) + f"(?![{inner}])", text) is not None


def _views(data: bytes) -> tuple[list[str], list[str]]:
    """Text views of raw bytes: (Latin-1 and UTF-8, UTF-16-LE at both byte alignments)."""
    narrow = [data.decode("latin-1"), data.decode("utf-8", errors="replace")]
    wide = [data.decode("utf-16-le", errors="replace"), data[1:].decode("utf-16-le", errors="replace")]
    return narrow, wide


def _searchable_bytes(path: Path) -> bytes:
    """The bytes a verifier searches in an output file: every byte (a deflated data set inflated first), except
    pixels themselves: native pixel data are left out, compressed frames keep every marker segment (comments,
    application segments, headers) and lose only their entropy-coded data. Anything that cannot be parsed is
    searched whole."""
    import zlib

    import pydicom
    from pydicom.encaps import generate_frames

    from medsight.data.readers.codestream import frame_text
    from medsight.data.readers.dicom import DEFLATED_TS

    raw = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
    except Exception:
        return raw  # scan every byte
    fm = getattr(ds, "file_meta", None)
    ts = str(fm.get("TransferSyntaxUID", "")) if fm is not None else ""
    if ts == DEFLATED_TS:
        from pydicom.filereader import _read_file_meta_info, read_preamble

        try:
            import io as _io

            fh = _io.BytesIO(raw)
            read_preamble(fh, True)
            _read_file_meta_info(fh)
            pos = fh.tell()
            raw = raw[:pos] + zlib.decompress(raw[pos:], -zlib.MAX_WBITS)
        except Exception:
            return raw
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if kw not in ds:
            continue
        px = ds[kw].value
        if not isinstance(px, (bytes, bytearray)) or len(px) < 16:
            continue
        i = raw.rfind(px)  # the pixel data come last; the preamble may look the same
        if i < 0:
            continue
        keep: bytes = b""
        if kw == "PixelData" and getattr(getattr(fm, "TransferSyntaxUID", None), "is_compressed", False):
            try:
                n = int(ds.get("NumberOfFrames") or 1)
                keep = b"\0".join(frame_text(f, ts) for f in generate_frames(bytes(px), number_of_frames=n))
            except Exception:
                keep = bytes(px)  # not parseable: search every byte
        raw = raw[:i] + keep + raw[i + len(px):]
    return raw


def _index(needles: dict[str, str]) -> dict[str | None, list[str]]:
    index: dict[str | None, list[str]] = {}
    for value in needles:
        index.setdefault(_key(value), []).append(value)
    return index


def find_leak(path: Path, rel: str, needles: dict[str, str], allowed: set[str],
              index: dict[str | None, list[str]] | None = None) -> tuple[str, str, bool] | None:
    """The first of ``needles`` (value -> kind) that survives in output ``path`` (named ``rel`` below the output
    root): ``(value, kind, in_path)``, or None. ``allowed`` are values the file legitimately holds."""
    index = _index(needles) if index is None else index
    narrow, wide = _views(_searchable_bytes(path))
    rel_text = rel.removesuffix(".dcm")
    tokens = _tokens(rel_text).union(*(_tokens(v) for v in narrow + wide))
    candidates = list(index.get(None, ()))
    for tok in tokens:
        candidates.extend(index.get(tok, ()))
    if not candidates:
        return None
    allowed = {str(v).strip() for v in allowed} | _generated_text()
    allowed_text = "\n".join(sorted(allowed))
    for value in candidates:
        if value in allowed or _bounded(value, allowed_text):
            continue  # the file holds this text legitimately (a kept or generated value contains it)
        if _bounded(value, rel_text):
            return value, needles[value], True
        if any(_bounded(value, v) for v in narrow) or (len(value) >= 5 and any(_bounded(value, v) for v in wide)):
            return value, needles[value], False
    return None


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def verify(out_root: Path, needles: dict[str, str], allowed_by_file: dict[str, set[str]]) -> None:
    """Raise :class:`DataError` when any of ``needles`` (value -> kind) occurs in an output file below
    ``out_root`` (headers, preamble, codestream marker segments; deflated data sets inflated; as Latin-1/UTF-8,
    and as UTF-16 for values of 5 or more characters) or in its relative path, unless the file legitimately holds
    it (``allowed_by_file[rel]``: kept codes and numbers, generated values, or medsight's own text).

    Needles are indexed by their longest letter/digit run, so each file costs one tokenisation plus
    a check of the needles whose run it contains (linear in the output, not files x needles)."""
    index = _index(needles)
    for path in sorted(p for p in out_root.rglob("*") if p.is_file()):
        rel = path.relative_to(out_root).as_posix()
        hit = find_leak(path, rel, needles, allowed_by_file.get(rel, set()), index)
        if hit is not None:
            _, kind, in_path = hit
            where = f"the output path {rel}" if in_path else rel
            raise DataError(f"de-identification verifier: {_a(kind)} from the input survived in {where}; nothing written")


def _prepare_out(dst: Path) -> None:
    if dst.exists():
        if not dst.is_dir():
            raise DataError(f"cannot de-identify into {dst}: exists and is not a folder")
        if any(dst.iterdir()):
            raise DataError(f"cannot de-identify into {dst}: the folder is not empty (give a new or empty folder)")


def _reason(e: BaseException) -> str:
    """A held-back file's reason, on one line, without values from the file (decoder and parser messages can
    quote them): medsight's own refusals keep their words, other errors only their type."""
    if isinstance(e, DataError):
        msg = str(e).split(": ", 1)[-1]
        return re.sub(r"\((\w+): [^()]*\)", r"(\1)", msg)
    return f"cannot de-identify ({_safe_reason(e)})"


def _safe_reason(e: BaseException) -> str:
    """Why a file failed, without any value from the file: the exception type, the attribute or key it concerned
    (a DICOM keyword or a Python name, never a header value), else a fixed description."""
    name = type(e).__name__
    if isinstance(e, AttributeError) and getattr(e, "name", None):
        return f"{name}: the dataset has no {e.name!r}"
    if isinstance(e, AttributeError) and str(e):  # pydicom names missing elements by tag and keyword: kept, with
        text = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", " ".join(str(e).split()))  # any quoted value masked
        return f"{name}: {text[:200]}"
    if isinstance(e, KeyError):
        return f"{name}: a required element is missing"
    if isinstance(e, (ValueError, TypeError)):
        return f"{name}: an element holds a value of the wrong form"
    if isinstance(e, (EOFError, OSError)):
        return f"{name}: the file ends early or cannot be read"
    return name


def _strip_codestreams(ds) -> bool:
    """Remove text-bearing segments (JPEG COM/APPn, JPEG 2000 COM, ...) from every encapsulated frame, pixels
    untouched; True when anything was removed."""
    from pydicom.encaps import encapsulate, generate_frames

    from medsight.data.readers.codestream import strip_frame

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" not in ds or ts is None or not getattr(ts, "is_compressed", False):
        return False
    n = int(ds.get("NumberOfFrames") or 1)
    frames = list(generate_frames(ds.PixelData, number_of_frames=n))
    new = [strip_frame(f, str(ts)) for f in frames]
    if new == frames:
        return False
    ds.PixelData = encapsulate(new, has_bot=n > 1)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    for kw in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):  # offsets into the old frames
        if kw in ds:
            del ds[kw]
    return True


class Cleaned:
    """One input file de-identified in memory: the data set to write, its output path (relative), why it may carry
    burned-in text, and the record of what was removed (needles) and what it legitimately holds (allowed)."""

    def __init__(self, ds, out_rel: Path, reason: str | None, rec: "_Record", patient_key: str, study: str | None):
        self.ds, self.out_rel, self.burned_in, self.record = ds, out_rel, reason, rec
        self.patient_key, self.study = patient_key, study


def clean_file(path: str | os.PathLike, ctx: "_Context", rel: str | os.PathLike, *, keep_private: bool = False,
               budget=None) -> Cleaned:
    """Read one DICOM file (within ``budget``: capped inflation, header sizes and codestreams checked, nothing
    decoded) and de-identify it in memory. Pseudonyms, UIDs and date offsets come from ``ctx``'s secret only,
    so the same file gives the same output in any run, process or order. Raises on a file that cannot be cleaned."""
    from medsight.data.readers import TOOL_BUDGET
    from medsight.data.readers.dicom import check_pixel_data, dcmread, ensure_transfer_syntax

    rel = Path(rel)
    budget = TOOL_BUDGET if budget is None else budget
    ds = dcmread(Path(path), rel, budget)
    if len(ds) == 0:
        raise DataError(f"cannot read {rel}: not a DICOM data set (no elements)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _ = list(ds)  # parse every element now, so a broken file fails here
        ensure_transfer_syntax(ds)  # a file without file meta: the syntax it was read with
        check_pixel_data(ds, rel, budget)
    rec = _Record()
    rec.needles.update(_path_needles(rel))
    reason = burned_in_reason(ds)
    patient_key = str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")
    if not patient_key:
        patient_key = "study:" + str(ds.get("StudyInstanceUID", "") or rel)
    old_meta = getattr(ds, "file_meta", None)
    if old_meta is not None:
        for elem in old_meta:
            if elem.keyword not in ("TransferSyntaxUID", "MediaStorageSOPClassUID", "ImplementationClassUID",
                                    "FileMetaInformationVersion", "FileMetaInformationGroupLength"):
                rec.needle_elem(elem)
    old_sop = ds.get("SOPInstanceUID") or (old_meta.get("MediaStorageSOPInstanceUID") if old_meta is not None else None)
    study_uid = str(ds.StudyInstanceUID) if "StudyInstanceUID" in ds else None
    study = ds.get("StudyInstanceUID") or f"no-study:{patient_key}"
    series = ds.get("SeriesInstanceUID") or f"no-series:{study}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _clean(ds, ctx, patient_key, rec, keep_private)
        sop_uid = ctx.uid(str(old_sop)) if old_sop else ctx.uid(f"file:{rel}")
        if "SOPInstanceUID" in ds:
            ds.SOPInstanceUID = sop_uid
        out_rel = Path(ctx.pseudonym(patient_key), ctx.uid(str(study)), ctx.uid(str(series)), sop_uid + ".dcm")
        ds.file_meta = _file_meta(ds, old_meta, sop_uid)
        _strip_codestreams(ds)
    rec.allowed.update({ctx.pseudonym(patient_key), sop_uid, str(ds.file_meta.get("MediaStorageSOPClassUID", "")),
                        str(ds.file_meta.TransferSyntaxUID), implementation_class_uid()})
    _set_method(ds, keep_private)
    ds.preamble = b"\0" * 128  # the input's preamble may hold anything: never copied
    return Cleaned(ds, out_rel, reason, rec, patient_key, study_uid)


def _save_private(ds, target: Path) -> None:
    """Write ``ds`` to ``target`` (0600; its new folders 0700) and fsync; nothing left behind on failure."""
    from medsight.utils import private_open

    for parent in reversed(target.parents):
        if not parent.exists():
            parent.mkdir(mode=0o700)
            os.chmod(parent, 0o700)
    try:
        with private_open(target, "xb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        target.unlink(missing_ok=True)  # never leave a half-written file to be verified and kept
        raise


def deidentify_file(path: str | os.PathLike, out_root: str | os.PathLike, *, secret: str | bytes,
                    rel: str | os.PathLike | None = None, keep_private: bool = False, allow_burned_in: bool = False,
                    budget=None) -> dict:
    """De-identify ONE file into ``out_root`` (written at its pseudonymous path, 0600) and verify that output
    against this file's own identifying values; the pseudonym, UIDs and date offset come from ``secret`` alone,
    so files may be processed in any order, process or machine. Returns ``{"input", "output" (relative, or None
    when held back), "burned_in" (reason or None), "patient" (original key: identifying), "pseudonym"}``.
    Raises :class:`DataError` naming ``rel`` when the file cannot be cleaned or verified (nothing is left)."""
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise DataError("cannot de-identify: the secret is empty")
    ctx = _Context(key)
    rel = Path(rel) if rel is not None else Path(Path(path).name)
    try:
        c = clean_file(path, ctx, rel, keep_private=keep_private, budget=budget)
    except Exception as e:
        raise DataError(f"cannot de-identify {rel}: {_reason(e)}") from None
    out = {"input": str(rel), "output": None, "burned_in": c.burned_in, "patient": c.patient_key,
           "pseudonym": ctx.pseudonym(c.patient_key)}
    if c.burned_in is not None and not allow_burned_in:
        return out
    target = Path(out_root) / c.out_rel
    if target.exists():
        raise DataError(f"cannot de-identify {rel}: another input file has the same SOP Instance UID; not written")
    try:
        _save_private(c.ds, target)
    except Exception as e:
        raise DataError(f"cannot de-identify {rel}: cannot write it ({type(e).__name__})") from None
    hit = find_leak(target, c.out_rel.as_posix(), c.record.needles, c.record.allowed)
    if hit is not None:
        target.unlink(missing_ok=True)
        where = "its output path" if hit[2] else "its output"
        raise DataError(f"cannot de-identify {rel}: verifier: {_a(hit[1])} from this file survived in {where}; not written")
    out["output"] = c.out_rel.as_posix()
    return out


def deidentify(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mapping_csv: str | os.PathLike | None = None,
    secret: str | bytes | None = None,
    keep_private: bool = False,
    allow_burned_in: bool = False,
    budget=None,
) -> dict:
    """De-identify every DICOM file below ``in_dir`` into ``out_dir`` (which must be new or empty).

    ``secret`` makes UIDs, pseudonyms and date offsets reproducible across runs (keep it secret:
    whoever has it can link outputs back to inputs by re-running); when None a random one is used.
    Each file is handled on its own (:func:`deidentify_file`: read within ``budget``, default
    ``readers.TOOL_BUDGET``; cleaned; written; verified against its own identifying values); then every output is
    checked against the run's original patient identifiers. A file that cannot be read, cleaned or verified is
    held back (not written) and listed in ``errors`` by its input path with the reason; the rest are written.
    Returns a JSON-serialisable summary: counts, ``skipped`` (non-DICOM files), ``errors`` (held-back files:
    ``{"path", "error"}``), ``burned_in`` (files that may carry burned-in text: held back unless
    ``allow_burned_in``); paths are relative to ``in_dir``. ``mapping_csv`` (only if given, written 0600)
    receives the original -> new identifiers and file names; it is identifying and must be stored securely.
    """
    src, dst = Path(in_dir).resolve(), Path(out_dir).resolve()
    if not src.is_dir():
        raise DataError(f"cannot de-identify {src}: not a folder")
    if dst == src or src in dst.parents:
        raise DataError(f"cannot de-identify {src}: the output folder {dst} must be outside the input folder")
    _prepare_out(dst)
    if mapping_csv is not None:
        mp = Path(mapping_csv).resolve()
        if dst in mp.parents or src in mp.parents:
            raise DataError(f"--mapping {mp}: the mapping re-identifies the output; write it outside the input and output folders")
    if secret is None:
        key = _secrets.token_bytes(32)
    else:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if not key:
            raise DataError("cannot de-identify: the secret is empty (give a long random string, or none for a random one)")
    ctx = _Context(key)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    summary: dict = {"in_dir": str(src), "out_dir": str(dst), "written": 0, "skipped": [], "errors": [],
                     "burned_in": [], "burned_in_written": bool(allow_burned_in)}
    studies: set[str] = set()
    written: dict[str, tuple[str, set[str]]] = {}  # output rel -> (input rel, allowed values)
    patients: dict[str, str] = {}  # original patient identifier -> the input file it came first from
    file_map: list[tuple[str, str]] = []
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".medsight-deid-", dir=dst.parent))  # 0700
    # pydicom warns about non-standard values quoting the values themselves (UIDs, names): never shown, counted
    lenient = warnings.catch_warnings(record=True)
    caught = lenient.__enter__()
    warnings.simplefilter("always")
    try:
        from medsight import progress

        for f in progress.track(files, "de-identifying"):
            rel = f.relative_to(src)
            if f.name.upper() == "DICOMDIR" or not is_dicom_file(f):
                summary["skipped"].append(str(rel))  # a DICOMDIR indexes identifying data; rebuild it instead
                continue
            try:
                c = clean_file(f, ctx, rel, keep_private=keep_private, budget=budget)
            except Exception as e:
                summary["errors"].append({"path": str(rel), "error": _reason(e)})
                continue
            if c.study:
                studies.add(c.study)
            if not c.patient_key.startswith("study:"):
                patients.setdefault(c.patient_key, str(rel))
            if c.burned_in is not None:
                summary["burned_in"].append(str(rel))
                if not allow_burned_in:
                    continue
            target = work / c.out_rel
            if target.exists():
                summary["errors"].append({"path": str(rel), "error": "another input file has the same SOP Instance UID; not written"})
                continue
            try:
                _save_private(c.ds, target)
            except Exception as e:
                summary["errors"].append({"path": str(rel), "error": f"cannot write its output ({_safe_reason(e)})"})
                continue
            out_rel = c.out_rel.as_posix()
            hit = find_leak(target, out_rel, c.record.needles, c.record.allowed)
            if hit is not None:
                target.unlink(missing_ok=True)
                where = "its output path" if hit[2] else "its output"
                summary["errors"].append({"path": str(rel), "error": f"verifier: {_a(hit[1])} from this file survived in {where}; not written"})
                continue
            written[out_rel] = (str(rel), c.record.allowed)
            file_map.append((str(rel), out_rel))
        # run-wide: no output holds another input's original patient identifier
        run_needles = {k: "patient identifier" for k in patients if len(k.strip()) >= 3}
        index = _index(run_needles)
        for out_rel, (src_rel, allowed) in sorted(written.items()):
            hit = find_leak(work / out_rel, out_rel, run_needles, allowed, index) if run_needles else None
            if hit is not None:
                (work / out_rel).unlink(missing_ok=True)
                del written[out_rel]
                file_map.remove((src_rel, out_rel))
                summary["errors"].append({"path": src_rel, "error": f"verifier: a patient identifier of {patients[hit[0]]} "
                                                                "survived in its output; not written"})
        summary["written"] = len(written)
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        lenient.__exit__(None, None, None)
    summary["warnings"] = len(caught)
    summary["patients"] = len(ctx.patient_map)
    summary["studies"] = len(studies)
    summary["uids_remapped"] = len(ctx.uid_map)
    summary["mapping_csv"] = None
    if mapping_csv is not None:
        summary["mapping_csv"] = str(_write_mapping(Path(mapping_csv), ctx, file_map))
    log.info("de-identified %d files (%d skipped, %d held back or flagged, %d errors)", summary["written"],
             len(summary["skipped"]), len(summary["burned_in"]), len(summary["errors"]))
    return summary


def _write_mapping(mp: Path, ctx: _Context, file_map: list[tuple[str, str]]) -> Path:
    from medsight.utils import atomic_write_text
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "original", "new"])
    for old, new in sorted(ctx.patient_map.items()):
        w.writerow(["patient", old, new])
    for old, days in sorted(ctx.offsets.items()):
        w.writerow(["date_offset_days", old, days])
    for old, new in sorted(ctx.uid_map.items()):
        w.writerow(["uid", old, new])
    for old, new in file_map:
        w.writerow(["file", old, new])
    return atomic_write_text(mp, buf.getvalue(), private=True)  # re-identifies the outputs: 0600
