"""DICOM transport: the Storage SCP (DIMSE, guarded), DICOMweb (QIDO-RS / WADO-RS / STOW-RS) and DIMSE SCU
(C-FIND / C-MOVE / C-STORE) clients. Errors reaching a PACS raise :class:`TransportError` (retried by the
node); bad data raises :class:`BadInstance` (refused, never retried)."""

from __future__ import annotations

import io
import logging
import re
import socket
import struct
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger("medsight.node")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
MAX_PDU_BYTES = 1 << 20  # one PDU (an A-ASSOCIATE-RQ or a P-DATA-TF fragment) at most


class TransportError(Exception):
    """The PACS could not be reached or refused the request: transient, the job is retried."""


class BadInstance(Exception):
    """A received instance that is not usable DICOM: refused."""


def _quiet_pynetdicom() -> None:
    """pynetdicom logs whole tracebacks for refused peers; the node logs one line per refusal instead."""
    lg = logging.getLogger("pynetdicom")
    lg.setLevel(logging.CRITICAL)
    lg.propagate = False


def check_instance(data: bytes, max_bytes: int):
    """Parse one encoded instance (a DICOM file: preamble, meta, dataset) and check it is whole: the UIDs the
    worklist needs are valid and native pixel data is as long as the header says. Returns the dataset
    (pixel data not decoded: the readers decode it later, within their budgets)."""
    import pydicom

    if len(data) > max_bytes:
        raise BadInstance(f"instance of {len(data)} bytes is above the limit of {max_bytes}")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds for broken input
        raise BadInstance(f"not a readable DICOM instance ({type(e).__name__})") from None
    # pydicom keeps a value shorter than its declared length: a truncated or lying file (keys(): iterating the
    # Dataset itself would convert every element first)
    for tag in ds.keys():  # noqa: SIM118
        raw = ds.get_item(tag)
        length, value = getattr(raw, "length", None), getattr(raw, "value", None)
        if isinstance(value, (bytes, bytearray)) and length not in (None, 0xFFFFFFFF) and len(value) != length:
            raise BadInstance(f"element ({tag.group:04X},{tag.element:04X}) declares {length} bytes, "
                              f"{len(value)} present (truncated)")
    try:
        for elem in ds.iterall():  # converts every raw element: a broken one raises here
            elem.value  # noqa: B018
    except Exception as e:  # noqa: BLE001
        raise BadInstance(f"not a readable DICOM instance ({type(e).__name__})") from None
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        v = str(getattr(ds, kw, "") or "")
        if not (_UID.match(v) and len(v) <= 64):
            raise BadInstance(f"missing or invalid {kw}")
    if "PixelData" in ds:
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        if ts in _NATIVE:
            try:
                bits = int(ds.BitsAllocated)
                n = int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1) or 1) * \
                    int(getattr(ds, "NumberOfFrames", 1) or 1)
            except (AttributeError, TypeError, ValueError):
                raise BadInstance("pixel data without a usable image header") from None
            need = (n * bits + 7) // 8
            if len(ds.PixelData) < need:
                raise BadInstance(f"truncated pixel data ({len(ds.PixelData)} of {need} bytes)")
    return ds


