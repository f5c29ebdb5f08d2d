"""Turn a batch of job deliveries into result or error rows, then ack or nack each delivery.

The runner owns timing and failure policy for every engine alike. Collaborators (fetcher, engine,
sink) are passed in, so unit tests use in-memory fakes and system tests the real servers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from worker.engines.base import Engine
from worker.jobs import Job, MalformedJob, parse_job, partial_identity
from modelspec.preprocess import DecodeLimits, ImageRejected, preprocess_image
from modelspec.outputs import Prediction, predictions
from modelspec.spec import ModelSpec, spec_from_manifest

_LOGGER = logging.getLogger(__name__)


class PermanentError(Exception):
    """Retrying cannot help: the upload gets an error row and its message is acked."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Fetcher(Protocol):
    def fetch(self, job: Job) -> bytes:
        """The object's bytes at the job's generation. PermanentError if it is gone."""


class Sink(Protocol):
    def insert(self, table: str, rows: list[dict]): ...


@dataclass
class Delivery:
    """One job message as received; ack/nack come from the transport (pull or push)."""

    data: bytes
    message_id: str
    delivery_attempt: int | None
    received_at: dt.datetime
    received_monotonic: float
    ack: Callable[[], None]
    nack: Callable[[], None]
    web_framework: str | None = None  # the HTTP server a push came through; None for pull


@dataclass
class BatchReport:
    """What one batch came to; observers (metrics, logs) read it after every batch."""

    results: int = 0
    errors: int = 0
    retried: int = 0
    duplicates: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    batch_id: str = ""
    images: int = 0  # images that reached the engine
    inference_ms: float = 0.0  # the one engine call, wall clock
    sink_ms: float = 0.0  # the results insert, wall clock
    result_rows: list[dict] = field(default_factory=list)  # as written
    error_rows: list[dict] = field(default_factory=list)  # as written


class RecentKeys:
    """Event keys this process wrote lately: a redelivered job is acked without a second row.

    BigQuery's insertId de-duplication is best effort (about a minute); this catches later
    redeliveries that reach the same worker, and the *_dedup views catch the rest.
    """

    def __init__(self, capacity: int = 200_000):
        self._capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            while len(self._keys) > self._capacity:
                self._keys.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._keys


@dataclass(frozen=True)
class Tables:
    results: str
    errors: str
    batches: str | None = None  # one row per batch: sink time and batch facts (None: not written)


@dataclass
class _Item:
    delivery: Delivery
    job: Job | None = None
    pixels: np.ndarray | None = None
    download_ms: float | None = None
    preprocess_ms: float | None = None
    error: PermanentError | None = None
    transient: str | None = None
    copies: list[Delivery] = field(default_factory=list)  # same event key in this batch

    def settle(self, acked: bool) -> None:
        for delivery in [self.delivery, *self.copies]:
            (delivery.ack if acked else delivery.nack)()


