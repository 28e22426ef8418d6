"""FastAPI service for one bundle: health, model card, prediction (+ Grad-CAM overlay) and a web page.

Uploads are read into memory (never written to disk), bounded by ``max_upload_mb`` (413) and by a body read
timeout (408), and decoded by ``medsight.data.io.read_image_bytes``. Bad input is a 4xx with a one-line JSON
``detail``, never a 500: 415 for a file type we do not read, 422 for a corrupt / unreadable / oversized-in-pixels
file or a malformed form field.

Admission control: form parsing runs off the event loop; decoding + inference run on a pool of ``workers``
threads (default: the core count) behind a bounded queue. A request that finds ``workers + queue`` predictions
already admitted is refused at once with 503 + ``Retry-After``; one that waits in the queue past its deadline
gets 503, one whose prediction runs past the deadline gets 504. ``/healthz`` is answered on the event loop and
never waits on inference.

Every response carries security headers (nosniff, a CSP without external sources, ``frame-ancestors 'none'``,
``Referrer-Policy: no-referrer``); ``allowed_hosts`` refuses other ``Host`` headers (DNS rebinding). ``/docs``
is a local page rendered from ``/openapi.json`` (no CDN). Logs carry a request id, size, status and latency
only, never file names, file contents or DICOM identifiers. The service never writes into the bundle.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import math
import os
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect

from medsight import __version__
from medsight.errors import DataError
from medsight.predict import Predictor, default_threads
from medsight.serve.schemas import ErrorResponse, Health, ModelInfo, PredictResponse

log = logging.getLogger("medsight.serve")
STATIC = Path(__file__).parent / "static"
_MULTIPART_SLACK = 64 * 1024  # multipart headers and boundaries around the file
#: form fields other than the file (``clinical``): bytes per field, nesting depth of its JSON, parts per form
MAX_FIELD_BYTES = 64 * 1024
MAX_JSON_DEPTH = 8
MAX_PARTS = 8
_MAX_PART_HEADER_BYTES = 8 * 1024
FORM_FIELDS = ("file", "clinical")
#: the display image returned with ?explain=true: the upload at its own resolution, longest side capped
DISPLAY_MAX_SIDE = 1024
#: a result is flagged for review when a probability is this close to its threshold (binary, multilabel) or
#: the two most likely classes are this close (multiclass, ordinal), or when the scan is out of distribution
REVIEW_MARGIN = 0.1
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def _looks_supported(head: bytes, name: str) -> bool:
    """Is this a format the reader understands (so a failure is 422, not 415)? The service's ONLY format
    sniffing call site: the magic numbers live in ``medsight.data.io.sniff_format``."""
    from medsight.data.io import sniff_format

    return sniff_format(head[:600], name) not in (None, "gzip")


class UploadError(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail}, status_code=self.status, headers=self.headers)


def _json_depth(text: str) -> int:
    """Deepest nesting of objects/arrays in a JSON text, found without parsing it (no recursion)."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_clinical(raw: bytes) -> dict:
    """Form field ``clinical`` -> a flat dict of column values; any malformed value is a 422."""
    what = "form field 'clinical' must be a JSON object of column values"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UploadError(422, f"{what}; it is not UTF-8 text") from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise UploadError(422, f"{what}; it is nested deeper than {MAX_JSON_DEPTH} levels")

    def no_constant(c):
        raise ValueError(f"{c} is not allowed")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise UploadError(422, f"{what}; invalid JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(value, dict):
        raise UploadError(422, f"{what}; got a JSON {type(value).__name__}")
    for k, v in value.items():
        if not (v is None or isinstance(v, (str, bool, int, float))):
            raise UploadError(422, f"{what}; column {k[:40]!r} holds a {type(v).__name__}, "
                                   "allowed: number, string, true/false or null")
    return value


def parse_form(body: bytes | list[bytes], content_type: str, field: str = "file") -> tuple[str, bytes, dict[str, bytes]]:
    """multipart/form-data body (in memory: bytes or the received chunks) -> (filename, bytes) of ``field`` and
    the other fields' raw bytes.

    Only the fields in :data:`FORM_FIELDS` are accepted, each once; fields other than the file are capped at
    :data:`MAX_FIELD_BYTES` and a form at :data:`MAX_PARTS` parts (checked while parsing, before buffering)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data":
        raise UploadError(415, f"expected a multipart/form-data upload with a '{field}' field, "
                               f"got Content-Type {(content_type or 'none')[:80]!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(422, "multipart/form-data upload without a boundary")
    parts: list[tuple[str, str | None, bytes]] = []
    cur: dict = {}

    def on_part_begin():
        if len(parts) >= MAX_PARTS:
            raise UploadError(422, f"multipart upload has more than {MAX_PARTS} parts (fields: {', '.join(FORM_FIELDS)})")
        cur.clear()
        cur.update(headers={}, data=[], size=0, hf=[], hv=[], hsize=0, name=None, filename=None)

    def on_header_field(d, s, e):
        cur["hf"].append(d[s:e])
        header_bytes(e - s)

    def on_header_value(d, s, e):
        cur["hv"].append(d[s:e])
        header_bytes(e - s)

    def header_bytes(n):
        cur["hsize"] += n
        if cur["hsize"] > _MAX_PART_HEADER_BYTES:
            raise UploadError(422, f"multipart part headers are longer than {_MAX_PART_HEADER_BYTES} bytes")

    def on_header_end():
        cur["headers"][b"".join(cur["hf"]).lower()] = b"".join(cur["hv"])
        cur["hf"], cur["hv"] = [], []

    def on_headers_finished():
        _, opts = parse_options_header(cur["headers"].get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if name not in FORM_FIELDS:
            raise UploadError(422, f"unexpected form field {name[:40]!r}; send the scan as form field '{field}' "
                                   f"(allowed fields: {', '.join(FORM_FIELDS)})")
        if any(p[0] == name for p in parts):
            raise UploadError(422, f"form field {name!r} is sent more than once")
        cur["name"] = name
        if b"filename" in opts:
            cur["filename"] = opts[b"filename"].decode("utf-8", "replace")

    def on_part_data(d, s, e):
        cur["size"] += e - s
        if cur["name"] != field and cur["size"] > MAX_FIELD_BYTES:
            raise UploadError(422, f"form field {cur['name']!r} is larger than {MAX_FIELD_BYTES // 1024} KB")
        cur["data"].append(d[s:e])

    def on_part_end():
        parts.append((cur["name"], cur["filename"], b"".join(cur["data"])))

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
                 "on_part_end": on_part_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        for chunk in ([body] if isinstance(body, (bytes, bytearray)) else body):
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        raise
    except Exception as e:  # python_multipart raises its own error types for malformed bodies
        raise UploadError(422, f"malformed multipart/form-data upload: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    found, others = None, {}
    for pname, filename, data in parts:
        if pname == field:
            name = filename or "upload"
            found = (Path(name.replace("\\", "/")).name or "upload", data)
        else:
            others[pname] = data
    if found is not None:
        return found[0], found[1], others
    raise UploadError(422, f"multipart upload has no '{field}' field (send the scan as form field '{field}')")


def _host_allowed(host_header: str, allowed: tuple[str, ...]) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[: host.find("]") + 1] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    for pattern in allowed:
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def normalise_hosts(hosts) -> tuple[str, ...]:
    out = []
    for h in hosts:
        h = h.strip().lower()
        if not h:
            continue
        try:
            if ipaddress.ip_address(h.strip("[]")).version == 6:
                h = f"[{h.strip('[]')}]"
        except ValueError:
            pass
        out.append(h)
    return tuple(out)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(bind: str) -> tuple[str, ...] | None:
    """Host names accepted by default for a bind address: the loopback names for a loopback bind (a browser
    tricked by DNS rebinding sends another name), None (any) for other binds."""
    return LOOPBACK_HOSTS if is_loopback(bind) else None


def bind_warning(bind: str, api_key: str | None) -> str | None:
    """The warning to print when a server is reachable from other machines without a key."""
    if api_key or is_loopback(bind):
        return None
    return (f"warning: serving on {bind} without an API key: anyone who can reach this address can send scans "
            "(set --api-key-file or MEDSIGHT_API_KEY)")


def resolve_api_key(api_key: str | None, api_key_file: str | Path | None) -> str | None:
    """The API key from ``--api-key`` / MEDSIGHT_API_KEY or from a file (first line, whitespace stripped)."""
    from medsight.errors import ConfigError

    if api_key and api_key_file:
        raise ConfigError("give the API key once: --api-key (or MEDSIGHT_API_KEY) or --api-key-file, not both")
    if api_key_file is None:
        return api_key or None
    try:
        text = Path(api_key_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--api-key-file {api_key_file}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise ConfigError(f"--api-key-file {api_key_file}: the file is empty")
    return key


class _Edge:
    """Outermost pure ASGI middleware: request id, Host allow-list, security headers on every response (404s,
    401s and unhandled 500s included) and one access log line per request (id, method, route, size, status,
    latency). It never logs query strings, file names or anything from the file."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None):
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:12]
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        status = {"code": 500}
        size, host = 0, ""
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                size = int(v) if v.isdigit() else 0
            elif k == b"host":
                host = v.decode("latin-1")

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _SECURITY_NAMES]
                message["headers"] = headers + SECURITY_HEADERS + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            if self.allowed_hosts is not None and not _host_allowed(host, self.allowed_hosts):
                await JSONResponse({"detail": "Host header not allowed by this server (see --allowed-hosts)"},
                                   status_code=421)(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            if log.isEnabledFor(logging.INFO):
                log.info("request_id=%s method=%s path=%s bytes=%d status=%d ms=%.1f", rid, scope.get("method"),
                         scope.get("path"), size, status["code"], (time.perf_counter() - t0) * 1e3)


_SECURITY_NAMES = {k for k, _ in SECURITY_HEADERS}


class _App(FastAPI):
    """FastAPI with :class:`_Edge` outside Starlette's error middleware, so even a 500 carries the headers."""

    edge_hosts: tuple[str, ...] | None = None

    def build_middleware_stack(self):
        return _Edge(super().build_middleware_stack(), self.edge_hosts)


class Admission:
    """At most ``workers`` decode + inference jobs run at once; at most ``queue`` more wait. ``try_enter``
    takes a slot (False: full), ``run`` runs a job in the pool and frees the slot when the job ends, which may
    be after its caller stopped waiting: a slot is only free when its thread is."""

    def __init__(self, workers: int, queue: int):
        if workers < 1 or queue < 0:
            raise ValueError(f"workers must be >= 1 and queue >= 0, got {workers} and {queue}")
        self.workers, self.queue = workers, queue
        self.capacity = workers + queue
        self.active = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="medsight-infer")
        self._ewma = 0.05  # seconds per job, for Retry-After

    def try_enter(self) -> bool:
        with self._lock:
            if self.active >= self.capacity:
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.active -= 1

    def retry_after(self) -> int:
        return int(min(60, max(1, math.ceil(self._ewma * self.capacity / self.workers))))

    def busy(self, why: str) -> UploadError:
        s = self.retry_after()
        return UploadError(503, f"server busy: {why}; retry in {s} s", {"Retry-After": str(s)})

    async def run(self, deadline_s: float, fn, *args):
        """Run ``fn(*args)`` in the pool within ``deadline_s``; the caller's slot is released when it ends."""

        def job():
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._ewma = 0.8 * self._ewma + 0.2 * (time.perf_counter() - t0)

        cf = self._pool.submit(job)
        cf.add_done_callback(lambda _: self.leave())
        fut = asyncio.wrap_future(cf)
        done, _ = await asyncio.wait({fut}, timeout=max(deadline_s, 0.0))
        if fut in done:
            return fut.result()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits for it any more
        if cf.cancel():
            raise self.busy(f"waited {deadline_s:g} s in the queue")
        raise UploadError(504, f"prediction did not finish within the {deadline_s:g} s deadline")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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