def encode(ds) -> bytes:
    """A pydicom Dataset (with or without file meta) -> the bytes of a DICOM file."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------- Storage SCP
class _PduGuard:
    """Wraps an accepted socket: every PDU header is checked as it arrives, before pynetdicom reads its body.
    An unknown PDU type, a declared length above ``max_pdu`` or more than ``max_total`` bytes in one
    association close the connection (pynetdicom sees a closed transport) with one log line."""

    def __init__(self, sock: socket.socket, peer: str, max_pdu: int, max_total: int, on_refuse: Callable[[str], None]):
        self._sock = sock
        self._peer = peer
        self._max_pdu = max_pdu
        self._max_total = max_total
        self._on_refuse = on_refuse
        self._hdr = bytearray()
        self._left = 0
        self._total = 0
        self._refused = False

    def _refuse(self, why: str):
        if not self._refused:
            self._refused = True
            self._on_refuse(f"refused association from {self._peer}: {why}")
        raise OSError(why)

    def recv(self, n: int, *args):
        if self._refused:
            raise OSError("connection refused earlier")
        data = self._sock.recv(n, *args)
        self._total += len(data)
        if self._total > self._max_total:
            self._refuse(f"more than {self._max_total} bytes in one association")
        i = 0
        while i < len(data):
            if self._left:
                k = min(self._left, len(data) - i)
                self._left -= k
                i += k
                continue
            take = data[i:i + 6 - len(self._hdr)]
            self._hdr += take
            i += len(take)
            if len(self._hdr) == 6:
                kind, _, length = struct.unpack(">BBL", bytes(self._hdr))
                self._hdr.clear()
                if kind not in range(1, 8):
                    self._refuse(f"garbage PDU (type 0x{kind:02X})")
                if length > self._max_pdu:
                    self._refuse(f"declared PDU length {length} above the limit of {self._max_pdu}")
                self._left = length
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


class StorageSCP:
    """A pynetdicom Storage SCP (+ Verification) that only the allow-listed calling AE titles may use.
    ``on_instance(bytes, dataset)`` keeps an instance (raising to refuse it); the SCP answers 0x0000 once it
    returned, so a sender never gets success for an instance the node did not write durably."""

    def __init__(self, ae_title: str, host: str, port: int, allowed: Sequence[str],
                 on_instance: Callable[[bytes, object], None], *, max_instance_bytes: int,
                 on_refuse: Callable[[str], None] | None = None, ssl_context=None):
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification
        from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

        _quiet_pynetdicom()
        self.on_instance = on_instance
        self.max_instance_bytes = max_instance_bytes
        self.on_refuse = on_refuse or (lambda line: log.warning(line))
        self.ae = AE(ae_title=ae_title)
        self.ae.require_calling_aet = list(allowed)
        self.ae.maximum_pdu_size = 64 * 1024
        self.ae.network_timeout = 30
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 60
        self.ae.maximum_associations = 16
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax or None)
        self.ae.add_supported_context(Verification)
        scp = self

        class _Handler(RequestHandler):
            def handle(self):
                peer = str(self.client_address[0])
                self.request = _PduGuard(self.request, peer, MAX_PDU_BYTES, scp.max_instance_bytes + MAX_PDU_BYTES,
                                         scp.on_refuse)
                super().handle()

        class _Server(ThreadedAssociationServer):
            def __init__(self, *a, **kw):
                kw["request_handler"] = _Handler
                super().__init__(*a, **kw)

        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ABORTED, self._on_aborted)]
        self.server = self.ae.make_server((host, port), evt_handlers=handlers, server_class=_Server,
                                          ssl_context=ssl_context)
        self.ae._servers.append(self.server)  # as AE.start_server does (the server's shutdown() removes it)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="medsight-node-scp", daemon=True)

    def start(self) -> StorageSCP:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()  # also closes the socket
        self._thread.join(timeout=5)

    def _on_rejected(self, event):
        aet = getattr(event.assoc.requestor, "ae_title", "?")
        self.on_refuse(f"refused association from {event.assoc.requestor.address}: calling AE title "
                       f"{str(aet).strip()!r} is not allowed")

    def _on_aborted(self, event):
        self.on_refuse(f"association from {event.assoc.requestor.address} aborted (malformed or interrupted)")

    def _on_store(self, event):
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as e:  # noqa: BLE001
            self.on_refuse(f"refused instance from {event.assoc.requestor.address}: cannot decode ({type(e).__name__})")
            return 0xC210
        try:
            ds = check_instance(bytes(data), self.max_instance_bytes)
        except BadInstance as e:
            self.on_refuse(f"refused instance from {event.assoc.requestor.address}: {e}")
            return 0xC210
        try:
            self.on_instance(bytes(data), ds)
        except Exception as e:  # noqa: BLE001 - the quota, a full disk: out of resources, the sender may retry
            self.on_refuse(f"refused instance from {event.assoc.requestor.address}: {type(e).__name__}: {e}")
            return 0xA700
        return 0x0000


# --------------------------------------------------------------------------------------------- DICOMweb
class DicomWebClient:
    """QIDO-RS / WADO-RS / STOW-RS against one server; basic auth from the config (never logged); the
    server's TLS certificate is verified unless the config says otherwise."""

    def __init__(self, cfg):
        import requests
        from dicomweb_client.api import DICOMwebClient

        self._requests = requests
        verify = cfg.ca_bundle if (cfg.verify_tls and cfg.ca_bundle) else bool(cfg.verify_tls)
        if not cfg.verify_tls and cfg.url.startswith("https://"):
            log.warning("DICOMweb: the server's TLS certificate is NOT verified (verify_tls: false in the config)")

        class _Session(requests.Session):
            """The configured TLS verification wins: plain requests lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE
            replace a session's ``verify`` (a configured CA, or an explicit opt-out, would be ignored)."""

            def merge_environment_settings(self, url, proxies, stream, verify_, cert):
                out = super().merge_environment_settings(url, proxies, stream, verify_, cert)
                out["verify"] = verify
                return out

        session = _Session()
        if cfg.username:
            session.auth = (cfg.username, cfg.password or "")
        session.verify = verify
        self.url = cfg.url
        self.client = DICOMwebClient(cfg.url, session=session, timeout=(10, 120))
        self.client.set_http_retry_params(retry=False)  # the worklist retries, with its own backoff
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

    def _call(self, what: str, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except self._requests.HTTPError as e:
            code = getattr(e.response, "status_code", "?")
            raise TransportError(f"DICOMweb {what} failed: HTTP {code}") from None
        except (self._requests.RequestException, OSError) as e:
            raise TransportError(f"DICOMweb {what} failed: {type(e).__name__}") from None

    def find_series(self, filters: dict) -> list[tuple[str, str]]:
        """QIDO-RS: (study UID, series UID) of every series matching ``filters`` (DICOM keywords)."""
        return [(r["study"], r["series"]) for r in self.series_rows(filters)]

    def series_rows(self, filters: dict) -> list[dict]:
        """QIDO-RS: {'study', 'series', 'accession', 'modality', 'description'} of every series matching
        ``filters`` (the last three None when the server does not return them)."""
        rows = self._call("QIDO-RS", self.client.search_for_series, search_filters=dict(filters),
                          fields=["StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber", "Modality",
                                  "SeriesDescription"]) or []
        out = []
        def val(r, tag):
            v = (r.get(tag) or {}).get("Value") or [None]
            return None if v[0] is None else str(v[0])

        for r in rows:
            try:
                out.append({"study": r["0020000D"]["Value"][0], "series": r["0020000E"]["Value"][0],
                            "accession": val(r, "00080050") or "", "modality": val(r, "00080060"),
                            "description": val(r, "0008103E")})
            except (KeyError, IndexError, TypeError, AttributeError):
                continue
        return out

    def retrieve_series(self, study: str, series: str) -> list[bytes]:
        """WADO-RS: the instances of one series as DICOM file bytes."""
        return [encode(ds) for ds in self._call("WADO-RS", self.client.retrieve_series, study, series)]

    def store(self, datasets: Sequence, study: str) -> None:
        """STOW-RS into ``study``; raises TransportError unless every instance was stored."""
        resp = self._call("STOW-RS", self.client.store_instances, list(datasets), study_instance_uid=study)
        failed = getattr(resp, "FailedSOPSequence", None) if resp is not None else None
        if failed:
            raise TransportError(f"DICOMweb STOW-RS: the server refused {len(failed)} instance(s)")
        stored = {str(getattr(it, "ReferencedSOPInstanceUID", "")) for it in
                  (getattr(resp, "ReferencedSOPSequence", None) or [])}
        missing = [ds for ds in datasets if stored and str(ds.SOPInstanceUID) not in stored]
        if missing:
            raise TransportError(f"DICOMweb STOW-RS: {len(missing)} instance(s) missing from the server's answer")


# --------------------------------------------------------------------------------------------- DIMSE SCU
class DimseClient:
    """C-FIND / C-MOVE / C-STORE as ``ae_title`` to the PACS in ``cfg``."""

    def __init__(self, cfg, ae_title: str):
        _quiet_pynetdicom()
        self.cfg = cfg
        self.ae_title = ae_title

    def _assoc(self, contexts):
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.network_timeout = 30
        ae.dimse_timeout = 120
        for c in contexts:
            if isinstance(c, tuple):
                ae.add_requested_context(*c)
            else:
                ae.add_requested_context(c)
        tls = (self.cfg.tls.client_context(), self.cfg.host) if getattr(self.cfg, "tls", None) else None
        try:
            assoc = ae.associate(self.cfg.host, self.cfg.port, ae_title=self.cfg.ae_title, tls_args=tls)
        except OSError as e:
            raise TransportError(f"DIMSE association to {self.cfg.ae_title} failed: {type(e).__name__}") from None
        if not assoc.is_established:
            raise TransportError(f"DIMSE association to {self.cfg.ae_title} at {self.cfg.host}:{self.cfg.port} "
                                 "was not established")
        return assoc

    def find_series(self, filters: dict) -> list[tuple[str, str]]:
        return [(r["study"], r["series"]) for r in self.series_rows(filters)]

    def series_rows(self, filters: dict) -> list[dict]:
        """C-FIND (study root, series level): like :meth:`DicomWebClient.series_rows`."""
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = ""
        q.SeriesInstanceUID = ""
        q.AccessionNumber = ""
        q.Modality = ""
        q.SeriesDescription = ""
        for k, v in filters.items():
            setattr(q, k, v)
        assoc = self._assoc([StudyRootQueryRetrieveInformationModelFind])
        out = []
        try:
            for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
                if status is None:
                    raise TransportError("DIMSE C-FIND: no response (timeout or abort)")
                if status.Status in (0xFF00, 0xFF01) and ident is not None:
                    out.append({"study": str(ident.StudyInstanceUID), "series": str(ident.SeriesInstanceUID),
                                "accession": str(ident.get("AccessionNumber", "") or ""),
                                "modality": str(ident.get("Modality", "") or "") or None,
                                "description": str(ident.get("SeriesDescription", "") or "") or None})
                elif status.Status not in (0x0000, 0xFF00, 0xFF01):
                    raise TransportError(f"DIMSE C-FIND failed with status 0x{status.Status:04X}")
        finally:
            assoc.release()
        return out

    def move_series(self, study: str, series: str, destination: str) -> int:
        """C-MOVE one series to ``destination`` (this node's SCP); returns the number of instances moved."""
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study
        q.SeriesInstanceUID = series
        assoc = self._assoc([StudyRootQueryRetrieveInformationModelMove])
        done = 0
        try:
            for status, _ in assoc.send_c_move(q, destination, StudyRootQueryRetrieveInformationModelMove):
                if status is None:
                    raise TransportError("DIMSE C-MOVE: no response (timeout or abort)")
                if status.Status == 0x0000:
                    done = int(getattr(status, "NumberOfCompletedSuboperations", 0) or 0)
                elif status.Status not in (0xFF00, 0xFF01):
                    raise TransportError(f"DIMSE C-MOVE failed with status 0x{status.Status:04X}")
        finally:
            assoc.release()
        return done

    def store(self, datasets: Sequence, study: str) -> None:
        from pydicom.uid import ExplicitVRLittleEndian

        classes = sorted({str(ds.SOPClassUID) for ds in datasets})
        assoc = self._assoc([(c, [ExplicitVRLittleEndian]) for c in classes])
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if status is None or "Status" not in status:
                    raise TransportError("DIMSE C-STORE: no response (timeout or abort)")
                if status.Status not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise TransportError(f"DIMSE C-STORE refused with status 0x{status.Status:04X}")
        finally:
            assoc.release()
