"""The real collaborators of the HTTP face, from the environment (tests pass fakes to create_app)."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from worker.http.endpoints import AppOptions
from worker.http.health import CachedProbe, bigquery_table_probe
from worker.http.oidc import PushTokenVerifier
from worker.http.service import InferenceService, LoadedModel, ServiceOptions
from worker.settings import WEB_FRAMEWORKS, HttpSettings, StartupError, WorkerSettings
from worker.sink import BigQuerySink
from worker.sysinfo import SystemSampler, machine_facts

if TYPE_CHECKING:
    from worker.__main__ import CloudClients

_LOGGER = logging.getLogger(__name__)
# gunicorn's exit code for "the worker cannot boot" (its master stops too); `serve` under uvicorn exits with it too.
WORKER_BOOT_ERROR = 3


def web_framework(name: str = "flask") -> str:
    """Recorded in rows served over HTTP, as the seed recorded "flask"/"fastapi": the framework and
    its server with their versions, e.g. "flask 3.1.3/gunicorn 27.0.1"."""
    server = WEB_FRAMEWORKS[name]
    return f"{name} {importlib.metadata.version(name)}/{server} {importlib.metadata.version(server)}"


def load_model(settings: WorkerSettings, web_framework_of_rows: str | None,
               cloud: CloudClients | None = None) -> LoadedModel:
    from worker.__main__ import build_runner, start_watcher

    io_pool = ThreadPoolExecutor(max_workers=settings.download_threads, thread_name_prefix="io")
    runner = build_runner(settings, io_pool, web_framework=web_framework_of_rows, cloud=cloud)
    start_watcher(settings, runner)  # a daemon thread: newer versions of WORKER_MODEL_URI, between batches
    return LoadedModel(runner)


def from_env(on_pull_ended: Callable[[], None] | None = None) -> tuple[InferenceService, AppOptions]:
    """In the server process, for either framework: logs, settings, the service (not started) and
    the endpoints' options. A start-up step that fails exits with the boot-error code."""
    from worker import logs

    logs.configure(os.environ.get("WORKER_LOG_LEVEL", "INFO"))
    settings, http = WorkerSettings.from_env(), HttpSettings.from_env()
    try:
        service = build_service(settings, http, on_pull_ended=on_pull_ended)
    except StartupError as exc:  # e.g. credentials missing for the clients the settings need
        refuse_to_boot(exc)
    options = AppOptions(max_image_bytes=settings.max_image_bytes, push_wait_s=http.push_wait_s,
                         push_verifier=push_verifier(http))
    return service, options


def build_service(settings: WorkerSettings, http: HttpSettings,
                  on_pull_ended: Callable[[], None] | None = None) -> InferenceService:
    """The service with the clients the settings need, made now (StartupError when credentials are
    missing); the model loads later, in the background (service.start()). on_pull_ended: what
    ends this server process when the pull stream ends (default: SIGTERM to itself)."""
    from worker.__main__ import build_puller, connect

    framework = web_framework(http.web_framework)
    cloud = connect(settings)
    if cloud.bigquery is None:
        _LOGGER.warning("no tables configured (WORKER_RESULTS_TABLE, WORKER_ERRORS_TABLE): /classify answers "
                        "without writing rows; /classify?record=true and /pubsub/push are refused with 503 "
                        "no_tables (Pub/Sub keeps pushed jobs)")
    # Pulled rows keep web_framework NULL (sql/queries: "pull (none)"); pushed rows name the server
    # on each delivery, so one process doing both records each row's own path.
    return InferenceService(
        lambda: load_model(settings, None, cloud),
        ServiceOptions(limits=settings.decode_limits, results_table=settings.results_table,
                       batch_size=settings.batch_size, batch_wait_s=settings.batch_wait_ms / 1000.0,
                       pipelines=settings.pipelines, web_framework=framework),
        record_sink=BigQuerySink(cloud.bigquery, settings.insert_timeout_s) if cloud.bigquery is not None else None,
        sink_check=(CachedProbe(bigquery_table_probe(cloud.bigquery, settings.results_table)).check
                    if cloud.bigquery is not None else None),
        machine_row=machine_facts().as_row(),
        sample_system=SystemSampler().sample,
        make_puller=(lambda runner: build_puller(settings, runner, cloud.subscriber)) if settings.pull else None,
        on_ready=lambda: _write_ready_file(settings),
        on_load_failed=_stop_the_server,
        on_pull_ended=on_pull_ended or _restart_this_worker,
    )


def push_verifier(http: HttpSettings) -> PushTokenVerifier | None:
    if not http.push_audience:
        return None
    return PushTokenVerifier(http.push_audience, http.push_service_account, certs_url=http.push_certs_url)


def _write_ready_file(settings: WorkerSettings) -> None:
    if settings.ready_file:
        settings.ready_file.write_text(str(time.time()))


def refuse_to_boot(exc: Exception) -> None:
    """Building the app (in the gunicorn worker, or before uvicorn starts): exit with gunicorn's
    boot-error code, so its master stops instead of forking a new worker that fails the same way;
    the supervisor restarts us."""
    _LOGGER.critical("exiting: cannot start: %s", exc)
    raise SystemExit(WORKER_BOOT_ERROR)


def _stop_the_server(exc: Exception) -> None:
    # The model-load thread failed (the service has logged why): nothing can be served without a
    # model, so the same boot-error exit, from this thread.
    _LOGGER.critical("exiting: %s failed (the error above says why); the server stops (a gunicorn master too)",
                     getattr(exc, "step", "start-up"))
    os._exit(WORKER_BOOT_ERROR)


def _restart_this_worker() -> None:
    # Graceful stop of this gunicorn worker; the master forks a fresh one (model and stream anew).
    # (uvicorn passes its own: the same signal, and the process exits 1 for its supervisor.)
    os.kill(os.getpid(), signal.SIGTERM)
