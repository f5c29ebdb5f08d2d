"""The HTTP face without a web framework: each endpoint is a function from a neutral Request to a
Reply. Status codes, JSON bodies, reason codes, push verification and metrics are decided here,
once; the Flask app (app.py) and the FastAPI app (asgi.py) only turn their request into a Request
and the Reply into their response.

Every handler blocks (the decode, the engine call through the micro-batcher, BigQuery, Google's
signing certificates, the wait for a pushed job's row). Flask runs them in gunicorn's request
threads, FastAPI in its thread pool: never on the event loop.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Mapping

from worker.http.classify import RecordFacts, classify_row, new_event_key, status_for_rejection
from worker.http.metrics import Metrics
from worker.http.oidc import PushAuthError, PushTokenVerifier
from worker.http.push import PushEnvelopeError, PushOutcome, parse_push_envelope, push_delivery
from worker.http.service import PUSH_REFUSED, InferenceService, NoTables, NotReady
from modelspec.preprocess import ImageRejected

_LOGGER = logging.getLogger(__name__)
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_NAME_CHARS = 1024
JSON = "application/json"
RETRY_AFTER_S = 5  # Retry-After of a 503 while the model loads
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


@dataclass(frozen=True)
class AppOptions:
    max_image_bytes: int
    push_wait_s: float = 30.0
    push_verifier: PushTokenVerifier | None = None  # None: push requests are not authenticated

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read (an image and its multipart framing); larger: 413."""
        return self.max_image_bytes + MULTIPART_OVERHEAD_BYTES


class BodyTooLarge(Exception):
    """The body is over AppOptions.max_body_bytes: the adapters raise it before reading it all."""


class BadRequest(ValueError):
    """The request itself is wrong (not the image): 400 bad_request."""


