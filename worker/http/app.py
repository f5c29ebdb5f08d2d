"""The Flask app: GET /healthz, GET /readyz, POST /classify, POST /pubsub/push, GET /metrics.

`create_app` takes its collaborators (tests pass fakes); `create_app_from_env` wires the real
ones from the environment and is what gunicorn loads (worker/http/gunicorn_conf.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from worker.http.classify import RecordFacts, classify_row, new_event_key, status_for_rejection
from worker.http.metrics import Metrics
from worker.http.oidc import PushAuthError, PushTokenVerifier
from worker.http.push import PushEnvelopeError, PushOutcome, parse_push_envelope, push_delivery
from worker.http.service import PUSH_REFUSED, InferenceService, NoTables, NotReady
from worker.preprocess import ImageRejected

_LOGGER = logging.getLogger(__name__)
EXTENSION = "inference_service"  # app.extensions key: the gunicorn worker_exit hook stops the service
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_NAME_CHARS = 1024
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


@dataclass(frozen=True)
class AppOptions:
    max_image_bytes: int
    push_wait_s: float = 30.0
    push_verifier: PushTokenVerifier | None = None  # None: push requests are not authenticated


def create_app(service: InferenceService, metrics: Metrics, options: AppOptions) -> Flask:
    app = Flask("worker.http")
    app.config["MAX_CONTENT_LENGTH"] = options.max_image_bytes + MULTIPART_OVERHEAD_BYTES
    app.extensions[EXTENSION] = service
    service.add_batch_observer(metrics.observe_batch)
    service.add_classify_observer(metrics.observe_classify_batch)
    _register_errors(app)
    _register_request_metrics(app, metrics)

    @app.get("/healthz")
    def healthz():
        if service.failed:
            return jsonify(status="failed", checks=service.readiness()), 500
        return jsonify(status="alive")

    @app.get("/readyz")
    def readyz():
        ready, checks = _readiness(service, metrics)
        return jsonify(ready=ready, checks=checks), 200 if ready else 503

    @app.post("/classify")
    def classify():
        return _classify(service, metrics)

    @app.post("/pubsub/push")
    def pubsub_push():
        return _push(service, options)

    @app.get("/metrics")
    def metrics_text():
        _readiness(service, metrics)
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    return app


def _readiness(service: InferenceService, metrics: Metrics) -> tuple[bool, dict[str, str]]:
    checks = service.readiness()
    ready = all(value in ("ok", "disabled") for value in checks.values())
    metrics.ready.set(1 if ready else 0)
    if service.ready:
        metrics.set_model(service.model_facts())
    return ready, checks


def _error(status: int, reason: str, message: str, **extra):
    return jsonify(error=reason, message=message, **extra), status


def _register_errors(app: Flask) -> None:
    @app.errorhandler(NotReady)
    def not_ready(exc):
        response = _error(503, "not_ready", str(exc))
        response[0].headers["Retry-After"] = "5"
        return response

    @app.errorhandler(NoTables)
    def no_tables(exc):
        return _error(503, "no_tables", str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        reason = "too_many_bytes" if exc.code == 413 else (exc.name or "error").lower().replace(" ", "_")
        return _error(exc.code or 500, reason, exc.description or exc.name)


def _register_request_metrics(app: Flask, metrics: Metrics) -> None:
    @app.before_request
    def started():
        g.started = time.perf_counter()

    @app.after_request
    def finished(response):
        endpoint = request.url_rule.rule if request.url_rule else "other"
        metrics.observe_request(endpoint, request.method, response.status_code,
                                time.perf_counter() - g.get("started", time.perf_counter()))
        return response


class _BadRequest(ValueError):
    """The request itself is wrong (not the image): 400."""


def _flag(name: str) -> bool:
    raw = request.args.get(name, "").strip().lower()
    if raw in _TRUE + _FALSE:
        return raw in _TRUE
    raise _BadRequest(f"?{name}={raw!r}: use true or false")


def _image_from_request() -> tuple[bytes, str | None, str | None]:
    """(bytes, content type, file name) from a raw body or the multipart part "image" (or "file",
    or the only file part)."""
    if request.mimetype == "multipart/form-data":
        files = request.files
        part = files.get("image") or files.get("file") or (next(iter(files.values())) if len(files) == 1 else None)
        if part is None:
            raise _BadRequest("multipart body without an image: send the file as the part named \"image\"")
        return part.read(), part.mimetype or None, part.filename or None
    return request.get_data(cache=False), request.mimetype or None, None


def _classify(service: InferenceService, metrics: Metrics):
    received_monotonic, received_at = time.monotonic(), dt.datetime.now(dt.timezone.utc)
    try:
        record = _flag("record")
        data, content_type, filename = _image_from_request()
    except _BadRequest as exc:
        return _error(400, "bad_request", str(exc))
    except RequestEntityTooLarge:  # over the body limit: refused before reading it
        metrics.observe_rejection("too_many_bytes")
        raise
    if record:  # refused before the engine call when there is no table to write to
        service.require_tables("?record=true cannot write the row")
    try:
        result = service.classify(data, received_monotonic)
    except ImageRejected as exc:
        metrics.observe_rejection(exc.reason)
        return _error(status_for_rejection(exc.reason), exc.reason, str(exc))
    metrics.observe_classify(result.timings_ms())
    facts = service.model_facts()
    body = {"label": result.label, "score": result.score, "logit": result.logit, "threshold": result.threshold,
            **facts, "batch_size": result.batch_size, "timings_ms": result.timings_ms(), "recorded": False}
    if not record:
        return jsonify(body)
    return _record(service, result, facts, body, content_type, filename, received_at)


def _record(service: InferenceService, result, facts: dict, body: dict, content_type, filename, received_at):
    name = (request.args.get("name") or filename or "request-body")[:MAX_NAME_CHARS]
    record = RecordFacts(event_key=new_event_key(), object_name=name, content_type=content_type,
                         run_id=request.args.get("run_id") or None, web_framework=facts["web_framework"])
    row = classify_row(result, record, facts, service.machine_row, service.sample_system(), received_at,
                       dt.datetime.now(dt.timezone.utc))
    started = time.perf_counter()
    outcome = service.record(row)
    body["timings_ms"]["record"] = (time.perf_counter() - started) * 1000.0
    body["event_key"] = record.event_key
    if not outcome.ok:
        _LOGGER.warning("classify row %s not written: %s", record.event_key, outcome.failed)
        return jsonify(error="not_recorded", message=f"the row was not written: {outcome.failed.get(0)}",
                       **body), 503
    body["recorded"] = True
    return jsonify(body)


def _push(service: InferenceService, options: AppOptions):
    if options.push_verifier is not None:
        try:
            options.push_verifier.verify(request.headers.get("Authorization"))
        except PushAuthError as exc:
            _LOGGER.warning("push refused (%s): %s", exc.reason, exc)
            return _error(exc.status, exc.reason, str(exc))
    service.require_tables(PUSH_REFUSED)  # never ack a job whose row cannot be written
    try:
        message = parse_push_envelope(request.get_data(cache=False))
    except PushEnvelopeError as exc:
        return _error(400, "bad_envelope", str(exc))
    outcome = PushOutcome()
    future = service.push(push_delivery(message, outcome, dt.datetime.now(dt.timezone.utc), time.monotonic(),
                                        web_framework=service.options.web_framework or None))
    try:
        future.result(timeout=options.push_wait_s)
    except FutureTimeout:
        return _error(503, "timeout", f"no row within {options.push_wait_s:.0f} s; Pub/Sub will deliver it again")
    except Exception as exc:
        return _error(503, "batch_failed", f"the batch failed ({exc}); Pub/Sub will deliver it again")
    if outcome.wait(0) is True:
        return "", 204
    return _error(503, "retry", "the job was not written (transient failure); Pub/Sub will deliver it again")


def create_app_from_env() -> Flask:
    """gunicorn's entry point (in the worker process, after the fork): settings from the
    environment, the model loading in the background, pull started once it is warm."""
    import os

    from worker import logs
    from worker.http import wiring
    from worker.settings import HttpSettings, StartupError, WorkerSettings

    logs.configure(os.environ.get("WORKER_LOG_LEVEL", "INFO"))
    settings, http = WorkerSettings.from_env(), HttpSettings.from_env()
    try:
        service = wiring.build_service(settings, http)
    except StartupError as exc:  # e.g. credentials missing for the clients the settings need
        wiring.refuse_to_boot(exc)
    app = create_app(service, Metrics(), AppOptions(max_image_bytes=settings.max_image_bytes,
                                                    push_wait_s=http.push_wait_s,
                                                    push_verifier=wiring.push_verifier(http)))
    service.start()
    return app
