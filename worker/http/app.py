"""The Flask app: the endpoints of worker/http/endpoints.py, adapted to Flask requests and responses.

`create_app` takes its collaborators (tests pass fakes); `create_app_from_env` wires the real
ones from the environment and is what gunicorn loads (worker/http/gunicorn_conf.py).
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from worker.http import endpoints
from worker.http.endpoints import AppOptions, BodyTooLarge, HttpFace, Reply, Upload
from worker.http.metrics import Metrics
from worker.http.service import InferenceService

__all__ = ["AppOptions", "EXTENSION", "create_app", "create_app_from_env"]

EXTENSION = "inference_service"  # app.extensions key: the gunicorn worker_exit hook stops the service


def create_app(service: InferenceService, metrics: Metrics, options: AppOptions) -> Flask:
    face = HttpFace(service, metrics, options)
    app = Flask("worker.http")
    app.config["MAX_CONTENT_LENGTH"] = face.max_body_bytes
    app.extensions[EXTENSION] = service
    for route in face.routes:
        app.add_url_rule(route.path, endpoint=route.name, view_func=_view(face, route), methods=[route.method])

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _response(face.http_error(exc.code or 500, exc.description, dict(exc.get_headers())))

    @app.before_request
    def started():
        g.started = time.perf_counter()

    @app.after_request
    def finished(response):
        endpoint = request.url_rule.rule if request.url_rule else "other"
        face.observe_request(endpoint, request.method, response.status_code,
                             time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    return app


def _view(face: HttpFace, route: endpoints.Route):
    def view():
        return _response(face.handle(route, _request()))

    return view


def _request() -> endpoints.Request:
    return endpoints.Request(method=request.method, query=request.args, headers=request.headers,
                             mimetype=request.mimetype, read_body=_read_body, read_files=_read_files)


def _read_body() -> bytes:
    try:
        return request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise BodyTooLarge() from None


def _read_files() -> dict[str, Upload]:
    try:
        return {name: Upload(part.read(), part.mimetype or None, part.filename or None)
                for name, part in request.files.items()}
    except RequestEntityTooLarge:
        raise BodyTooLarge() from None


def _response(reply: Reply) -> Response:
    return Response(reply.body, status=reply.status, headers=dict(reply.headers), content_type=reply.content_type)


def create_app_from_env() -> Flask:
    """gunicorn's entry point (in the worker process, after the fork): settings from the
    environment, the model loading in the background, pull started once it is warm."""
    from worker.http import wiring

    service, options = wiring.from_env()
    app = create_app(service, Metrics(), options)
    service.start()
    return app
