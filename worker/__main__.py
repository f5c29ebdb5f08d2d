"""`python -m worker run`: load the model once, then pull jobs until SIGTERM.
`python -m worker serve`: the same behind the HTTP face (worker/http/), one model for both."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import click

from worker import clients, logs
from worker.batch import BatchRunner, Tables
from worker.engines import TFServingOptions, create_engine
from worker.gcs import GcsFetcher, authorized_http
from worker.models import ModelLocationError, locate_model
from worker.settings import HttpSettings, SettingsError, WorkerSettings
from worker.sink import BigQuerySink, CoalescingSink
from worker.subscriber import PullWorker
from worker.sysinfo import SystemSampler, machine_facts

_LOGGER = logging.getLogger("worker")


def build_runner(settings: WorkerSettings, io_pool: ThreadPoolExecutor, web_framework: str | None = None):
    """Everything a batch needs, with the model loaded and warmed: shared by pull and HTTP."""
    started = time.perf_counter()
    model = locate_model(settings.model_location, settings.model_cache_dir,
                         storage_client=lambda: clients.storage_client(settings.project))
    manifest = model.manifest
    _LOGGER.info("model %s/%s from %s (%s) in %.0f ms", manifest["name"], manifest["version"], model.source,
                 "downloaded and verified" if model.downloaded else "verified", (time.perf_counter() - started) * 1000)
    tfserving = TFServingOptions(url=settings.tfserving_url, protocol=settings.tfserving_protocol,
                                 model_name=settings.tfserving_model_name, timeout_s=settings.tfserving_timeout_s)
    engine = create_engine(settings.engine, settings.precision, model.path, manifest, tfserving=tfserving,
                           threads=settings.engine_threads)
    started = time.perf_counter()
    engine.load()
    engine.warmup()
    info = engine.describe()
    _LOGGER.info("model %s/%s loaded on %s %s (%s, %s) in %.0f ms", manifest["name"], manifest["version"],
                 info.name, info.version, info.device, info.precision, (time.perf_counter() - started) * 1000)
    return BatchRunner(
        engine=engine,
        manifest=manifest,
        fetcher=GcsFetcher(*authorized_http(pool_size=settings.download_threads), settings.download_timeout_s),
        sink=CoalescingSink(BigQuerySink(clients.bigquery_client(settings.project), settings.insert_timeout_s),
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


def build_puller(settings: WorkerSettings, runner: BatchRunner) -> PullWorker:
    """The streaming pull of WORKER_SUBSCRIPTION into runner (not started)."""
    return PullWorker(
        subscriber=clients.subscriber_client(),
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
        runner = build_runner(settings, io_pool)
    except (ModelLocationError, FileNotFoundError, ValueError) as exc:
        # A wrong model location or a model without the asked-for form: the operator's to fix.
        click.echo(f"worker: cannot load the model: {exc}", err=True)
        sys.exit(2)
    pull = build_puller(settings, runner)
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
    pull.stop(settings.shutdown_timeout_s)
    io_pool.shutdown(wait=False, cancel_futures=True)
    _LOGGER.info("processed %d jobs", pull.processed)


@cli.command()
@click.option("--log-level", envvar="WORKER_LOG_LEVEL", default="INFO", show_default=True)
def serve(log_level: str) -> None:
    """The HTTP face under gunicorn (health, /classify, Pub/Sub push, /metrics) on WORKER_HTTP_PORT,
    pulling from WORKER_SUBSCRIPTION in the same process unless WORKER_PULL=false."""
    logs.configure(log_level)
    try:
        WorkerSettings.from_env()
        HttpSettings.from_env()
    except SettingsError as exc:
        click.echo(f"worker: {exc}", err=True)
        sys.exit(2)
    from worker.http.server import run_gunicorn

    os.environ["WORKER_LOG_LEVEL"] = log_level  # the app is built in the gunicorn worker, from the environment
    sys.exit(run_gunicorn())


if __name__ == "__main__":
    cli()