def review_reasons(r, task: str, classes: list[str], margin: float = REVIEW_MARGIN,
                   ood_threshold: float | None = None) -> list[str]:
    """Why a prediction should not be read as a verdict: out of distribution, or too close to call."""
    reasons = []
    if r.ood_flag:
        reasons.append("the scan does not look like the training data (out-of-distribution score "
                       f"{r.ood_score:.1f}" + (f" > {ood_threshold:.1f})" if ood_threshold is not None else ")"))
    from medsight.tasks import kind_of

    return reasons + kind_of(task).review_reasons(r.probabilities, r.threshold, classes, margin)


def _predictor(bundle_path, backend: str, threads: int | None) -> Predictor:
    """The service's Predictor; it never writes into the bundle (a model.onnx that is missing or was not exported
    from this bundle's model.pt is exported in memory, see ``medsight.export.onnx_for_bundle``)."""
    from medsight.bundle import load_bundle

    b = load_bundle(bundle_path)
    return Predictor(b, backend=backend, threads=threads or default_threads(b))


def create_app(bundle_path: str | Path, *, api_key: str | None = None, max_upload_mb: float = 50,
               backend: str = "onnx", threads: int | None = None, predictor: Predictor | None = None,
               workers: int | None = None, queue: int | None = None, deadline_s: float = 30.0,
               body_timeout_s: float = 60.0, allowed_hosts=None) -> FastAPI:
    """The service for one bundle. ``api_key`` (when set) is required on /v1/* as ``X-API-Key`` or
    ``Authorization: Bearer``. ``backend``: 'onnx' or 'torch'. ``workers`` concurrent predictions (default: the
    core count) with ``queue`` more waiting (default: 2 x workers); ``deadline_s`` per prediction (queue wait
    included); ``body_timeout_s`` to receive an upload. ``allowed_hosts``: accepted ``Host`` names (``"*"``,
    ``"*.example.org"`` allowed); None accepts any (the CLI passes the loopback names for loopback binds)."""
    pred = predictor if predictor is not None else _predictor(bundle_path, backend, threads)
    # the reader's libraries log decode failures at ERROR with tracebacks; the service reports them as one 4xx
    # line per request instead (and a traceback could quote the file)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    bundle = pred.bundle
    limit = int(max_upload_mb * 1024 * 1024)
    workers = workers or os.cpu_count() or 1
    gate = Admission(workers, 2 * workers if queue is None else queue)
    ood_threshold = float(pred.ood["threshold"]) if pred.ood is not None else None
    info = ModelInfo.from_bundle(bundle, calibrated=pred.calibrated, model_version=pred.version,
                                 metrics=_metrics_summary(bundle.path), max_upload_mb=max_upload_mb,
                                 review_margin=REVIEW_MARGIN, ood_threshold=ood_threshold)

    app = _App(title="medsight", version=__version__, docs_url=None, redoc_url=None,
               swagger_ui_oauth2_redirect_url=None,
               description=f"Medical image classifier `{info.name}` ({info.task}: {', '.join(info.classes)}). "
                           "Upload a PNG/JPEG/TIFF, DICOM or NIfTI scan to /v1/predict.")
    app.edge_hosts = None if allowed_hosts is None else normalise_hosts(allowed_hosts)
    app.state.predictor = pred
    app.state.admission = gate
    app.router.on_shutdown.append(gate.shutdown)

    if api_key:
        key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                                  description="the server's API key")
        bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                            description="the server's API key as a bearer token")

        def check_key(key: str | None = Security(key_header),
                      cred: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
            got = key if key is not None else (cred.credentials if cred is not None else None)
            if got is None or not secrets.compare_digest(got.encode(), api_key.encode()):
                raise HTTPException(401, "missing or wrong API key (send X-API-Key or Authorization: Bearer)",
                                    headers={"WWW-Authenticate": "Bearer"})
    else:
        def check_key() -> None:
            return None

    errors = {401: {"model": ErrorResponse}} if api_key else {}

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", response_model=Health)
    async def healthz():  # on the event loop: never queued behind inference
        return Health(model_version=pred.version, auth_required=bool(api_key), busy=gate.active,
                      capacity=gate.capacity)

    @app.get("/v1/model", response_model=ModelInfo, responses=errors, dependencies=[Depends(check_key)])
    async def model_info():
        return info

    def display(arr: np.ndarray, meta_: dict, heat: np.ndarray, name: str) -> dict:
        """The upload as the reader windowed/normalised it, at its own resolution (longest side capped), and
        the heatmap resampled onto it; for volumes the middle axial slice."""
        import torch

        from medsight.explain import overlay_png
        from medsight.data.preprocess import apply_recipe
        from medsight.augment import resize

        r = pred.recipe
        native = [int(s) for s in arr.shape[1:]]
        if arr.ndim == 4 and len(r["size"]) == 2 and arr.shape[1] == 1:
            native = native[1:]
        if len(native) == 2:
            s = min(1.0, DISPLAY_MAX_SIDE / max(native))
            native = [max(1, round(v * s)) for v in native]
        # the bundle's own recipe, at the scan's own size and channels
        img = apply_recipe(arr, meta_, {**r, "size": native, "channels": None}, name=name)
        if img.ndim == 4:  # volume: middle axial slice, in-plane size capped
            img, heat = img[:, img.shape[1] // 2], heat[heat.shape[0] // 2]
            h, w = img.shape[1:]
            s = min(1.0, DISPLAY_MAX_SIDE / max(h, w))
            if s < 1:
                img = resize(torch.from_numpy(np.ascontiguousarray(img))[None], (round(h * s), round(w * s)))[0].numpy()
        hh = resize(torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None], tuple(img.shape[1:]))
        hh = np.clip(hh[0, 0].numpy(), 0, 1)
        bar = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (12, 1))
        return {"display_png": _b64png(_image_png(img)),
                "display_heatmap_png": _b64png(overlay_png(img, hh, alpha=1.0)),
                "display_size": [int(img.shape[2]), int(img.shape[1])],
                "colorbar_png": _b64png(overlay_png(np.zeros((1, 12, 256), np.float32), bar, alpha=1.0))}

    def infer(data: bytes, name: str, explain: bool, rid: str, clinical: dict | None = None) -> bytes:
        from medsight.data.io import read_image_bytes

        window = pred.recipe.get("window")
        try:
            arr, meta_ = read_image_bytes(data, name, window=tuple(window) if isinstance(window, list) else window,
                                          budget=pred.budget)  # fixed from the model's input, before decoding
            x = pred.preprocess(arr, meta_, name)
        except DataError as e:
            status = 422 if _looks_supported(data, name) else 415
            raise UploadError(status, str(e).splitlines()[0]) from None
        except Exception as e:  # a reader bug on hostile input is still bad input, not a server error
            raise UploadError(422, f"cannot read {name}: {type(e).__name__}") from None
        try:
            r = pred.predict_array(x, name, explain=explain, clinical=clinical)
        except DataError as e:  # missing or wrongly typed clinical columns
            raise UploadError(422, str(e).splitlines()[0]) from None
        reasons = review_reasons(r, info.task, info.classes, ood_threshold=ood_threshold)
        out = {"request_id": rid, "probabilities": r.probabilities, "predicted": r.predicted,
               "decision": r.decision, "threshold": r.threshold, "calibrated": r.calibrated,
               "temperature": pred.temperature, "model_version": r.model_version,
               "ood_score": r.ood_score, "ood_flag": r.ood_flag, "review": bool(reasons), "review_reasons": reasons,
               "positive_class": r.positive_class}
        if r.member_spread is not None:
            out["member_spread"] = r.member_spread
        if explain:
            out["heatmap_png"] = _b64png(pred.overlay(x, r.heatmap))
            out["colormap_png"] = _b64png(pred.overlay(x, r.heatmap, 1.0))
            out["image_png"] = _b64png(_image_png(x))
            out.update(display(arr, meta_, r.heatmap, name))
        return json.dumps(out).encode()  # serialised here, off the event loop

    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary",
                                "description": "PNG/JPEG/TIFF/BMP, DICOM or NIfTI scan"},
                       "clinical": {"type": "string", "maxLength": MAX_FIELD_BYTES,
                                    "description": "flat JSON object of clinical column values (required by "
                                                   f"image + clinical models; at most {MAX_FIELD_BYTES // 1024} KB)"}}}}}}}

    async def read_body(request: Request) -> list[bytes]:
        loop = asyncio.get_running_loop()
        end = loop.time() + body_timeout_s
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(end - loop.time(), 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise UploadError(408, f"upload not received within {body_timeout_s:g} s") from None
            size += len(chunk)
            if size > limit + _MULTIPART_SLACK:
                raise UploadError(413, f"upload is larger than the {max_upload_mb:g} MB limit")
            chunks.append(chunk)
        return chunks  # parsed chunk by chunk off the event loop: never joined here

    def parse(body: list[bytes], content_type: str) -> tuple[str, bytes, dict | None]:
        name, data, fields = parse_form(body, content_type)
        clinical = parse_clinical(fields["clinical"]) if "clinical" in fields else None
        if len(data) > limit:
            raise UploadError(413, f"{name} is {len(data)} bytes, larger than the {max_upload_mb:g} MB limit")
        if not data:
            raise UploadError(422, f"{name} is empty (0 bytes)")
        return name, data, clinical

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=[Depends(check_key)],
              openapi_extra=upload_body,
              responses={**errors, 408: {"model": ErrorResponse, "description": "upload not received in time"},
                         413: {"model": ErrorResponse, "description": "upload too large"},
                         415: {"model": ErrorResponse, "description": "unsupported file type"},
                         422: {"model": ErrorResponse, "description": "corrupt or unreadable file, malformed form"},
                         503: {"model": ErrorResponse, "description": "queue full (see Retry-After) or queue "
                                                                       "wait past the deadline"},
                         504: {"model": ErrorResponse, "description": "prediction past the deadline"}})
    async def predict(request: Request, explain: bool = Query(False, description="add Grad-CAM overlays and the "
                                                                                  "scan at its own resolution")):
        rid = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex[:12]
        if not gate.try_enter():
            return gate.busy(f"{gate.capacity} predictions already admitted").response()
        handed_over = False
        try:
            cl = request.headers.get("content-length")
            if cl is not None:
                if not cl.isdigit():
                    raise UploadError(400, f"invalid Content-Length {cl[:20]!r}")
                if int(cl) > limit + _MULTIPART_SLACK:
                    raise UploadError(413, f"upload of {int(cl)} bytes is larger than the {max_upload_mb:g} MB limit")
            body = await read_body(request)
            start = time.monotonic()
            name, data, clinical = await run_in_threadpool(parse, body, request.headers.get("content-type", ""))
            del body
            handed_over = True
            out = await gate.run(deadline_s - (time.monotonic() - start), infer, data, name, explain, rid, clinical)
        except UploadError as e:  # one access-log line (status, no reason: the reason may name the file)
            return e.response()
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; logged by _Edge
        finally:
            if not handed_over:
                gate.leave()
        return Response(out, media_type="application/json", headers={"Cache-Control": "no-store"})

    return app
