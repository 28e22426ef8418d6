"""FastAPI service for one bundle: health, model card, prediction (+ Grad-CAM overlay) and a web page.

Uploads are read into memory (never written to disk), bounded by ``max_upload_mb`` (413) and by a body read
timeout (408), and decoded by ``Predictor.read_bytes``. Bad input is a 4xx with a one-line JSON
``detail``, never a 500: 415 for a file type we do not read, 422 for a corrupt / unreadable / oversized-in-pixels
file or a malformed form field.

The service goes through :class:`medsight.predict.Predictor` only: decoding (within the model's budget),
preprocessing, prediction, the "needs review" decision and its reasons (:mod:`medsight.review`), the Grad-CAM
and display images and the model card all come from it, so ``medsight predict`` and the MLflow model report the
same fields for the same file. :class:`Service` holds the state and the handlers (testable without HTTP);
:func:`create_app` only routes to them.

Admission control: an upload's body is received first (holding no slot; ``body_timeout_s``), the form is parsed
off the event loop, and only then is an admission slot taken: decoding + inference run on a pool of ``workers``
threads (default: the core count) behind a queue (default :data:`DEFAULT_QUEUE`). 503 + ``Retry-After`` only
when the expected wait (jobs ahead x the mean job time / workers) would pass the deadline, or the queue is
full; a job still queued at its deadline gets 503, one whose prediction runs past it gets 504. ``/healthz`` is
answered on the event loop and never waits on inference. Connection-level limits (header and keep-alive idle
timeouts, a connection limit, quiet descriptor exhaustion) are set by :mod:`medsight.serve.server`.

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
from typing import Any

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
#: predictions waiting beyond the workers, by default: 64 concurrent clients on 2 cores wait instead of getting 503
#: (waiting is still bounded by the deadline: a request whose expected wait passes it gets 503 + Retry-After)
DEFAULT_QUEUE = 64
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
    """At most ``workers`` decode + inference jobs run at once; at most ``queue`` more wait. A request is admitted
    only once its whole body has arrived (a slow upload holds no slot). ``try_enter`` takes a slot: refused when
    ``workers + queue`` are admitted or when the expected wait (jobs ahead x the running mean job time / workers)
    would pass the deadline; ``run`` runs a job in the pool and frees the slot when the job ends, which may be
    after its caller stopped waiting: a slot is only free when its thread is."""

    def __init__(self, workers: int, queue: int):
        if workers < 1 or queue < 0:
            raise ValueError(f"workers must be >= 1 and queue >= 0, got {workers} and {queue}")
        self.workers, self.queue = workers, queue
        self.capacity = workers + queue
        self.active = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="medsight-infer")
        self._ewma = 0.05  # seconds per job: expected waits and Retry-After

    def expected_wait(self, active: int | None = None) -> float:
        """Seconds a request admitted now would wait before its job starts."""
        ahead = max(0, (self.active if active is None else active) - self.workers + 1)
        return self._ewma * ahead / self.workers

    def try_enter(self, deadline_s: float | None = None) -> str | None:
        """Take a slot; None when admitted, else why not (for the 503)."""
        with self._lock:
            if self.active >= self.capacity:
                return f"{self.capacity} predictions already admitted"
            wait = self.expected_wait()
            if deadline_s is not None and wait > deadline_s:
                return f"the expected wait of {wait:.1f} s passes the {deadline_s:g} s deadline"
            self.active += 1
            return None

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


def response_fields(r, rid: str, temperature: float, images: dict | None = None) -> dict:
    """A Prediction (and its PNG images) -> the ``POST /v1/predict`` JSON body. Every field of the result comes
    from the Predictor, the review decision and its reasons included."""
    out = {"request_id": rid, "probabilities": r.probabilities, "predicted": r.predicted,
           "decision": r.decision, "threshold": r.threshold, "calibrated": r.calibrated,
           "temperature": temperature, "model_version": r.model_version,
           "ood_score": r.ood_score, "ood_flag": r.ood_flag, "review": r.review,
           "review_reasons": list(r.review_reasons), "positive_class": r.positive_class}
    if r.member_spread is not None:
        out["member_spread"] = r.member_spread
    for key, field in (("heatmap", "heatmap_png"), ("colormap", "colormap_png"), ("image", "image_png"),
                       ("display", "display_png"), ("display_heatmap", "display_heatmap_png"),
                       ("colorbar", "colorbar_png")):
        if images and key in images:
            out[field] = _b64png(images[key])
    if images and "display_size" in images:
        out["display_size"] = images["display_size"]
    return out


class Service:
    """The service's state for one bundle and its handlers, callable without HTTP: :meth:`health`,
    :meth:`model_info`, :meth:`check_length`, :meth:`parse`, :meth:`infer` (decode + predict + review through the
    Predictor; raises :class:`UploadError`) and :meth:`admit_and_run`. ``create_app`` only routes to them."""

    def __init__(self, predictor: Predictor, *, api_key: str | None = None, max_upload_mb: float = 50,
                 workers: int | None = None, queue: int | None = None, deadline_s: float = 30.0,
                 body_timeout_s: float = 60.0):
        self.predictor = predictor
        self.api_key = api_key
        self.max_upload_mb = max_upload_mb
        self.limit = int(max_upload_mb * 1024 * 1024)
        self.deadline_s = deadline_s
        self.body_timeout_s = body_timeout_s
        workers = workers or os.cpu_count() or 1
        self.gate = Admission(workers, DEFAULT_QUEUE if queue is None else queue)
        self.receiving = 0  # uploads whose body is still arriving (they hold no admission slot)
        self.info = ModelInfo(**predictor.model_card(), max_upload_mb=max_upload_mb)

    # --- plain handlers -----------------------------------------------------------------------------------
    def health(self) -> Health:
        return Health(model_version=self.predictor.version, auth_required=bool(self.api_key), busy=self.gate.active,
                      capacity=self.gate.capacity, receiving=self.receiving)

    def model_info(self) -> ModelInfo:
        return self.info

    def check_length(self, content_length: str | None) -> None:
        if content_length is None:
            return
        if not content_length.isdigit():
            raise UploadError(400, f"invalid Content-Length {content_length[:20]!r}")
        if int(content_length) > self.limit + _MULTIPART_SLACK:
            raise UploadError(413, f"upload of {int(content_length)} bytes is larger than the "
                                   f"{self.max_upload_mb:g} MB limit")

    def parse(self, body: bytes | list[bytes], content_type: str) -> tuple[str, bytes, dict | None]:
        name, data, fields = parse_form(body, content_type)
        clinical = parse_clinical(fields["clinical"]) if "clinical" in fields else None
        if len(data) > self.limit:
            raise UploadError(413, f"{name} is {len(data)} bytes, larger than the {self.max_upload_mb:g} MB limit")
        if not data:
            raise UploadError(422, f"{name} is empty (0 bytes)")
        return name, data, clinical

    def infer(self, data: bytes, name: str, explain: bool = False, rid: str = "", clinical: dict | None = None) -> dict:
        """One upload -> the response body (a dict). 415 for a type the readers do not read, 422 for a corrupt
        file or unusable clinical values."""
        pred = self.predictor
        try:
            arr, meta = pred.read_bytes(data, name)  # decoded within the model's budget, fixed before decoding
            x = pred.preprocess(arr, meta, name)
        except DataError as e:
            raise UploadError(422 if pred.readable(data, name) else 415, str(e).splitlines()[0]) from None
        except Exception as e:  # a reader bug on hostile input is still bad input, not a server error
            raise UploadError(422, f"cannot read {name}: {type(e).__name__}") from None
        try:
            r = pred.predict_array(x, name, explain=explain, clinical=clinical)
        except DataError as e:  # missing or wrongly typed clinical columns
            raise UploadError(422, str(e).splitlines()[0]) from None
        images = None
        if explain and r.heatmap is not None:
            heat = r.heatmap
            images = {"heatmap": pred.overlay(x, heat), "colormap": pred.overlay(x, heat, 1.0),
                      "image": _image_png(x), **pred.display(arr, meta, heat, name, DISPLAY_MAX_SIDE)}
        return response_fields(r, rid, pred.temperature, images)

    # --- HTTP plumbing ------------------------------------------------------------------------------------
    async def read_body(self, request: Request) -> list[bytes]:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.body_timeout_s
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(end - loop.time(), 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise UploadError(408, f"upload not received within {self.body_timeout_s:g} s") from None
            size += len(chunk)
            if size > self.limit + _MULTIPART_SLACK:
                raise UploadError(413, f"upload is larger than the {self.max_upload_mb:g} MB limit")
            chunks.append(chunk)
        return chunks  # parsed chunk by chunk off the event loop: never joined here

    def _serialise(self, *args) -> bytes:
        return json.dumps(self.infer(*args)).encode()  # serialised in the worker, off the event loop

    async def predict(self, request: Request, explain: bool) -> Response:
        """``POST /v1/predict``: receive the body (no slot held), parse it, then take an admission slot and run."""
        rid = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex[:12]
        try:
            self.check_length(request.headers.get("content-length"))
            self.receiving += 1
            try:
                body = await self.read_body(request)
            finally:
                self.receiving -= 1
            start = time.monotonic()
            name, data, clinical = await run_in_threadpool(self.parse, body, request.headers.get("content-type", ""))
            del body
            why = self.gate.try_enter(self.deadline_s - (time.monotonic() - start))
            if why is not None:
                raise self.gate.busy(why)
            out = await self.gate.run(self.deadline_s - (time.monotonic() - start), self._serialise, data, name,
                                      explain, rid, clinical)
        except UploadError as e:  # one access-log line (status, no reason: the reason may name the file)
            return e.response()
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; logged by _Edge
        return Response(out, media_type="application/json", headers={"Cache-Control": "no-store"})


#: the display image returned with ?explain=true: the upload at its own resolution, longest side capped
DISPLAY_MAX_SIDE = 1024


def _image_png(x) -> bytes:
    from medsight.predict import image_png

    return image_png(x)


def _predictor(bundle_path, backend: str, threads: int | None) -> Predictor:
    """The service's Predictor; it never writes into the bundle (a model.onnx that is missing or was not exported
    from this bundle's model.pt is exported in memory, see ``medsight.export.onnx_for_bundle``)."""
    from medsight.bundle import load_bundle

    b = load_bundle(bundle_path)
    return Predictor(b, backend=backend, threads=threads or default_threads(b))


