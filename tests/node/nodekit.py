"""A real Orthanc PACS for the node tests, started from Debian's package on free loopback ports.

A test that needs Orthanc FAILS when the binary or the DICOMweb plugin is missing (`.ci/run` installs them)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _subproc import free_port

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "medsight", "s3cret-for-tests"
ORTHANC_AET = "ORTHANC"
NODE_AET = "MEDSIGHT"


class Orthanc:
    """One Orthanc process; ``stop()`` / ``start()`` keep its storage (the PACS "down for a while")."""

    def __init__(self, root: Path):
        exe = shutil.which("Orthanc")
        if exe is None:
            pytest.fail("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb dcmtk)")
        if not Path(PLUGIN).is_file():
            pytest.fail(f"the Orthanc DICOMweb plugin is missing ({PLUGIN}; apt-get install orthanc-dicomweb)")
        self.exe = exe
        self.root = root
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.modalities: dict = {}
        self.proc: subprocess.Popen | None = None
        (root / "storage").mkdir(parents=True, exist_ok=True)
        self.config = root / "orthanc.json"

    def write_config(self) -> None:
        cfg = {
            "Name": "medsight-test", "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD}, "DicomCheckCalledAet": False, "DicomCheckModalityHost": False,
            "DicomModalities": self.modalities, "DicomAlwaysAllowStore": True, "HttpsVerifyPeers": False,
            "Plugins": [PLUGIN], "SaveJobs": False, "StorageCompression": False, "ExecuteLuaEnabled": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                         "Host": f"127.0.0.1:{self.http_port}", "Ssl": False},
        }
        self.config.write_text(json.dumps(cfg))

    def start(self) -> Orthanc:
        self.write_config()
        with open(self.root / "orthanc.log", "ab") as log:
            self.proc = subprocess.Popen([self.exe, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.proc.returncode}; see {self.root / 'orthanc.log'}")
            try:
                if self.get("/system").get("DicomAet") == ORTHANC_AET:
                    return self
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        pytest.fail("Orthanc did not answer /system within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    # --- REST -----------------------------------------------------------------------------------------------
    def _req(self, method: str, path: str, **kw):
        import requests

        r = requests.request(method, self.url + path, auth=(USER, PASSWORD), timeout=30, **kw)
        r.raise_for_status()
        return r

    def get(self, path: str):
        return self._req("GET", path).json()

    def upload(self, data: bytes) -> None:
        self._req("POST", "/instances", data=data, headers={"Content-Type": "application/dicom"})

    def set_modality(self, aet: str, port: int) -> None:
        """Tell Orthanc where medsight's SCP is (C-MOVE destination; allowed to C-FIND / C-MOVE / C-STORE)."""
        self.modalities[aet] = {"AET": aet, "Host": "127.0.0.1", "Port": port, "AllowEcho": True,
                                "AllowFind": True, "AllowMove": True, "AllowStore": True, "AllowGet": True}
        self._req("PUT", f"/modalities/{aet}", data=json.dumps(self.modalities[aet]))

    def series_in_study(self, study_uid: str) -> list[dict]:
        """MainDicomTags of every series Orthanc holds in the study, with their instance counts."""
        found = self._req("POST", "/tools/find", data=json.dumps(
            {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})).json()
        return [{**s["MainDicomTags"], "instances": s["Instances"]} for s in found]

    def instance_file(self, orthanc_id: str) -> bytes:
        return self._req("GET", f"/instances/{orthanc_id}/file").content

    def results(self, study_uid: str) -> dict[str, list[bytes]]:
        """The medsight result series of a study: {'SR': [files], 'heatmap': [files]}."""
        out: dict[str, list[bytes]] = {"SR": [], "heatmap": []}
        for s in self.series_in_study(study_uid):
            desc = s.get("SeriesDescription", "")
            for kind in out:
                if desc.startswith("medsight ") and desc.endswith(" " + kind):
                    out[kind] += [self.instance_file(i) for i in s["instances"]]
        return out


@pytest.fixture
def orthanc(tmp_path):
    o = Orthanc(tmp_path / "orthanc").start()
    yield o
    o.stop()


# --- DICOM test data ------------------------------------------------------------------------------------------
def make_instance(pixels: np.ndarray, *, study: str, series: str, modality: str = "CR", number: int = 1,
                  description: str = "PA", body_part: str = "CHEST") -> bytes:
    """A CR (or DX) image as DICOM file bytes: uint8 MONOCHROME2, explicit VR little endian."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.BodyPartExamined, ds.SeriesDescription = modality, body_part, description
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "PID-NODE-1", "19700101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC1", "1"
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, number
    if modality == "DX":
        ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    px = np.ascontiguousarray(pixels, dtype=np.uint8)
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = px.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_series(images, n_series: int, per_series: int = 1, modality: str = "CR") -> list[dict]:
    """``n_series`` single-study series of BreastMNIST images: [{'study','series','files':[bytes]}]."""
    from pydicom.uid import generate_uid

    out = []
    k = 0
    for _ in range(n_series):
        study, series = generate_uid(), generate_uid()
        files = []
        for j in range(per_series):
            img = np.asarray(images[k % len(images)]).reshape(np.asarray(images[k % len(images)]).shape[-2:])
            files.append(make_instance(img, study=study, series=series, modality=modality, number=j + 1))
            k += 1
        out.append({"study": study, "series": series, "files": files})
    return out


def node_config(tmp: Path, bundle: Path, orthanc: Orthanc, *, port: int | None = None, send: str = "dicomweb",
                retrieve: str = "dicomweb", poll: dict | None = None, extra_routes: list | None = None,
                **over) -> dict:
    """A node config mapping for these tests (the password comes from $MEDSIGHT_TEST_PACS_PASSWORD)."""
    os.environ["MEDSIGHT_TEST_PACS_PASSWORD"] = PASSWORD
    raw = {
        "ae_title": NODE_AET, "workdir": str(tmp / "node"), "stable_age_s": 0.3, "lease_s": 60,
        "retry": {"max_attempts": 50, "backoff_s": 0.2, "backoff_max_s": 1.0},
        "allowed_calling_aets": [ORTHANC_AET, "STORESCU", "PUSHER"],
        "pacs": {"dicomweb": {"url": orthanc.dicomweb, "username": USER, "password_env": "MEDSIGHT_TEST_PACS_PASSWORD"},
                 "dimse": {"host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": ORTHANC_AET}},
        "send": send, "retrieve": retrieve,
        "routes": [{"name": "breast", "bundle": str(bundle), "match": {"modality": ["CR", "DX", "CT"]}}]
        + (extra_routes or []),
    }
    if port is not None:
        raw["listen"] = {"host": "127.0.0.1", "port": port}
    if poll is not None:
        raw["poll"] = poll
    raw.update(over)
    return raw


def run_until(node, done, timeout: float = 60.0) -> None:
    """Step the node (in this thread) until ``done()`` holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not node.step():
            if done():
                return
            time.sleep(0.05)
    raise AssertionError(f"node did not finish within {timeout} s: {node.wl.counts()}")