@dataclass(frozen=True)
class Upload:
    """An image from a request: the raw body or one multipart file part."""

    data: bytes
    content_type: str | None = None
    filename: str | None = None


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Request:
    """What a handler needs of a request. The adapters read the body only when a handler asks
    (read_body, read_files), so a request refused first (bad flag, no token) is not read."""

    method: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # case-insensitive, as both frameworks' header objects are
    mimetype: str  # Content-Type without parameters, lower case; "" without one
    read_body: Callable[[], bytes]  # raises BodyTooLarge
    read_files: Callable[[], Mapping[str, Upload]]  # multipart file parts by name; raises BodyTooLarge
    received_monotonic: float = field(default_factory=time.monotonic)
    received_at: dt.datetime = field(default_factory=_utcnow)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def json_reply(payload: dict, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    # Sorted keys and a final newline, as Flask's jsonify wrote them.
    body = (json.dumps(payload, sort_keys=True, separators=(",", ":")) + "\n").encode()
    return Reply(status, body, JSON, dict(headers or {}))


def error_reply(status: int, reason: str, message: str, headers: Mapping[str, str] | None = None,
                **extra) -> Reply:
    return json_reply({"error": reason, "message": message, **extra}, status, headers)


def mimetype_of(content_type: str | None) -> str:
    """'Image/PNG; charset=x' -> 'image/png' (what Werkzeug calls the mimetype)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    name: str
    handler: Callable[[Request], Reply]


class HttpFace:
    """The endpoints over one InferenceService and one Metrics (registered as its observers)."""

    def __init__(self, service: InferenceService, metrics: Metrics, options: AppOptions):
        self.service, self.metrics, self.options = service, metrics, options
        service.add_batch_observer(metrics.observe_batch)
        service.add_classify_observer(metrics.observe_classify_batch)
        self.routes = (
            Route("GET", "/healthz", "healthz", self.healthz),
            Route("GET", "/readyz", "readyz", self.readyz),
            Route("POST", "/classify", "classify", self.classify),
            Route("POST", "/pubsub/push", "pubsub_push", self.push),
            Route("GET", "/metrics", "metrics", self.metrics_text),
        )

    @property
    def max_body_bytes(self) -> int:
        return self.options.max_body_bytes

    def handle(self, route: Route, request: Request) -> Reply:
        """route.handler with the service's refusals turned into their answers."""
        try:
            return route.handler(request)
        except NotReady as exc:
            return error_reply(503, "not_ready", str(exc), {"Retry-After": str(RETRY_AFTER_S)})
        except NoTables as exc:
            return error_reply(503, "no_tables", str(exc))
        except BadRequest as exc:
            return error_reply(400, "bad_request", str(exc))
        except BodyTooLarge:
            return self.too_large()

    def too_large(self) -> Reply:
        return error_reply(413, "too_many_bytes", f"the body is over {self.max_body_bytes} bytes "
                           f"(WORKER_MAX_IMAGE_BYTES={self.options.max_image_bytes} and multipart framing)")

    def http_error(self, status: int, description: str | None = None,
                   headers: Mapping[str, str] | None = None) -> Reply:
        """The framework's own refusals (404, 405, a damaged multipart body, 500) in the same shape;
        headers: the framework's for it (Allow of a 405)."""
        if status == 413:
            return self.too_large()
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        kept = {name: value for name, value in (headers or {}).items() if name.lower() == "allow"}
        return error_reply(status, phrase.lower().replace(" ", "_").replace("-", "_"), description or phrase, kept)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """endpoint: the route's path, or "other" for a request no route took."""
        self.metrics.observe_request(endpoint, method, status, seconds)

    # --- the endpoints ------------------------------------------------------------------------

    def healthz(self, request: Request) -> Reply:
        if self.service.failed:
            return json_reply({"status": "failed", "checks": self.service.readiness()}, 500)
        return json_reply({"status": "alive"})

    def readyz(self, request: Request) -> Reply:
        ready, checks = self._readiness()
        return json_reply({"ready": ready, "checks": checks}, 200 if ready else 503)

    def metrics_text(self, request: Request) -> Reply:
        self._readiness()
        body, content_type = self.metrics.render()
        return Reply(200, body, content_type)

    def _readiness(self) -> tuple[bool, dict[str, str]]:
        checks = self.service.readiness()
        ready = all(value in ("ok", "disabled") for value in checks.values())
        self.metrics.ready.set(1 if ready else 0)
        if self.service.ready:
            self.metrics.set_model(self.service.model_facts())
        return ready, checks

    def classify(self, request: Request) -> Reply:
        service = self.service
        record = _flag(request.query, "record")
        try:
            image = _image_from(request)
        except BodyTooLarge:  # over the body limit: refused before reading it
            self.metrics.observe_rejection("too_many_bytes")
            raise
        if record:  # refused before the engine call when there is no table to write to
            service.require_tables("?record=true cannot write the row")
        try:
            result = service.classify(image.data, request.received_monotonic)
        except ImageRejected as exc:
            self.metrics.observe_rejection(exc.reason)
            return error_reply(status_for_rejection(exc.reason), exc.reason, str(exc))
        self.metrics.observe_classify(result.timings_ms())
        facts = service.model_facts()
        body = {"label": result.label, "score": result.score, "class_index": result.class_index,
                "top_k": result.top_k_records(), "logit": result.logit, "threshold": result.threshold,
                "input_spec": result.input_spec, **facts, "batch_size": result.batch_size, "timings_ms": result.timings_ms(), "recorded": False}
        if not record:
            return json_reply(body)
        return self._record(request, result, facts, body, image)

    def _record(self, request: Request, result, facts: dict, body: dict, image: Upload) -> Reply:
        service = self.service
        name = (request.query.get("name") or image.filename or "request-body")[:MAX_NAME_CHARS]
        record = RecordFacts(event_key=new_event_key(), object_name=name, content_type=image.content_type,
                             run_id=request.query.get("run_id") or None, web_framework=facts["web_framework"])
        row = classify_row(result, record, facts, service.machine_row, service.sample_system(), request.received_at,
                           _utcnow())
        started = time.perf_counter()
        outcome = service.record(row)
        body["timings_ms"]["record"] = (time.perf_counter() - started) * 1000.0
        body["event_key"] = record.event_key
        if not outcome.ok:
            _LOGGER.warning("classify row %s not written: %s", record.event_key, outcome.failed)
            return error_reply(503, "not_recorded", f"the row was not written: {outcome.failed.get(0)}", **body)
        body["recorded"] = True
        return json_reply(body)

    def push(self, request: Request) -> Reply:
        options, service = self.options, self.service
        if options.push_verifier is not None:
            try:
                options.push_verifier.verify(request.headers.get("Authorization"))
            except PushAuthError as exc:
                _LOGGER.warning("push refused (%s): %s", exc.reason, exc)
                return error_reply(exc.status, exc.reason, str(exc))
        service.require_tables(PUSH_REFUSED)  # never ack a job whose row cannot be written
        try:
            message = parse_push_envelope(request.read_body())
        except PushEnvelopeError as exc:
            return error_reply(400, "bad_envelope", str(exc))
        outcome = PushOutcome()
        future = service.push(push_delivery(message, outcome, _utcnow(), time.monotonic(),
                                            web_framework=service.options.web_framework or None))
        try:
            future.result(timeout=options.push_wait_s)
        except FutureTimeout:
            return error_reply(503, "timeout", f"no row within {options.push_wait_s:.0f} s; "
                               "Pub/Sub will deliver it again")
        except Exception as exc:
            return error_reply(503, "batch_failed", f"the batch failed ({exc}); Pub/Sub will deliver it again")
        if outcome.wait(0) is True:
            return Reply(204)
        return error_reply(503, "retry", "the job was not written (transient failure); Pub/Sub will deliver it again")


def _flag(query: Mapping[str, str], name: str) -> bool:
    raw = (query.get(name) or "").strip().lower()
    if raw in _TRUE + _FALSE:
        return raw in _TRUE
    raise BadRequest(f"?{name}={raw!r}: use true or false")


def _image_from(request: Request) -> Upload:
    """The raw body, or the multipart part "image" (or "file", or the only file part)."""
    if request.mimetype == "multipart/form-data":
        files = request.read_files()
        part = files.get("image") or files.get("file") or (next(iter(files.values())) if len(files) == 1 else None)
        if part is None:
            raise BadRequest("multipart body without an image: send the file as the part named \"image\"")
        return part
    return Upload(request.read_body(), request.mimetype or None, None)
