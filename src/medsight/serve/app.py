"""FastAPI service for one bundle: health, model card, prediction (+ Grad-CAM overlay) and a web page.

Uploads are read into memory (never written to disk), bounded by ``max_upload_mb`` (413), and decoded by
``medsight.data.io.read_image_bytes``. Bad input is a 4xx with a one-line JSON ``detail``, never a 500:
415 for a file type we do not read, 422 for a corrupt / unreadable / oversized-in-pixels file or a malformed
form. Logs carry a request id, size, status and latency only, never file names or DICOM identifiers.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
import uuid
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from medsight import __version__
from medsight.errors import DataError
from medsight.predict import Predictor, default_threads
from medsight.serve.schemas import ErrorResponse, Health, InputSpec, ModelInfo, PredictResponse

log = logging.getLogger("medsight.serve")
STATIC = Path(__file__).parent / "static"
#: decoded-size cap for uploads (array elements): larger images are refused with 422 (decompression bombs)
MAX_ELEMENTS = 2**27
_MULTIPART_SLACK = 64 * 1024  # multipart headers and boundaries around the file

# magic numbers of the formats the reader understands: used only to say 415 (not a format we read) or 422
# (a format we read, but this file is broken) when the reader refuses an upload
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF8", b"\x1f\x8b")
_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm", ".dicom", ".ima",
             ".nii", ".nii.gz")


def _looks_supported(data: bytes, name: str) -> bool:
    head = data[:600]
    if head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return True
    if head[128:132] == b"DICM" or head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return True
    if len(head) >= 4 and int.from_bytes(head[:4], "little") in (348, 540):  # NIfTI-1/2 header size
        return True
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[2:4] in (b"\x00\x00", b"\x01\x00", b"\x05\x00",
                                                                                b"\x10\x00", b"\x16\x00", b"\x18\x00"):
        return True  # DICOM without preamble: starts with a group 0002 / 0008 element
    n = name.lower()
    return n.endswith(_SUFFIXES)


class UploadError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def parse_form(body: bytes, content_type: str, field: str = "file") -> tuple[str, bytes, dict[str, str]]:
    """multipart/form-data body (in memory) -> (filename, bytes) of ``field`` and the other text fields."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data":
        raise UploadError(415, f"expected a multipart/form-data upload with a '{field}' field, "
                               f"got Content-Type {content_type or 'none'!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(422, "multipart/form-data upload without a boundary")
    parts: list[tuple[dict, bytes]] = []
    cur: dict = {}

    def on_part_begin():
        cur.clear()
        cur.update(headers={}, data=[], hf=[], hv=[])

    def on_header_field(d, s, e):
        cur["hf"].append(d[s:e])

    def on_header_value(d, s, e):
        cur["hv"].append(d[s:e])

    def on_header_end():
        cur["headers"][b"".join(cur["hf"]).lower()] = b"".join(cur["hv"])
        cur["hf"], cur["hv"] = [], []

    def on_part_data(d, s, e):
        cur["data"].append(d[s:e])

    def on_part_end():
        parts.append((dict(cur["headers"]), b"".join(cur["data"])))

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data, "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as e:  # python_multipart raises its own error types for malformed bodies
        raise UploadError(422, f"malformed multipart/form-data upload: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    found, others = None, {}
    for headers, data in parts:
        disp, opts = parse_options_header(headers.get(b"content-disposition", b""))
        pname = opts.get(b"name", b"").decode("utf-8", "replace")
        if pname == field and found is None:
            name = opts.get(b"filename", b"upload").decode("utf-8", "replace") or "upload"
            found = (Path(name.replace("\\", "/")).name or "upload", data)
        elif pname:
            others[pname] = data.decode("utf-8", "replace")
    if found is not None:
        return found[0], found[1], others
    raise UploadError(422, f"multipart upload has no '{field}' field (send the scan as form field '{field}')")


class _AccessLog:
    """Pure ASGI middleware: request id header + one log line per request (id, method, route, size, status,
    latency). It never logs query strings, file names or anything from the file."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:12]
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = {"code": 500}
        size = 0
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                size = int(v) if v.isdigit() else 0

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if log.isEnabledFor(logging.INFO):
                log.info("request_id=%s method=%s path=%s bytes=%d status=%d ms=%.1f", rid, scope.get("method"),
                         scope.get("path"), size, status["code"], (time.perf_counter() - t0) * 1e3)


def _b64png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _image_png(x: np.ndarray) -> bytes:
    import io

    from PIL import Image

    img = x[:, x.shape[1] // 2] if x.ndim == 4 else x  # 3D: middle slice
    img = img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _metrics_summary(path: Path) -> dict:
    try:
        raw = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict = {}
    for split, vals in raw.items():
        if isinstance(vals, dict):
            out[split] = {k: (float(v["value"]) if isinstance(v.get("value"), (int, float)) else None)
                          for k, v in vals.items() if isinstance(v, dict) and "value" in v
                          and (v["value"] is None or isinstance(v["value"], (int, float)))}
    return out


def create_app(bundle_path: str | Path, *, api_key: str | None = None, max_upload_mb: float = 50,
               backend: str = "onnx", threads: int | None = None, predictor: Predictor | None = None) -> FastAPI:
    """The service for one bundle. ``api_key`` (when set) is required on /v1/* as ``X-API-Key`` or
    ``Authorization: Bearer``. ``backend``: 'onnx' (exports model.onnx into the bundle when missing) or 'torch'."""
    if predictor is None:
        from medsight.bundle import load_bundle

        b = load_bundle(bundle_path)
        predictor = Predictor(b, backend=backend, threads=threads or default_threads(b))
    pred = predictor
    bundle = pred.bundle
    limit = int(max_upload_mb * 1024 * 1024)
    meta = bundle.meta
    info = ModelInfo(
        name=meta["model"]["name"], task=meta["task"], classes=bundle.classes,
        input=InputSpec(spatial_dims=meta["input"]["spatial_dims"], channels=meta["input"]["channels"],
                        size=list(meta["input"]["size"]), preprocessing=bundle.recipe),
        threshold=bundle.threshold, temperature=bundle.temperature, calibrated=pred.calibrated,
        model_version=pred.version, data=meta.get("data"), created=meta.get("created"),
        medsight_version=meta.get("medsight_version"), metrics=_metrics_summary(bundle.path),
        clinical_columns=list((bundle.fusion or {}).get("columns") or []),
        max_upload_mb=max_upload_mb,
    )

    app = FastAPI(title="medsight", version=__version__,
                  description=f"Medical image classifier `{info.name}` ({info.task}: {', '.join(info.classes)}). "
                              "Upload a PNG/JPEG/TIFF, DICOM or NIfTI scan to /v1/predict.")
    app.state.predictor = pred
    app.add_middleware(_AccessLog)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        got = request.headers.get("x-api-key")
        if got is None:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                got = auth[7:].strip()
        if got is None or not secrets.compare_digest(got.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (send X-API-Key or Authorization: Bearer)",
                                headers={"WWW-Authenticate": "Bearer"})

    errors = {401: {"model": ErrorResponse}}

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", response_model=Health)
    def healthz():
        return Health(model_version=pred.version, auth_required=bool(api_key))

    @app.get("/v1/model", response_model=ModelInfo, responses=errors, dependencies=[Depends(check_key)])
    def model_info():
        return info

    def infer(data: bytes, name: str, explain: bool, rid: str, clinical: dict | None = None) -> dict:
        try:
            x = pred.load_bytes(data, name, max_elements=MAX_ELEMENTS)
        except DataError as e:
            status = 422 if _looks_supported(data, name) else 415
            raise UploadError(status, str(e).splitlines()[0]) from e
        except Exception as e:  # a reader bug on hostile input is still bad input, not a server error
            raise UploadError(422, f"cannot read {name}: {type(e).__name__}") from e
        try:
            r = pred.predict_array(x, name, explain=explain, clinical=clinical)
        except DataError as e:  # missing or wrongly typed clinical columns
            raise UploadError(422, str(e).splitlines()[0]) from e
        out = {"request_id": rid, "probabilities": r.probabilities, "predicted": r.predicted,
               "decision": r.decision, "threshold": r.threshold, "calibrated": r.calibrated,
               "temperature": pred.temperature, "model_version": r.model_version,
               "ood_score": r.ood_score, "ood_flag": r.ood_flag}
        if explain:
            out["heatmap_png"] = _b64png(pred.overlay(x, r.heatmap, 0.45))
            out["colormap_png"] = _b64png(pred.overlay(x, r.heatmap, 1.0))
            out["image_png"] = _b64png(_image_png(x))
        return out

    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary",
                                "description": "PNG/JPEG/TIFF/BMP, DICOM or NIfTI scan"},
                       "clinical": {"type": "string", "description": "JSON object of clinical column values "
                                                                     "(required by image + clinical models)"}}}}}}}

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=[Depends(check_key)],
              openapi_extra=upload_body,
              responses={**errors, 413: {"model": ErrorResponse, "description": "upload too large"},
                         415: {"model": ErrorResponse, "description": "unsupported file type"},
                         422: {"model": ErrorResponse, "description": "corrupt or unreadable file"}})
    async def predict(request: Request, explain: bool = Query(False, description="add a Grad-CAM overlay")):
        rid = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex[:12]
        try:
            cl = request.headers.get("content-length")
            if cl is not None:
                if not cl.isdigit():
                    raise UploadError(400, f"invalid Content-Length {cl!r}")
                if int(cl) > limit + _MULTIPART_SLACK:
                    raise UploadError(413, f"upload of {int(cl)} bytes is larger than the {max_upload_mb:g} MB limit")
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit + _MULTIPART_SLACK:
                    raise UploadError(413, f"upload is larger than the {max_upload_mb:g} MB limit")
                chunks.append(chunk)
            name, data, fields = parse_form(b"".join(chunks), request.headers.get("content-type", ""))
            clinical = None
            if "clinical" in fields:
                try:
                    clinical = json.loads(fields["clinical"])
                except ValueError:
                    raise UploadError(422, "form field 'clinical' must be a JSON object of column values") from None
                if not isinstance(clinical, dict):
                    raise UploadError(422, "form field 'clinical' must be a JSON object of column values")
            if len(data) > limit:
                raise UploadError(413, f"{name} is {len(data)} bytes, larger than the {max_upload_mb:g} MB limit")
            if not data:
                raise UploadError(422, f"{name} is empty (0 bytes)")
            out = await run_in_threadpool(infer, data, name, explain, rid, clinical)
        except UploadError as e:
            return JSONResponse({"detail": e.detail}, status_code=e.status)
        return JSONResponse(out)

    return app