def ms_between(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds() * 1000.0


class ServedModel:
    """One loaded and warmed model version as the runner serves it: the engine with the facts every
    row records. A batch takes the runner's current one at its start and keeps it to its end, so a
    switch of version (worker/rollout.py) happens between batches and every row names the version
    that served it."""

    def __init__(self, engine: Engine, manifest: dict, source: str = ""):
        self.engine = engine
        self.info = engine.describe()
        self.manifest = manifest
        self.name = str(manifest["name"])
        self.version = str(manifest["version"])
        self.spec = spec_from_manifest(manifest)
        self.source = source  # where it came from (a local path or gs:// URI), for the logs
        self.cold = True  # until its first batch
        self.in_flight = 0  # batches holding it (runner's lock)
        self.retired = False  # replaced: freed once in_flight is 0

    def free(self) -> None:
        """Drop the engine (and close it when it can be closed): the runtime releases the model's
        memory once nothing refers to it any more."""
        close = getattr(self.engine, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                _LOGGER.exception("closing the engine of %s/%s failed", self.name, self.version)
        self.engine = None


class BatchRunner:
    def __init__(
        self,
        *,
        engine: Engine,
        manifest: dict,
        fetcher: Fetcher,
        sink: Sink,
        tables: Tables,
        limits: DecodeLimits,
        machine_row: dict,
        sample_system: Callable[[], dict],
        io_pool: ThreadPoolExecutor,
        web_framework: str | None = None,
        max_delivery_attempts: int = 0,
        recent_keys: RecentKeys | None = None,
        observers: list[Callable[[BatchReport], None]] | None = None,
    ):
        self._model = ServedModel(engine, manifest)
        self._next: ServedModel | None = None  # offered by the rollout watcher, taken at the next batch
        self._model_lock = threading.Lock()
        self._swap_listeners: list[Callable[[ServedModel, ServedModel], None]] = []
        self._fetcher = fetcher
        self._sink = sink
        self._tables = tables
        self._limits = limits
        self._machine_row = machine_row
        self._sample_system = sample_system
        self._pool = io_pool
        self._web_framework = web_framework
        self._max_delivery_attempts = max_delivery_attempts
        self._recent = recent_keys if recent_keys is not None else RecentKeys()
        self._observers = list(observers or [])
        # In-process engines already spread one call over every core; two calls at once only
        # fight over them and inflate each other's timings. A remote engine may overlap calls.
        self._engine_lock = threading.Lock() if getattr(engine, "serialize_calls", True) else None

    def add_observer(self, observer: Callable[[BatchReport], None]) -> None:
        self._observers.append(observer)

    @property
    def engine_info(self):
        return self._model.info

    @property
    def engine(self) -> Engine:
        """The current model's engine, its calls taking turns with the batches' (see _engine_lock)."""
        engine = self._model.engine
        return _TakingTurns(engine, self._engine_lock) if self._engine_lock else engine

    @property
    def spec(self) -> ModelSpec:
        return self._model.spec

    @property
    def model_name(self) -> str:
        return self._model.name

    @property
    def model_version(self) -> str:
        return self._model.version

    @property
    def engine_lock(self) -> threading.Lock | None:
        """Held around every engine call; a rollout warms the next model under it too."""
        return self._engine_lock

    def add_swap_listener(self, listener: Callable[[ServedModel, ServedModel], None]) -> None:
        """Called with (old, new) right after the runner switched versions (HTTP /classify follows)."""
        self._swap_listeners.append(listener)

    def offer(self, model: ServedModel) -> None:
        """Serve `model` from the next batch on (a loaded, warmed version). Batches already running
        finish on the version they started with; the old version is freed after the last of them."""
        with self._model_lock:
            dropped, self._next = self._next, model
        if dropped is not None:  # offered but never served: a newer one came first
            dropped.free()

    def _acquire(self) -> ServedModel:
        with self._model_lock:
            swapped, freed_now = None, False
            if self._next is not None:
                swapped = (self._model, self._next)
                self._model, self._next = self._next, None
                swapped[0].retired = True
                freed_now = swapped[0].in_flight == 0
                if freed_now:
                    swapped[0].free()
            model = self._model
            model.in_flight += 1
        if swapped:
            old, new = swapped
            _LOGGER.info("model switched from %s/%s to %s/%s (%s) between batches", old.name, old.version,
                         new.name, new.version, new.source or "offered",
                         extra={"model_version": new.version, "previous_version": old.version})
            if freed_now:
                _LOGGER.info("model %s/%s freed (no batch held it)", old.name, old.version)
            for listener in self._swap_listeners:
                try:
                    listener(old, new)
                except Exception:
                    _LOGGER.exception("swap listener %r failed", listener)
        return model

    def _release(self, model: ServedModel) -> None:
        with self._model_lock:
            model.in_flight -= 1
            free = model.retired and model.in_flight == 0 and model.engine is not None
        if free:
            model.free()
            _LOGGER.info("model %s/%s freed (its last batch is done)", model.name, model.version)

    def run(self, deliveries: list[Delivery]) -> BatchReport:
        model = self._acquire()
        try:
            return self._run(deliveries, model)
        finally:
            self._release(model)

    def _run(self, deliveries: list[Delivery], model: ServedModel) -> BatchReport:
        batch_started = time.monotonic()
        report = BatchReport(batch_id=uuid.uuid4().hex)
        # Sampled per batch (psutil takes a millisecond or two): here it counts as batch wait, so
        # nothing unmeasured sits between the engine call and the insert.
        system = self._sample_system()
        items = self._unique_items(deliveries, report)
        list(self._pool.map(lambda item: self._fetch_and_decode(item, model.spec),
                            [item for item in items if item.job and not item.error]))
        fetched = time.monotonic()

        ready = [item for item in items if item.pixels is not None]
        logits, batch_ms, infer_started = self._infer(ready, model.engine)
        if logits is None:
            ready = []

        processed_at = dt.datetime.now(dt.timezone.utc)
        timing = _BatchTiming(batch_started, fetched, infer_started, batch_ms)
        decided = predictions(logits, model.spec.output) if ready else []
        result_rows = [
            self._result_row(item, prediction, len(ready), timing, processed_at, system, report.batch_id, model)
            for item, prediction in zip(ready, decided)
        ]
        if ready:
            model.cold = False
        report.images, report.inference_ms = len(ready), batch_ms
        sink_started = time.perf_counter()
        self._settle(self._tables.results, ready, result_rows, report, is_error=False)
        report.sink_ms = (time.perf_counter() - sink_started) * 1000.0 if result_rows else 0.0
        self._give_up_on_last_attempt(items)
        error_items = [item for item in items if item.error]
        self._settle(self._tables.errors, error_items, [self._error_row(i, processed_at, model) for i in error_items],
                     report, is_error=True)
        for item in items:
            if item.transient:
                _LOGGER.warning("will retry %s: %s", item.job.event_key if item.job else item.delivery.message_id,
                                item.transient)
                item.settle(acked=False)
                report.retried += 1
        if result_rows:
            self._write_batch_row(report, result_rows[0], timing, system, processed_at)
        for observer in self._observers:
            try:
                observer(report)
            except Exception:  # an observer (metrics, logging) must never cost a row
                _LOGGER.exception("batch observer %r failed", observer)
        return report

    def _write_batch_row(self, report: BatchReport, first: dict, timing: "_BatchTiming", system: dict,
                         processed_at: dt.datetime) -> None:
        """The batch's own row, written off the critical path: the results insert cannot carry its
        own duration, so sink time lives here and views join it back on batch_id."""
        if not self._tables.batches:
            return
        row = {
            "batch_id": report.batch_id,
            "event_key": report.batch_id,  # the sink's insertId
            "run_id": first["run_id"],
            "worker_host": first["worker_host"],
            "worker_pid": first.get("worker_pid"),
            "cpu_flags": first.get("cpu_flags"),
            "engine": first["engine"],
            "precision": first["precision"],
            "model_version": first["model_version"],
            "web_framework": self._web_framework,
            "images": report.images,
            "results": report.results,
            "errors": report.errors,
            "retried": report.retried,
            "duplicates": report.duplicates,
            "fetch_ms": (timing.fetched - timing.started) * 1000.0,
            "inference_ms": timing.inference_ms,
            "sink_ms": report.sink_ms,
            "started_at": (processed_at - dt.timedelta(seconds=time.monotonic() - timing.started)).isoformat(),
            "processed_at": processed_at.isoformat(),
            **system,
        }
        def written(outcome) -> None:
            if not outcome.ok:
                _LOGGER.warning("batch row %s not written: %s", row["batch_id"], outcome.failed)

        submit = getattr(self._sink, "submit", None)
        if submit is not None:
            submit(self._tables.batches, [row], written)
        else:
            written(self._sink.insert(self._tables.batches, [row]))

    def _unique_items(self, deliveries: list[Delivery], report: BatchReport) -> list[_Item]:
        """Parse jobs; fold copies of one event key into one item; ack keys already written."""
        items: list[_Item] = []
        by_key: dict[str, _Item] = {}
        for delivery in deliveries:
            item = _Item(delivery)
            try:
                item.job = parse_job(delivery.data)
            except MalformedJob as exc:
                item.error = PermanentError("malformed_job", str(exc))
                items.append(item)
                continue
            key = item.job.event_key
            if key in self._recent:
                delivery.ack()
                report.duplicates += 1
            elif key in by_key:
                by_key[key].copies.append(delivery)
                report.duplicates += 1
            else:
                by_key[key] = item
                items.append(item)
        return items

    def _infer(self, ready: list[_Item], engine: Engine) -> tuple[np.ndarray | None, float, float]:
        """Logits, the engine call's wall time in ms, and when it started (time.monotonic)."""
        if not ready:
            return np.empty(0, dtype=np.float32), 0.0, time.monotonic()
        batch = np.stack([item.pixels for item in ready])
        with self._engine_lock or contextlib.nullcontext():
            started_monotonic = time.monotonic()
            started = time.perf_counter()
            try:
                logits = engine.infer(batch)
            except Exception as exc:  # an engine fault is ours, not the image's: retry
                _LOGGER.exception("inference failed for a batch of %d", len(ready))
                for item in ready:
                    item.transient = f"inference failed: {exc}"
                return None, 0.0, started_monotonic
            return logits, (time.perf_counter() - started) * 1000.0, started_monotonic

    def _give_up_on_last_attempt(self, items: list[_Item]) -> None:
        """On the subscription's last delivery attempt a transient failure becomes an error row,
        so the upload still ends with a row (the dead-letter topic keeps what cannot be written)."""
        if not self._max_delivery_attempts:
            return
        for item in items:
            attempt = item.delivery.delivery_attempt or 0
            if item.transient and item.job and attempt >= self._max_delivery_attempts:
                item.error = PermanentError("retries_exhausted",
                                            f"gave up after {attempt} delivery attempts; last: {item.transient}")
                item.transient = None

    def _settle(self, table: str, items: list[_Item], rows: list[dict], report: BatchReport, is_error: bool) -> None:
        """Ack only what the sink accepted; nack the rest so it comes back."""
        if not rows:
            return
        outcome = self._sink.insert(table, rows)
        for index, (item, row) in enumerate(zip(items, rows)):
            if index in outcome.failed:
                item.transient = f"not written to {table}: {outcome.failed[index]}"
                item.error = None
                continue
            self._recent.add(row["event_key"])
            item.settle(acked=True)
            (report.error_rows if is_error else report.result_rows).append(row)
            if is_error:
                report.errors += 1
                report.reasons[row["reason"]] = report.reasons.get(row["reason"], 0) + 1
            else:
                report.results += 1

    def _fetch_and_decode(self, item: _Item, spec: ModelSpec) -> None:
        job = item.job
        try:
            if job.size is not None and job.size > self._limits.max_bytes:
                raise PermanentError(
                    "too_many_bytes",
                    f"the object has {job.size} bytes, over the limit of {self._limits.max_bytes} "
                    "(raise WORKER_MAX_IMAGE_BYTES to accept it)",
                )
            started = time.perf_counter()
            data = self._fetcher.fetch(job)
            downloaded = time.perf_counter()
            item.download_ms = (downloaded - started) * 1000.0
            try:
                item.pixels = preprocess_image(data, spec, self._limits)
            except ImageRejected as exc:
                raise PermanentError(exc.reason, str(exc))
            item.preprocess_ms = (time.perf_counter() - downloaded) * 1000.0
        except PermanentError as exc:
            item.error = exc
        except Exception as exc:  # network, server 5xx, timeouts: worth another delivery
            item.transient = f"download of gs://{job.bucket}/{job.name} failed: {exc!r}"

    def _result_row(self, item: _Item, prediction: Prediction, batch_size: int, timing: "_BatchTiming",
                    processed_at: dt.datetime, system: dict, batch_id: str, model: ServedModel) -> dict:
        job, delivery = item.job, item.delivery
        batch_ms = timing.inference_ms
        info = model.info
        return {
            "event_key": job.event_key,
            "run_id": job.run_id,
            "bucket": job.bucket,
            "object_name": job.name,
            "generation": job.generation,
            "size_bytes": job.size,
            "content_type": job.content_type,
            "object_created_at": _iso(job.time_created),
            "label": prediction.label,
            "score": prediction.score,  # the label's own score
            "class_index": prediction.class_index,
            "top_k": [{"label": label, "score": score, "class_index": index}
                      for label, score, index in prediction.top_k],
            "logit": prediction.raw,
            "threshold": model.spec.output.threshold if model.spec.output.width == 1 else None,
            "input_spec": model.spec.summary(),
            "model_name": model.name,
            "model_version": model.version,
            "model_form": info.model_form,
            "engine": info.name,
            "engine_version": info.version,
            "device": info.device,
            "precision": info.precision,
            "batch_size": batch_size,
            "created_to_function_ms": ms_between(job.time_created, job.function_received_at),
            "function_to_worker_ms": ms_between(job.function_received_at, delivery.received_at),
            "queue_ms": max(0.0, (timing.started - delivery.received_monotonic) * 1000.0),
            "download_ms": item.download_ms,
            "preprocess_ms": item.preprocess_ms,
            # Waiting for the rest of the batch to download and decode, then stacking it.
            "batch_wait_ms": max(0.0, (timing.infer_started - timing.started) * 1000.0
                                 - (item.download_ms or 0.0) - (item.preprocess_ms or 0.0)),
            "inference_ms": batch_ms / batch_size,
            "batch_inference_ms": batch_ms,
            "total_ms": (timing.inference_done - delivery.received_monotonic) * 1000.0,
            "batch_id": batch_id,
            "end_to_end_ms": ms_between(job.time_created, processed_at),
            "cold": model.cold,
            **self._machine_row,
            "web_framework": delivery.web_framework or self._web_framework,
            **system,
            "message_id": delivery.message_id,
            "delivery_attempt": delivery.delivery_attempt,
            "received_at": delivery.received_at.isoformat(),
            "processed_at": processed_at.isoformat(),
        }

    def _error_row(self, item: _Item, failed_at: dt.datetime, model: ServedModel) -> dict:
        job = item.job
        if job is not None:
            identity = {"event_key": job.event_key, "run_id": job.run_id, "bucket": job.bucket,
                        "object_name": job.name, "generation": job.generation, "size_bytes": job.size,
                        "content_type": job.content_type}
        else:
            partial = partial_identity(item.delivery.data)
            generation = partial.get("generation")
            identity = {
                # A malformed job still needs a stable key, so its redeliveries collapse to one row.
                "event_key": partial.get("event_key") or f"message:{item.delivery.message_id}",
                "bucket": partial.get("bucket"), "object_name": partial.get("name"),
                "generation": int(generation) if str(generation or "").isdigit() else None,
            }
        _LOGGER.info("error row for %s: %s", identity["event_key"], item.error.reason)
        return {
            **identity,
            "reason": item.error.reason,
            "message": str(item.error),
            "attempt": item.delivery.delivery_attempt,
            "model_version": model.version,
            "worker_host": self._machine_row.get("worker_host"),
            "message_id": item.delivery.message_id,
            "failed_at": failed_at.isoformat(),
        }


class _TakingTurns:
    """An engine whose infer() holds a lock shared with other callers (HTTP /classify and batches)."""

    def __init__(self, engine: Engine, lock: threading.Lock):
        self._engine, self._lock = engine, lock

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._engine.infer(batch)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


@dataclass
class _BatchTiming:
    """Batch phase boundaries on time.monotonic(); inference_ms is the engine call alone."""

    started: float
    fetched: float
    infer_started: float
    inference_ms: float

    @property
    def inference_done(self) -> float:
        # Where a row's total ends: the result exists once the engine returns. Building the dicts
        # after it is bookkeeping that, on a busy interpreter, can wait for the GIL long enough to
        # blur the stage sums.
        return self.infer_started + self.inference_ms / 1000.0


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None
