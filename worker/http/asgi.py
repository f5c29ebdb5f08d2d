"""The FastAPI app: the endpoints of worker/http/endpoints.py, adapted to ASGI requests and responses.

Each endpoint awaits its handler in the thread pool, whose size the lifespan sets to
WORKER_HTTP_THREADS. The event loop only parses requests and writes answers; the decode, the
engine call through the micro-batcher, BigQuery and the OIDC certificates run in threads, as
under gunicorn. A handler that asks for the body gets it from the loop (anyio.from_thread), read
with the body limit applied as it arrives.

`create_app` takes its collaborators (tests pass fakes); `create_app_from_env` wires the real ones
from the environment with a lifespan that starts the model load and, at shutdown, stops pulling;
uvicorn_server.py runs it (`uvicorn --factory worker.http.asgi:create_app_from_env` would too,
without uvicorn_conf.py's settings).
"""

from __future__ import annotations

import contextlib
import time
from typing import AsyncContextManager, Callable

import anyio
import anyio.from_thread
import anyio.to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from worker.http import endpoints
from worker.http.endpoints import AppOptions, BodyTooLarge, HttpFace, Reply, Upload, mimetype_of
from worker.http.metrics import Metrics
from worker.http.service import InferenceService

# Set in the ASGI scope by the endpoint that takes a request: the request metrics' endpoint label.
ENDPOINT_KEY = "worker.endpoint"


def create_app(service: InferenceService, metrics: Metrics, options: AppOptions, *, threads: int = 8,
               lifespan: Callable[[FastAPI], AsyncContextManager[None]] | None = None) -> FastAPI:
    """threads: handlers running at once (WORKER_HTTP_THREADS); lifespan: run inside the app's own."""
    face = HttpFace(service, metrics, options)
    # The face is its five endpoints: no /docs or /openapi.json, and no redirect from a trailing slash.
    app = FastAPI(title="inference worker", docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False, lifespan=_lifespan(threads, lifespan))
    app.state.service = service
    for route in face.routes:
        app.add_api_route(route.path, _endpoint(face, route), methods=[route.method], name=route.name,
                          include_in_schema=False)

    async def http_error(_request: Request, exc: HTTPException) -> Response:
        return _response(face.http_error(exc.status_code, exc.detail, exc.headers))

    async def server_error(_request: Request, _exc: Exception) -> Response:
        return _response(face.http_error(500))

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.add_middleware(_RequestMetrics, face=face)
    return app


def _lifespan(threads: int, inner: Callable[[FastAPI], AsyncContextManager[None]] | None):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # At most `threads` handlers at a time, as gunicorn's gthread worker runs them; the default
        # limiter (40 threads) is per event loop, so it is set here, on the loop that serves.
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        if inner is None:
            yield
            return
        async with inner(app):
            yield

    return lifespan


def _endpoint(face: HttpFace, route: endpoints.Route):
    async def endpoint(request: Request) -> Response:
        request.scope[ENDPOINT_KEY] = route.path
        reply = await run_in_threadpool(face.handle, route, _neutral(request, face.max_body_bytes))
        return _response(reply)

    endpoint.__name__ = route.name
    return endpoint


def _neutral(request: Request, limit: int) -> endpoints.Request:
    def read_body() -> bytes:  # in the handler's thread: the body is read on the loop
        return anyio.from_thread.run(_read_body, request, limit)

    def read_files() -> dict[str, Upload]:
        return anyio.from_thread.run(_read_files, request, limit)

    return endpoints.Request(method=request.method, query=request.query_params, headers=request.headers,
                             mimetype=mimetype_of(request.headers.get("content-type")), read_body=read_body,
                             read_files=read_files)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused before reading it
        raise BodyTooLarge()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked, or longer than it said
            raise BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_files(request: Request, limit: int) -> dict[str, Upload]:
    """The file parts of a multipart body (the first of each name), as Werkzeug's request.files."""
    body = await _read_body(request, limit)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    # A damaged body raises Starlette's HTTPException(400): http_error answers it.
    form = await Request(request.scope, replay).form(max_part_size=limit)
    try:
        files: dict[str, Upload] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile) and name not in files:
                files[name] = Upload(await value.read(), mimetype_of(value.content_type) or None,
                                     value.filename or None)
        return files
    finally:
        await form.close()


def _response(reply: Reply) -> Response:
    return Response(reply.body, status_code=reply.status, headers=dict(reply.headers), media_type=reply.content_type)


class _RequestMetrics:
    """Every request by endpoint ("other" when no route took it), method and status, with its time,
    as the Flask app's before/after_request hooks count them."""

    def __init__(self, app, face: HttpFace):
        self.app, self.face = app, face

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, answered = time.perf_counter(), False

        def observe(status: int) -> None:
            self.face.observe_request(scope.get(ENDPOINT_KEY, "other"), scope["method"], status,
                                      time.perf_counter() - started)

        async def send_and_note(message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":  # counted before the client can see it
                answered = True
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if not answered:  # an exception the server answers with 500 outside this middleware
                observe(500)


def create_app_from_env(on_pull_ended: Callable[[], None] | None = None) -> FastAPI:
    """The app with the real service from the environment. Its lifespan starts the model load (in
    a thread: /healthz answers meanwhile) and, once uvicorn has drained the requests, stops
    pulling, nacks queued messages and finishes the batches in flight (uvicorn_conf.py)."""
    from worker.http import uvicorn_conf, wiring
    from worker.settings import HttpSettings

    service, options = wiring.from_env(on_pull_ended)
    http = HttpSettings.from_env()

    @contextlib.asynccontextmanager
    async def serving(_app: FastAPI):
        service.start()
        yield
        # Its own thread: the pool's may all be held by handlers still waiting for their batch.
        await anyio.to_thread.run_sync(service.stop, uvicorn_conf.service_stop_s(http),
                                       limiter=anyio.CapacityLimiter(1))

    return create_app(service, Metrics(), options, threads=http.threads, lifespan=serving)
