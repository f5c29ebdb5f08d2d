"""The real collaborators of the HTTP face, from the environment (tests pass fakes to create_app)."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from worker import clients
from worker.http.health import CachedProbe, bigquery_table_probe
from worker.http.oidc import PushTokenVerifier
from worker.http.service import InferenceService, LoadedModel, ServiceOptions
from worker.settings import HttpSettings, WorkerSettings
from worker.sink import BigQuerySink
from worker.sysinfo import SystemSampler, machine_facts

_LOGGER = logging.getLogger(__name__)
WORKER_BOOT_ERROR = 3  # gunicorn's exit code for "the worker cannot boot": the master stops too


def web_framework() -> str:
    """Recorded in rows served over HTTP, as the seed recorded "flask"/"fastapi"."""
    return f"flask {importlib.metadata.version('flask')}/gunicorn {importlib.metadata.version('gunicorn')}"


def load_model(settings: WorkerSettings, web_framework_of_rows: str | None) -> LoadedModel:
    from worker.__main__ import build_runner

    io_pool = ThreadPoolExecutor(max_workers=settings.download_threads, thread_name_prefix="io")
    runner = build_runner(settings, io_pool, web_framework=web_framework_of_rows)
    return LoadedModel(runner, runner.class_names, runner.threshold)


def build_service(settings: WorkerSettings, http: HttpSettings) -> InferenceService:
    from worker.__main__ import build_puller

    framework = web_framework()
    bigquery = clients.bigquery_client(settings.project)
    # Pulled rows keep web_framework NULL (sql/queries: "pull (none)"); pushed rows name the server
    # on each delivery, so one process doing both records each row's own path.
    return InferenceService(
        lambda: load_model(settings, None),
        ServiceOptions(limits=settings.decode_limits, results_table=settings.results_table,
                       batch_size=settings.batch_size, batch_wait_s=settings.batch_wait_ms / 1000.0,
                       pipelines=settings.pipelines, web_framework=framework),
        record_sink=BigQuerySink(bigquery, settings.insert_timeout_s),
        sink_check=CachedProbe(bigquery_table_probe(bigquery, settings.results_table)).check,
        machine_row=machine_facts().as_row(),
        sample_system=SystemSampler().sample,
        make_puller=(lambda runner: build_puller(settings, runner)) if settings.pull else None,
        on_ready=lambda: _write_ready_file(settings),
        on_load_failed=_stop_the_server,
        on_pull_ended=_restart_this_worker,
    )


def push_verifier(http: HttpSettings) -> PushTokenVerifier | None:
    if not http.push_audience:
        return None
    return PushTokenVerifier(http.push_audience, http.push_service_account, certs_url=http.push_certs_url)


def _write_ready_file(settings: WorkerSettings) -> None:
    if settings.ready_file:
        settings.ready_file.write_text(str(time.time()))


def _stop_the_server(exc: Exception) -> None:
    # Without a model nothing can be served: exit with gunicorn's boot-error code, so the master
    # stops instead of forking a new worker that fails the same way; the supervisor restarts us.
    _LOGGER.critical("exiting: the model did not load: %s", exc)
    os._exit(WORKER_BOOT_ERROR)


def _restart_this_worker() -> None:
    # Graceful stop of this gunicorn worker; the master forks a fresh one (model and stream anew).
    os.kill(os.getpid(), signal.SIGTERM)