def _key_check(api_key: str | None):
    if not api_key:
        def no_key() -> None:
            return None
        return no_key
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                              description="the server's API key")
    bearer = HTTPBearer(auto_error=False, scheme_name="bearer", description="the server's API key as a bearer token")

    def check_key(key: str | None = Security(key_header),
                  cred: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        got = key if key is not None else (cred.credentials if cred is not None else None)
        if got is None or not secrets.compare_digest(got.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (send X-API-Key or Authorization: Bearer)",
                                headers={"WWW-Authenticate": "Bearer"})
    return check_key


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "PNG/JPEG/TIFF/BMP, DICOM or NIfTI scan"},
                   "clinical": {"type": "string", "maxLength": MAX_FIELD_BYTES,
                                "description": "flat JSON object of clinical column values (required by "
                                               f"image + clinical models; at most {MAX_FIELD_BYTES // 1024} KB)"}}}}}}}


def create_app(bundle_path: str | Path, *, api_key: str | None = None, max_upload_mb: float = 50,
               backend: str = "onnx", threads: int | None = None, predictor: Predictor | None = None,
               workers: int | None = None, queue: int | None = None, deadline_s: float = 30.0,
               body_timeout_s: float = 60.0, allowed_hosts=None) -> FastAPI:
    """The service for one bundle. ``api_key`` (when set) is required on /v1/* as ``X-API-Key`` or
    ``Authorization: Bearer``. ``backend``: 'onnx' or 'torch'. ``workers`` concurrent predictions (default: the
    core count) with ``queue`` more waiting (default :data:`DEFAULT_QUEUE`); ``deadline_s`` per prediction (queue
    wait included); ``body_timeout_s`` to receive an upload. ``allowed_hosts``: accepted ``Host`` names (``"*"``,
    ``"*.example.org"`` allowed); None accepts any (the CLI passes the loopback names for loopback binds)."""
    pred = predictor if predictor is not None else _predictor(bundle_path, backend, threads)
    # the reader's libraries log decode failures at ERROR with tracebacks; the service reports them as one 4xx
    # line per request instead (and a traceback could quote the file)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    svc = Service(pred, api_key=api_key, max_upload_mb=max_upload_mb, workers=workers, queue=queue,
                  deadline_s=deadline_s, body_timeout_s=body_timeout_s)
    info = svc.info
    app = _App(title="medsight", version=__version__, docs_url=None, redoc_url=None,
               swagger_ui_oauth2_redirect_url=None,
               description=f"Medical image classifier `{info.name}` ({info.task}: {', '.join(info.classes)}). "
                           "Upload a PNG/JPEG/TIFF, DICOM or NIfTI scan to /v1/predict.")
    app.edge_hosts = None if allowed_hosts is None else normalise_hosts(allowed_hosts)
    app.state.predictor = pred
    app.state.service = svc
    app.state.admission = svc.gate
    app.router.on_shutdown.append(svc.gate.shutdown)
    app.router.on_startup.append(quiet_accept_errors)
    check_key = _key_check(api_key)
    errors: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}} if api_key else {}

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return FileResponse(STATIC / "docs.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", response_model=Health)
    async def healthz():  # on the event loop: never queued behind inference
        return svc.health()

    @app.get("/v1/model", response_model=ModelInfo, responses=errors, dependencies=[Depends(check_key)])
    async def model_info():
        return svc.model_info()

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=[Depends(check_key)],
              openapi_extra=UPLOAD_BODY,
              responses={**errors, 408: {"model": ErrorResponse, "description": "upload not received in time"},
                         413: {"model": ErrorResponse, "description": "upload too large"},
                         415: {"model": ErrorResponse, "description": "unsupported file type"},
                         422: {"model": ErrorResponse, "description": "corrupt or unreadable file, malformed form"},
                         503: {"model": ErrorResponse, "description": "the expected wait would pass the deadline "
                                                                       "(see Retry-After)"},
                         504: {"model": ErrorResponse, "description": "prediction past the deadline"}})
    async def predict(request: Request, explain: bool = Query(False, description="add Grad-CAM overlays and the "
                                                                                  "scan at its own resolution")):
        return await svc.predict(request, explain)

    return app


def quiet_accept_errors() -> None:
    """Descriptor exhaustion (``accept()`` failing with EMFILE/ENFILE) is one log line per minute, without a
    traceback, instead of asyncio's traceback per retry; other loop errors go to the default handler."""
    from medsight.serve.server import install_loop_handler

    install_loop_handler(asyncio.get_running_loop())
