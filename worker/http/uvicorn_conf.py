"""uvicorn settings of the worker's HTTP face on FastAPI (WORKER_WEB_FRAMEWORK=fastapi), the
counterpart of gunicorn_conf.py. Used by `python -m worker serve` (worker/http/uvicorn_server.py).

workers = 1, and no master process. One process holds the one model, for the reasons gunicorn
runs one worker: OpenVINO and TensorFlow already use every core for one inference call, so a
second process would only hold a second copy of the model and fight the first for the cores.
uvicorn serves in the process `serve` runs in. Nothing is forked, so the model can load in a
thread of this process; the app's lifespan starts it, and /healthz answers during the load. When
the pull stream ends the process stops gracefully and exits 1, and the supervisor starts a fresh
one (under gunicorn the master forks a new worker instead). When a start-up step fails, it exits 3
like gunicorn's boot error.

Handlers run in threads, never on the event loop. The loop parses requests and writes answers.
Each endpoint awaits its handler (worker/http/endpoints.py) in anyio's thread pool. The handler
decodes, waits for the micro-batcher's engine call, writes to BigQuery and fetches certificates
there. The lifespan caps the pool at WORKER_HTTP_THREADS (8), the number of gunicorn's gthread
threads, so both frameworks run at most 8 handlers at a time. More requests wait as coroutines.
anyio's default of 40 threads would only make more threads wait on the one engine call.

loop = "uvloop", http = "httptools" (what `uvicorn[standard]` and FastAPI's own deployment docs
use). The loop and the parser are the only CPU work uvicorn adds to each request, and both run
in C. On 2 cores shared with the engine, every millisecond they save goes to inference. Both are
named explicitly and not left at "auto", because "auto" silently falls back to asyncio and the
pure-Python h11 when a package is missing, and the measured server would then change with the
image.

ws = "none": the face has no WebSocket endpoint.

lifespan = "on": the lifespan starts the model load and, at shutdown, stops the service. If the
lifespan fails, the server must not start.

limit_concurrency = 1000 connections and tasks (gunicorn's worker_connections default). Beyond
that, uvicorn answers 503 at once instead of queueing without bound; Pub/Sub delivers a 503 push
again.

limit_max_requests = None: the process is never recycled, because a recycle loads the model
again (gunicorn: max_requests = 0).

backlog = 2048, gunicorn's default too. timeout_keep_alive = WORKER_HTTP_KEEPALIVE_S (5 s),
gunicorn's keepalive.

Request bodies are not limited by a uvicorn setting. The adapter (asgi.py) counts the body as it
arrives and refuses more than WORKER_MAX_IMAGE_BYTES + 64 KiB with 413 too_many_bytes, at once
when Content-Length says so (Flask does the same through MAX_CONTENT_LENGTH). Multipart parts may
be as large as the body (Starlette's 1 MiB default would refuse images that Flask takes).

On SIGTERM, uvicorn stops accepting connections and gives open requests
`timeout_graceful_shutdown` to finish: 60% of WORKER_HTTP_GRACEFUL_TIMEOUT_S, 15 s of the default
25 s (a push waits there for its row). The lifespan's shutdown then stops pulling, nacks the queued
messages and finishes the batches in flight within the remaining 40% (10 s). That is at most 25 s
in all, under the container's 30 s stop timeout. It is the same service.stop that gunicorn's
worker_exit hook calls.

No access log (/metrics counts every request by endpoint and status). log_config = None, so
uvicorn's loggers write through the worker's JSON log handler (worker/logs.py).
"""

from __future__ import annotations

import os

from worker.settings import HttpSettings

SHUTDOWN_REQUESTS_SHARE = 0.6  # of WORKER_HTTP_GRACEFUL_TIMEOUT_S for open requests; the rest stops the service
LIMIT_CONCURRENCY = 1000


def requests_drain_s(http: HttpSettings) -> float:
    return http.graceful_timeout_s * SHUTDOWN_REQUESTS_SHARE


def service_stop_s(http: HttpSettings) -> float:
    """What the lifespan's shutdown gives service.stop (stop pulling, nack, finish batches)."""
    return max(1.0, http.graceful_timeout_s - requests_drain_s(http))


def config_kwargs(http: HttpSettings) -> dict:
    """uvicorn.Config(app, **config_kwargs(http))."""
    return {
        "host": http.host,
        "port": http.port,
        "workers": None,  # one process: this one
        "loop": "uvloop",
        "http": "httptools",
        "ws": "none",
        "lifespan": "on",
        "limit_concurrency": LIMIT_CONCURRENCY,
        "limit_max_requests": None,
        "backlog": 2048,
        "timeout_keep_alive": int(http.keepalive_s),
        "timeout_graceful_shutdown": requests_drain_s(http),
        "access_log": False,
        "log_config": None,
        "log_level": os.environ.get("WORKER_LOG_LEVEL", "info").lower(),
    }
