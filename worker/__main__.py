"""`python -m worker run`: load the model once, then pull jobs until SIGTERM.
`python -m worker serve`: the same behind the HTTP face (worker/http/), one model for both."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import click

from worker import clients, logs
from worker.batch import BatchRunner, Tables
from worker.engines import TFServingOptions, create_engine
from worker.gcs import GcsFetcher, authorized_http
from worker.jobs import Job
from worker.models import locate_model
from worker.settings import HttpSettings, SettingsError, StartupError, WorkerSettings
from worker.sink import BigQuerySink, CoalescingSink, InsertOutcome
from worker.subscriber import PullWorker
from worker.sysinfo import SystemSampler, machine_facts

_LOGGER = logging.getLogger("worker")


NO_TABLES = ("no tables configured (WORKER_RESULTS_TABLE, WORKER_ERRORS_TABLE): jobs cannot be recorded, "
             "so they are not acked")


@dataclass(frozen=True)
class CloudClients:
    """The Google clients one configuration needs, made at start; None where nothing needs one."""

    fetcher: GcsFetcher | None = None  # job downloads (pull and push): with tables
    bigquery: Any = None  # result, error and batch rows: with tables
    subscriber: Any = None  # the streaming pull: WORKER_PULL=true


def connect(settings: WorkerSettings) -> CloudClients:
    """The clients the settings need and no other. `serve` with WORKER_PULL=false and no tables
    makes none, so it runs without credentials or emulators. Raises StartupError naming the cause."""
    if not settings.writes_rows:
        return CloudClients()
    services, emulators = ["BigQuery", "Cloud Storage"], [clients.BIGQUERY_EMULATOR, clients.STORAGE_EMULATOR]
    if settings.pull:
        services.append("Pub/Sub")
        emulators.append(clients.PUBSUB_EMULATOR)
    why = (f"with the tables set the worker uses {', '.join(services)}; on the local emulators set "
           f"{', '.join(emulators)}; to try the model alone, run `serve` with WORKER_PULL=false and neither table set")
    try:
        return CloudClients(
            fetcher=GcsFetcher(*authorized_http(pool_size=settings.download_threads), settings.download_timeout_s),
            bigquery=clients.bigquery_client(settings.project),
            subscriber=clients.subscriber_client() if settings.pull else None,
        )
    except clients.CredentialsMissing as exc:
        raise StartupError("Google clients", f"{exc} ({why})") from exc
    except Exception as exc:
        raise StartupError("Google clients", f"{type(exc).__name__}: {exc} ({why})") from exc


class _NoTables:
    """Fetcher and sink of a runner without tables. `serve` refuses pushes and recording before a
    job gets here; one that still did is neither downloaded nor written, so it is nacked, never acked."""

    def fetch(self, job: Job) -> bytes:
        raise RuntimeError(NO_TABLES)

    def insert(self, table: str, rows: list[dict]) -> InsertOutcome:
        return InsertOutcome({index: NO_TABLES for index in range(len(rows))})


def build_runner(settings: WorkerSettings, io_pool: ThreadPoolExecutor, web_framework: str | None = None,
                 cloud: CloudClients | None = None) -> BatchRunner:
    """Everything a batch needs, with the model loaded and warmed: shared by pull and HTTP. A step
    that fails raises StartupError naming it: Google clients, model location, model load."""
    cloud = connect(settings) if cloud is None else cloud
    started = time.perf_counter()
    try:
        model = locate_model(settings.model_location, settings.model_cache_dir,
                             storage_client=lambda: clients.storage_client(settings.project))
    except Exception as exc:
        setting = "WORKER_MODEL_URI" if settings.model_uri else "WORKER_MODEL_DIR"
        raise StartupError("model location", f"{setting}={settings.model_location}: {exc}") from exc
    manifest = model.manifest
    _LOGGER.info("model %s/%s from %s (%s) in %.0f ms", manifest["name"], manifest["version"], model.source,
                 "downloaded and verified" if model.downloaded else "verified", (time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    try:
        engine = load_engine(settings, model.path, manifest)
        info = engine.describe()
    except Exception as exc:
        raise StartupError("model load", f"{manifest['name']}/{manifest['version']} with WORKER_ENGINE="
                                         f"{settings.engine}, WORKER_PRECISION={settings.precision}: "
                                         f"{type(exc).__name__}: {exc}") from exc
    _LOGGER.info("model %s/%s loaded on %s %s (%s, %s) in %.0f ms", manifest["name"], manifest["version"],
                 info.name, info.version, info.device, info.precision, (time.perf_counter() - started) * 1000)
    return BatchRunner(
        engine=engine,
        manifest=manifest,
        fetcher=cloud.fetcher or _NoTables(),
        sink=_NoTables() if cloud.bigquery is None else CoalescingSink(
            BigQuerySink(cloud.bigquery, settings.insert_timeout_s),
            max_rows=settings.sink_max_rows, linger_s=settings.sink_linger_ms / 1000.0,
            # Batch rows are diagnostics nobody waits on: gather a second's worth.
            linger_by_table={settings.batches_table: 1.0} if settings.batches_table else None),
        tables=Tables(results=settings.results_table, errors=settings.errors_table,
                      batches=settings.batches_table or None),
        limits=settings.decode_limits,
        machine_row=machine_facts().as_row(),
        sample_system=SystemSampler().sample,
        io_pool=io_pool,
        web_framework=web_framework,
        max_delivery_attempts=settings.max_delivery_attempts,
    )


def load_engine(settings: WorkerSettings, path, manifest: dict, warmup_lock=None):
    """The engine of one model version, loaded and warmed (under warmup_lock when given: a rollout
    warms the next version while the current one serves, and the lock keeps them from sharing the
    cores in one call)."""
    tfserving = TFServingOptions(url=settings.tfserving_url, protocol=settings.tfserving_protocol,
                                 model_name=settings.tfserving_model_name, timeout_s=settings.tfserving_timeout_s)
    engine = create_engine(settings.engine, settings.precision, path, manifest, tfserving=tfserving,
                           threads=settings.engine_threads)
    engine.load()
    with warmup_lock or contextlib.nullcontext():
        engine.warmup()
    return engine


def start_watcher(settings: WorkerSettings, runner: BatchRunner):
    """Roll newer versions of WORKER_MODEL_URI into runner every WORKER_MODEL_POLL_S (worker/rollout.py);
    None when the location is one version or polling is off."""
    import functools

    from worker.rollout import start_rollout

    storage = functools.cache(lambda: clients.storage_client(settings.project))
    return start_rollout(
        runner, location=settings.model_location, poll_s=settings.model_poll_s, cache_dir=settings.model_cache_dir,
        storage_client=storage,
        load_engine=lambda path, manifest: load_engine(settings, path, manifest, warmup_lock=runner.engine_lock))


def build_puller(settings: WorkerSettings, runner: BatchRunner, subscriber: Any = None) -> PullWorker:
    """The streaming pull of WORKER_SUBSCRIPTION into runner (not started)."""
    return PullWorker(
        subscriber=subscriber if subscriber is not None else clients.subscriber_client(),
        subscription_path=settings.subscription_path,
        runner=runner,
        batch_size=settings.batch_size,
        batch_wait_ms=settings.batch_wait_ms,
        max_outstanding_messages=settings.max_outstanding_messages,
        pipelines=settings.pipelines,
    )


@click.group()
def cli() -> None:
    """Image-inference worker."""


@cli.command()
@click.option("--log-level", envvar="WORKER_LOG_LEVEL", default="INFO", show_default=True)
def run(log_level: str) -> None:
    """Pull jobs from the subscription in WORKER_SUBSCRIPTION until SIGTERM or SIGINT."""
    logs.configure(log_level)
    try:
        settings = WorkerSettings.from_env()
    except SettingsError as exc:
        click.echo(f"worker: {exc}", err=True)
        sys.exit(2)
    if not settings.pull:
        click.echo("worker: WORKER_PULL=false: `run` only pulls; `serve` takes push deliveries", err=True)
        sys.exit(2)

    io_pool = ThreadPoolExecutor(max_workers=settings.download_threads, thread_name_prefix="io")
    try:
        # Clients first: missing credentials stop the start before a model load of seconds.
        cloud = connect(settings)
        runner = build_runner(settings, io_pool, cloud=cloud)
    except StartupError as exc:  # the operator's to fix: the message names the step and the setting
        click.echo(f"worker: cannot start: {exc}", err=True)
        sys.exit(2)
    pull = build_puller(settings, runner, cloud.subscriber)
    watcher = start_watcher(settings, runner)
    stop_requested = threading.Event()

    def request_stop(signum, _frame):
        _LOGGER.info("signal %d: stopping", signum)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    pull.start()
    if settings.ready_file:
        settings.ready_file.write_text(str(time.time()))
    while not stop_requested.wait(0.5):
        if not pull.healthy:
            _LOGGER.error("the pull stream ended; exiting so the supervisor restarts the worker")
            pull.stop(settings.shutdown_timeout_s)
            try:
                pull.wait()
            except Exception as exc:
                _LOGGER.error("stream error: %s", exc)
            sys.exit(1)
    if watcher is not None:
        watcher.stop()
    pull.stop(settings.shutdown_timeout_s)
    io_pool.shutdown(wait=False, cancel_futures=True)
    _LOGGER.info("processed %d jobs", pull.processed)


@cli.command()
@click.option("--log-level", envvar="WORKER_LOG_LEVEL", default="INFO", show_default=True)
def serve(log_level: str) -> None:
    """The HTTP face (health, /classify, Pub/Sub push, /metrics) on WORKER_HTTP_PORT: Flask under
    gunicorn, or FastAPI under uvicorn with WORKER_WEB_FRAMEWORK=fastapi. Pulls from
    WORKER_SUBSCRIPTION in the same process unless WORKER_PULL=false. With WORKER_PULL=false and no
    tables it needs no cloud: /classify only, no Google client."""
    logs.configure(log_level)
    try:
        WorkerSettings.from_env()
        http = HttpSettings.from_env()
    except SettingsError as exc:
        click.echo(f"worker: {exc}", err=True)
        sys.exit(2)
    os.environ["WORKER_LOG_LEVEL"] = log_level  # the app is built from the environment (in the gunicorn worker)
    if http.web_framework == "fastapi":
        from worker.http.uvicorn_server import run_uvicorn

        sys.exit(run_uvicorn())
    from worker.http.server import run_gunicorn

    sys.exit(run_gunicorn())


@cli.command()
@click.option("--bucket", envvar="RECONCILE_BUCKET", show_envvar=True, help="upload bucket (required)")
@click.option("--prefix", envvar="RECONCILE_PREFIX", show_envvar=True, default="",
              help="upload prefix, as the function's UPLOAD_PREFIX")
@click.option("--since", envvar="RECONCILE_SINCE", show_envvar=True, default="24h", show_default=True,
              help="window start: ISO time, or a duration before now (90m, 24h, 2d)")
@click.option("--until", envvar="RECONCILE_UNTIL", show_envvar=True, default=None,
              help="window end: ISO time or duration (default now)")
@click.option("--min-age", envvar="RECONCILE_MIN_AGE", show_envvar=True, default="5m", show_default=True,
              help="skip uploads younger than this: their events may still be in flight")
@click.option("--results-table", envvar="WORKER_RESULTS_TABLE", show_envvar=True, help="project.dataset.table")
@click.option("--errors-table", envvar="WORKER_ERRORS_TABLE", show_envvar=True, help="project.dataset.table")
@click.option("--jobs-topic", envvar="JOBS_TOPIC", show_envvar=True,
              help="projects/P/topics/T, or a short name with GOOGLE_CLOUD_PROJECT (needed by --republish)")
@click.option("--project", envvar="GOOGLE_CLOUD_PROJECT", show_envvar=True,
              help="project of the clients (default: the results table's)")
@click.option("--republish/--dry-run", envvar="RECONCILE_REPUBLISH", show_envvar=True, default=False,
              show_default=True, help="publish the jobs of uploads without a row (default: only report them)")
@click.option("--json", "json_output", is_flag=True, help="JSON lines on stdout instead of text")
@click.option("--progress/--no-progress", default=None, help="progress on stderr (default: when it is a terminal)")
@click.option("--log-level", envvar="WORKER_LOG_LEVEL", default="INFO", show_default=True)
def reconcile(json_output: bool, progress: bool | None, log_level: str, **options) -> None:
    """Find uploads without a results or errors row (and with --republish, publish their jobs again).
    Exit code 0 whether or not some are missing; 1 when a resource fails; 2 on bad settings."""
    import datetime as dt

    from worker import reconcile as reconciler

    logs.configure(log_level)
    try:
        settings = reconciler.ReconcileSettings.from_options(**options, now=dt.datetime.now(dt.timezone.utc))
    except SettingsError as exc:
        click.echo(f"reconcile: {exc}", err=True)
        sys.exit(2)
    sys.exit(reconciler.main(settings, json_output=json_output, progress=progress))


if __name__ == "__main__":
    cli()
