"""DICOM de-identification: PS3.15 Annex E Basic Application Level Confidentiality Profile,
with the Retain Longitudinal Temporal Information with Modified Dates option.

What :func:`deidentify` does to each DICOM file below ``in_dir`` (written to the same relative path
below ``out_dir``; the input is never modified):

* every attribute of :data:`BASIC_PROFILE` gets its action (PS3.15 Table E.1-1a codes):
  ``D`` dummy value, ``Z`` empty, ``X`` remove, ``K`` keep, ``C`` clean (treated as ``Z``),
  ``U`` consistent new UID. Combined codes resolve to the most protective choice that keeps the
  file valid: ``X/Z``, ``X/D``, ``X/Z/D`` -> ``X``; ``Z/D`` -> ``Z``; ``X/Z/U*`` -> keep the sequence
  but remap the UIDs inside it.
* dates (DA, and the date part of DT) of attributes that are not removed outright are shifted by a
  per-patient offset derived from the secret, so intervals within a patient are preserved;
  ``PatientBirthDate`` is emptied.
* ``PatientID`` / ``PatientName`` become a pseudonym derived from the secret (so de-identified
  patients stay separable for patient-level splits).
* every UID that identifies an instance (not a SOP class / transfer syntax) is replaced by
  ``generate_uid(entropy_srcs=[secret, uid])`` everywhere, including the file meta and nested
  sequences, so references across files stay consistent.
* all private tags, curves (50xx) and overlay comments/data (60xx,3000 / 60xx,4000) are removed.
* ``PatientIdentityRemoved`` = ``YES``, ``DeidentificationMethod`` and
  ``DeidentificationMethodCodeSequence`` (DCM 113100, 113107) are set.
* pixel data are not touched (burned-in annotations are *not* removed: files flagged
  ``BurnedInAnnotation = YES`` are listed in the summary).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import logging
import os
import secrets as _secrets
import tempfile
import warnings
from pathlib import Path

from medsight.errors import DataError

log = logging.getLogger(__name__)

# PS3.15 Table E.1-1, Basic Profile column (keyword -> action code). The ~200 attributes most
# found in imaging objects; curves / overlays / private groups are handled separately below.
BASIC_PROFILE: dict[str, str] = {
    "AccessionNumber": "Z",
    "AcquisitionComments": "X",
    "AcquisitionContextSequence": "X",
    "AcquisitionDate": "X/Z",
    "AcquisitionDateTime": "X/Z/D",
    "AcquisitionDeviceProcessingDescription": "X/D",
    "AcquisitionProtocolDescription": "X",
    "AcquisitionTime": "X/Z",
    "AcquisitionUID": "U",
    "ActualHumanPerformersSequence": "X",
    "AdditionalPatientHistory": "X",
    "AdmissionID": "X",
    "AdmittingDate": "X",
    "AdmittingDiagnosesCodeSequence": "X",
    "AdmittingDiagnosesDescription": "X",
    "AdmittingTime": "X",
    "AffectedSOPInstanceUID": "X",
    "Allergies": "X",
    "Arbitrary": "X",
    "AuthorObserverSequence": "X",
    "BranchOfService": "X",
    "CassetteID": "X",
    "CommentsOnThePerformedProcedureStep": "X",
    "ConcatenationUID": "U",
    "ConfidentialityConstraintOnPatientDataDescription": "X",
    "ConsultingPhysicianName": "Z",
    "ContentCreatorIdentificationCodeSequence": "X",
    "ContentCreatorName": "Z/D",
    "ContentDate": "Z/D",
    "ContentSequence": "X",
    "ContentTime": "Z/D",
    "ContrastBolusAgent": "Z/D",
    "ContributionDescription": "X",
    "CountryOfResidence": "X",
    "CurrentObserverTrial": "X",
    "CurrentPatientLocation": "X",
    "CurveDate": "X",
    "CurveTime": "X",
    "CustodialOrganizationSequence": "X",
    "DataSetTrailingPadding": "X",
    "DateOfLastCalibration": "X",
    "DateOfSecondaryCapture": "X",
    "DerivationDescription": "X",
    "DetectorID": "X/D",
    "DeviceDescription": "X",
    "DeviceSerialNumber": "X/Z/D",
    "DeviceUID": "U",
    "DigitalSignatureUID": "U",
    "DigitalSignaturesSequence": "X",
    "DimensionOrganizationUID": "U",
    "DischargeDate": "X",
    "DischargeDiagnosisDescription": "X",
    "DischargeTime": "X",
    "DistributionAddress": "X",
    "DistributionName": "X",
    "DoseReferenceUID": "U",
    "EthnicGroup": "X",
    "FailedSOPInstanceUIDList": "U",
    "FiducialUID": "U",
    "FillerOrderNumberImagingServiceRequest": "Z",
    "FrameComments": "X",
    "FrameOfReferenceUID": "U",
    "GantryID": "X",
    "GeneratorID": "X",
    "GraphicAnnotationSequence": "D",
    "HumanPerformerName": "X",
    "HumanPerformerOrganization": "X",
    "IconImageSequence": "X",
    "IdentifyingComments": "X",
    "ImageComments": "X",
    "ImagePresentationComments": "X",
    "ImagingServiceRequestComments": "X",
    "Impressions": "X",
    "InstanceCoercionDateTime": "X",
    "InstanceCreationDate": "X/D",
    "InstanceCreationTime": "X/Z/D",
    "InstanceCreatorUID": "U",
    "InstitutionAddress": "X",
    "InstitutionCodeSequence": "X/Z/D",
    "InstitutionName": "X/Z/D",
    "InstitutionalDepartmentName": "X",
    "InstitutionalDepartmentTypeCodeSequence": "X",
    "InsurancePlanIdentification": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X",
    "InterpretationApproverSequence": "X",
    "InterpretationAuthor": "X",
    "InterpretationDiagnosisDescription": "X",
    "InterpretationIDIssuer": "X",
    "InterpretationRecorder": "X",
    "InterpretationText": "X",
    "InterpretationTranscriber": "X",
    "IrradiationEventUID": "U",
    "IssuerOfAdmissionID": "X",
    "IssuerOfAdmissionIDSequence": "X",
    "IssuerOfPatientID": "X",
    "IssuerOfPatientIDQualifiersSequence": "X",
    "IssuerOfServiceEpisodeID": "X",
    "LargePaletteColorLookupTableUID": "U",
    "LastMenstrualDate": "X",
    "MedicalAlerts": "X",
    "MedicalRecordLocator": "X",
    "MilitaryRank": "X",
    "ModifiedAttributesSequence": "X",
    "ModifiedImageDescription": "X",
    "ModifyingDeviceID": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "NamesOfIntendedRecipientsOfResults": "X",
    "Occupation": "X",
    "OperatorIdentificationSequence": "X",
    "OperatorsName": "X/Z/D",
    "OrderCallbackPhoneNumber": "X",
    "OrderCallbackTelecomInformation": "X",
    "OrderEnteredBy": "X",
    "OrderEntererLocation": "X",
    "OriginalAttributesSequence": "X",
    "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "ParticipantSequence": "X",
    "PatientAddress": "X",
    "PatientAge": "X",
    "PatientBirthDate": "Z",
    "PatientBirthName": "X",
    "PatientBirthTime": "X",
    "PatientComments": "X",
    "PatientID": "Z",
    "PatientInstitutionResidence": "X",
    "PatientInsurancePlanCodeSequence": "X",
    "PatientMotherBirthName": "X",
    "PatientName": "Z",
    "PatientPrimaryLanguageCodeSequence": "X",
    "PatientPrimaryLanguageModifierCodeSequence": "X",
    "PatientReligiousPreference": "X",
    "PatientSex": "Z",
    "PatientSexNeutered": "X/Z",
    "PatientSize": "X",
    "PatientState": "X",
    "PatientTelecomInformation": "X",
    "PatientTelephoneNumbers": "X",
    "PatientTransportArrangements": "X",
    "PatientWeight": "X",
    "PerformedLocation": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepEndDate": "X",
    "PerformedProcedureStepEndDateTime": "X",
    "PerformedProcedureStepEndTime": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartDateTime": "X",
    "PerformedProcedureStepStartTime": "X",
    "PerformedStationAETitle": "X",
    "PerformedStationGeographicLocationCodeSequence": "X",
    "PerformedStationName": "X",
    "PerformedStationNameCodeSequence": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "PerformingPhysicianName": "X",
    "PersonAddress": "X",
    "PersonIdentificationCodeSequence": "D",
    "PersonName": "D",
    "PersonTelecomInformation": "X",
    "PersonTelephoneNumbers": "X",
    "PhysicianApprovingInterpretation": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "PlacerOrderNumberImagingServiceRequest": "Z",
    "PlateID": "X",
    "PreMedication": "X",
    "PregnancyStatus": "X",
    "ProtocolName": "X/D",
    "ReasonForStudy": "X",
    "ReasonForTheImagingServiceRequest": "X",
    "ReasonForTheRequestedProcedure": "X",
    "ReferencedDigitalSignatureSequence": "X",
    "ReferencedFrameOfReferenceUID": "U",
    "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID": "U",
    "ReferencedImageSequence": "X/Z/U*",
    "ReferencedPatientAliasSequence": "X",
    "ReferencedPatientPhotoSequence": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedPerformedProcedureStepSequence": "X/Z/D",
    "ReferencedSOPInstanceMACSequence": "X",
    "ReferencedSOPInstanceUID": "U",
    "ReferencedSOPInstanceUIDInFile": "U",
    "ReferencedSeriesSequence": "X/Z/U*",
    "ReferencedStudySequence": "X/Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianTelephoneNumbers": "X",
    "RegionOfResidence": "X",
    "RelatedFrameOfReferenceUID": "U",
    "RequestAttributesSequence": "X",
    "RequestedContrastAgent": "X",
    "RequestedProcedureComments": "X",
    "RequestedProcedureDescription": "X/Z",
    "RequestedProcedureID": "X",
    "RequestedProcedureLocation": "X",
    "RequestedSOPInstanceUID": "U",
    "RequestingPhysician": "X",
    "RequestingService": "X",
    "ResponsibleOrganization": "X",
    "ResponsiblePerson": "X",
    "ResultsComments": "X",
    "ResultsDistributionListSequence": "X",
    "ResultsIDIssuer": "X",
    "ReviewerName": "X/Z",
    "ScheduledHumanPerformersSequence": "X",
    "ScheduledPatientInstitutionResidence": "X",
    "ScheduledPerformingPhysicianIdentificationSequence": "X",
    "ScheduledPerformingPhysicianName": "X",
    "ScheduledProcedureStepDescription": "X",
    "ScheduledProcedureStepEndDate": "X",
    "ScheduledProcedureStepEndTime": "X",
    "ScheduledProcedureStepID": "X",
    "ScheduledProcedureStepLocation": "X",
    "ScheduledProcedureStepStartDate": "X",
    "ScheduledProcedureStepStartTime": "X",
    "ScheduledStationAETitle": "X",
    "ScheduledStationGeographicLocationCodeSequence": "X",
    "ScheduledStationName": "X",
    "ScheduledStationNameCodeSequence": "X",
    "ScheduledStudyLocation": "X",
    "ScheduledStudyLocationAETitle": "X",
    "SeriesDate": "X/D",
    "SeriesDescription": "X",
    "SeriesInstanceUID": "U",
    "SeriesTime": "X/D",
    "ServiceEpisodeDescription": "X",
    "ServiceEpisodeID": "X",
    "SmokingStatus": "X",
    "SOPInstanceUID": "U",
    "SourceApplicationEntityTitle": "X",
    "SourceImageSequence": "X/Z/U*",
    "SpecialNeeds": "X",
    "StationName": "X/Z/D",
    "StorageMediaFileSetUID": "U",
    "StudyComments": "X",
    "StudyDate": "Z",
    "StudyDescription": "X",
    "StudyID": "Z",
    "StudyIDIssuer": "X",
    "StudyInstanceUID": "U",
    "StudyTime": "Z",
    "SynchronizationFrameOfReferenceUID": "U",
    "TemplateExtensionCreatorUID": "U",
    "TemplateExtensionOrganizationUID": "U",
    "TextComments": "X",
    "TextString": "X",
    "TimezoneOffsetFromUTC": "X",
    "TopicAuthor": "X",
    "TopicKeywords": "X",
    "TopicSubject": "X",
    "TopicTitle": "X",
    "TransactionUID": "U",
    "UID": "U",
    "VerifyingObserverIdentificationCodeSequence": "Z",
    "VerifyingObserverName": "D",
    "VerifyingObserverSequence": "D",
    "VerifyingOrganization": "X",
    "VisitComments": "X",
}

#: Dates that the Modified Dates option shifts instead of emptying (they are kept, shifted).
_SHIFT_KEEP = {"StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "AcquisitionDateTime", "InstanceCreationDate"}
#: Pseudonymised instead of emptied (so patients stay separable).
_PSEUDONYM = {"PatientID", "PatientName"}
#: UID attributes that name a class or syntax, not an instance: kept.
_KEEP_UID_SUFFIXES = ("ClassUID",)
_KEEP_UIDS = {"TransferSyntaxUID", "CodingSchemeUID", "ContextUID", "MappingResourceUID", "PrivateInformationCreatorUID", "ImplementationClassUID"}

_DUMMY_BY_VR = {
    "PN": "ANONYMOUS",
    "LO": "ANONYMIZED",
    "SH": "ANON",
    "LT": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "UT": "ANONYMIZED",
    "CS": "ANON",
    "AE": "ANON",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000Y",
    "IS": "0",
    "DS": "0",
}

#: DeidentificationMethod (LO, at most 64 characters per value).
DEID_METHOD = ["medsight PS3.15 Basic Application Confidentiality Profile", "Retain Longitudinal Temporal Information Modified Dates"]


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

    def offset_days(self, patient_key: str) -> int:
        if patient_key not in self.offsets:
            # between 1 and 3650 days into the past, fixed per patient and secret
            self.offsets[patient_key] = -(1 + int(self.digest("dateshift", patient_key)[:8], 16) % 3650)
        return self.offsets[patient_key]


def _shift_date(value: str, days: int) -> str:
    v = str(value).strip()
    if len(v) < 8 or not v[:8].isdigit():
        return ""
    try:
        d = dt.date(int(v[:4]), int(v[4:6]), int(v[6:8])) + dt.timedelta(days=days)
    except ValueError:
        return ""
    return d.strftime("%Y%m%d") + v[8:]


def _is_instance_uid(elem) -> bool:
    kw = elem.keyword or ""
    if elem.VR != "UI" or kw in _KEEP_UIDS or kw.endswith(_KEEP_UID_SUFFIXES):
        return False
    return True


def _remap_uid_value(value, ctx: _Context):
    def one(v):
        s = str(v).strip()
        if not s or s.startswith("1.2.840.10008."):
            return s  # a DICOM-defined UID (SOP class, transfer syntax, ...) is not identifying
        return ctx.uid(s)

    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        return [one(v) for v in value]
    return one(value)


def _apply_profile(ds, ctx: _Context, patient_key: str, stats: dict) -> None:
    """Apply the profile to ``ds`` and, recursively, to every nested sequence item."""
    days = ctx.offset_days(patient_key)
    for elem in list(ds):
        tag = elem.tag
        if tag.is_private:
            continue  # handled by remove_private_tags
        group = tag.group
        if 0x5000 <= group <= 0x50FF and group % 2 == 0:
            del ds[tag]
            continue
        if 0x6000 <= group <= 0x60FF and group % 2 == 0 and tag.element in (0x3000, 0x4000):
            del ds[tag]
            continue
        kw = elem.keyword or ""
        action = BASIC_PROFILE.get(kw)
        if kw in _PSEUDONYM:
            elem.value = ctx.pseudonym(patient_key)
            stats["changed"] += 1
            continue
        if action is None:
            if elem.VR == "SQ":
                for item in elem.value:
                    _apply_profile(item, ctx, patient_key, stats)
            elif _is_instance_uid(elem) and elem.value not in (None, ""):
                elem.value = _remap_uid_value(elem.value, ctx)
            continue
        if action == "U":
            if elem.value not in (None, ""):
                elem.value = _remap_uid_value(elem.value, ctx)
            stats["changed"] += 1
            continue
        if action == "X/Z/U*":
            for item in elem.value or []:
                _apply_profile(item, ctx, patient_key, stats)
            continue
        if kw in _SHIFT_KEEP and elem.VR in ("DA", "DT"):
            if elem.value not in (None, ""):
                if elem.VM > 1:
                    elem.value = [_shift_date(v, days) for v in elem.value]
                else:
                    elem.value = _shift_date(elem.value, days)
            stats["changed"] += 1
            continue
        primary = action.split("/")[0]
        if primary == "X":
            del ds[tag]
        elif primary in ("Z", "C"):
            if elem.VR == "SQ":
                elem.value = []
            else:
                elem.value = None if elem.VR not in ("PN",) else ""
        elif primary == "D":
            if elem.VR == "SQ":
                del ds[tag]  # a dummy sequence cannot be meaningful; remove
            elif elem.VR in _DUMMY_BY_VR:
                elem.value = _DUMMY_BY_VR[elem.VR]
            elif elem.VR == "UI":
                elem.value = ctx.uid(str(elem.value))
            else:
                del ds[tag]
        # K: keep
        stats["changed"] += 1


def _set_method(ds) -> None:
    from pydicom.dataset import Dataset

    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEID_METHOD
    codes = []
    for value, meaning in (("113100", "Basic Application Confidentiality Profile"), ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")):
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    ds.LongitudinalTemporalInformationModified = "MODIFIED"


def _atomic_save(ds, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".deid-", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        try:
            ds.save_as(tmp, enforce_file_format=True)
        except Exception:
            ds.save_as(tmp, enforce_file_format=False)
        os.replace(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def is_dicom_file(p: Path) -> bool:
    """A DICOM Part 10 file ('DICM' after the 128-byte preamble), or a .dcm/.dicom file that starts with a group
    0002/0008 element (no preamble)."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    return p.suffix.lower() in (".dcm", ".dicom") and head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def deidentify(
    in_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    mapping_csv: str | os.PathLike | None = None,
    secret: str | bytes | None = None,
    keep_private: bool = False,
) -> dict:
    """De-identify every DICOM file below ``in_dir`` into ``out_dir`` (same relative paths).

    ``secret`` makes UIDs, pseudonyms and date offsets reproducible across runs (keep it secret:
    whoever has it can link outputs back to inputs by re-running); when None a random one is used.
    Returns a JSON-serialisable summary; non-DICOM files are skipped and listed, unreadable DICOM
    files are listed under ``errors``. ``mapping_csv`` (only if given) receives the
    original -> new identifiers; it is identifying and must be stored securely.
    """
    pydicom = __import__("pydicom")
    src, dst = Path(in_dir).resolve(), Path(out_dir).resolve()
    if not src.is_dir():
        raise DataError(f"cannot de-identify {src}: not a folder")
    if dst == src or src in dst.parents:
        raise DataError(f"cannot de-identify {src}: the output folder {dst} must be outside the input folder")
    if dst.exists() and not dst.is_dir():
        raise DataError(f"cannot de-identify into {dst}: exists and is not a folder")
    if secret is None:
        key = _secrets.token_bytes(32)
    else:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    ctx = _Context(key)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    summary: dict = {"in_dir": str(src), "out_dir": str(dst), "written": 0, "skipped": [], "errors": [], "burned_in_annotation": []}
    stats = {"changed": 0}
    studies: set[str] = set()
    for f in files:
        rel = f.relative_to(src)
        if f.name.upper() == "DICOMDIR":
            summary["skipped"].append(str(rel))  # a DICOMDIR indexes identifying data; rebuild it instead
            continue
        if not is_dicom_file(f):
            summary["skipped"].append(str(rel))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f, force=True)
            if len(ds) == 0:
                raise ValueError("empty dataset")
        except Exception as e:
            summary["errors"].append({"path": str(rel), "error": f"not a readable DICOM file ({type(e).__name__})"})
            continue
        try:
            patient_key = str(ds.get("PatientID", "") or ds.get("PatientName", "") or "")
            if not patient_key:
                patient_key = "study:" + str(ds.get("StudyInstanceUID", "") or rel)
            if "StudyInstanceUID" in ds:
                studies.add(str(ds.StudyInstanceUID))
            if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
                summary["burned_in_annotation"].append(str(rel))
            if not keep_private:
                ds.remove_private_tags()
            _apply_profile(ds, ctx, patient_key, stats)
            fm = getattr(ds, "file_meta", None)
            if fm is not None:
                for elem in list(fm):
                    if elem.keyword == "MediaStorageSOPInstanceUID":
                        elem.value = ds.SOPInstanceUID if "SOPInstanceUID" in ds else ctx.uid(str(elem.value))
                    elif elem.keyword == "SourceApplicationEntityTitle":
                        del fm[elem.tag]
                    elif elem.tag.is_private:
                        del fm[elem.tag]
            _set_method(ds)
            _atomic_save(ds, dst / rel)
            summary["written"] += 1
        except Exception as e:
            summary["errors"].append({"path": str(rel), "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
    summary["patients"] = len(ctx.patient_map)
    summary["studies"] = len(studies)
    summary["uids_remapped"] = len(ctx.uid_map)
    summary["mapping_csv"] = None
    if mapping_csv is not None:
        mp = Path(mapping_csv)
        mp.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".map-", suffix=".tmp", dir=mp.parent)
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["kind", "original", "new"])
            for old, new in sorted(ctx.patient_map.items()):
                w.writerow(["patient", old, new])
            for old, days in sorted(ctx.offsets.items()):
                w.writerow(["date_offset_days", old, days])
            for old, new in sorted(ctx.uid_map.items()):
                w.writerow(["uid", old, new])
        os.replace(tmp, mp)
        summary["mapping_csv"] = str(mp)
    log.info("de-identified %d files (%d skipped, %d errors)", summary["written"], len(summary["skipped"]), len(summary["errors"]))
    return summary
