"""One model per process: loaded once, in the background, then shared by /classify, push and pull.

The model loads in a thread of the serving process (under gunicorn, the worker process, never the
master before the fork: OpenVINO's and TensorFlow's thread pools and gRPC channels do not survive
fork; under uvicorn, the one process), so /healthz answers at once and /readyz says "loading"
until the model is warmed.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Protocol

from worker.batch import BatchReport, BatchRunner, Delivery, Sink
from worker.http.batcher import MicroBatcher
from worker.http.classify import Classification, Classifier
from modelspec.preprocess import DecodeLimits
from worker.settings import StartupError

_LOGGER = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """The model is not loaded (yet, or it failed): answer 503."""


class NoTables(RuntimeError):
    """The server has no tables: what needs a row written (a push, ?record=true) is refused with
    503, so a pushed job is never acked without its row and Pub/Sub keeps it."""


@dataclass(frozen=True)
class LoadedModel:
    runner: BatchRunner


class Puller(Protocol):
    @property
    def healthy(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, timeout_s: float) -> None: ...


@dataclass(frozen=True)
class ServiceOptions:
    limits: DecodeLimits
    results_table: str
    batch_size: int = 32
    batch_wait_s: float = 0.01
    pipelines: int = 2
    web_framework: str = ""


PUSH_REFUSED = "a pushed job cannot be recorded, so it is not acked (Pub/Sub keeps it and delivers it again)"


def _nothing(*_args) -> None:
    pass


class InferenceService:
    """record_sink and sink_check are None on a server without tables (`serve` with WORKER_PULL=false
    and neither table set): /classify answers, pushes and ?record=true are refused (NoTables)."""

    def __init__(self, load: Callable[[], LoadedModel], options: ServiceOptions, *, record_sink: Sink | None,
                 sink_check: Callable[[], str] | None, machine_row: dict, sample_system: Callable[[], dict],
                 make_puller: Callable[[BatchRunner], Puller] | None = None, on_ready: Callable[[], None] = _nothing,
                 on_load_failed: Callable[[Exception], None] = _nothing, on_pull_ended: Callable[[], None] = _nothing):
        self.options = options
        self.machine_row = machine_row
        self.sample_system = sample_system
        self._load_model = load
        self._record_sink = record_sink
        self._sink_check = sink_check
        self._make_puller = make_puller
        self._on_ready = on_ready
        # The process cannot serve without a model, nor pull without a stream: these decide what to do.
        self._on_load_failed = on_load_failed
        self._on_pull_ended = on_pull_ended
        self._batch_observers: list[Callable[[BatchReport], None]] = []
        self._classify_observers: list[Callable[[int, float], None]] = []
        self._state = "loading"
        self._stopping = threading.Event()
        self.runner: BatchRunner | None = None
        self._classifier: Classifier | None = None
        self._push: MicroBatcher | None = None
        self.puller: Puller | None = None

    def add_batch_observer(self, observer: Callable[[BatchReport], None]) -> None:
        """Called after every pipeline batch (pull and push); register before start()."""
        self._batch_observers.append(observer)

    def add_classify_observer(self, observer: Callable[[int, float], None]) -> None:
        """Called with (images, engine call ms) after every /classify engine call."""
        self._classify_observers.append(observer)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._load, name="model-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        try:
            loaded = self._load_model()
            runner = loaded.runner
            for observer in self._batch_observers:
                runner.add_observer(observer)
            options = self.options
            self._classifier = self._make_classifier(runner)
            # A rollout (worker/rollout.py) switches the runner's version between batches; /classify follows.
            runner.add_swap_listener(lambda _old, _new: self._follow_swap(runner))
            self._push = MicroBatcher(self._run_push, max_batch=options.batch_size, max_wait_s=options.batch_wait_s,
                                      pipelines=options.pipelines, name="push")
            self.runner = runner
            if self._make_puller is not None:
                self.puller = self._make_puller(runner)
                self.puller.start()
                threading.Thread(target=self._watch_pull, name="pull-watch", daemon=True).start()
            self._state = "ready"
        except Exception as exc:
            # A StartupError names its step (model location, model load) and what to change;
            # anything else is unexpected and logged with its traceback.
            _LOGGER.error("cannot start: %s", exc, exc_info=not isinstance(exc, StartupError))
            self._state = f"failed: {exc}"
            self._on_load_failed(exc)
            return
        _LOGGER.info("ready: %s/%s on %s", runner.model_name, runner.model_version, runner.engine_info.name)
        self._on_ready()

    def _make_classifier(self, runner: BatchRunner) -> Classifier:
        # One engine call at a time: OpenVINO and TensorFlow use every core for one call, so
        # concurrent requests wait for the running call and then go together as the next batch.
        return Classifier(runner.engine, runner.spec, self.options.limits, max_batch=self.options.batch_size,
                          pipelines=1, on_batch=self._classify_batch_done)

    def _follow_swap(self, runner: BatchRunner) -> None:
        """The runner serves a new version: new requests go to it; calls queued on the old one finish."""
        previous, self._classifier = self._classifier, self._make_classifier(runner)
        if previous is not None:
            threading.Thread(target=previous.stop, name="classify-retire", daemon=True).start()

    def _watch_pull(self) -> None:
        while not self._stopping.wait(1.0):
            if not self.puller.healthy:
                _LOGGER.error("the pull stream ended; stopping this worker process so it is restarted")
                self._on_pull_ended()
                return

    def _classify_batch_done(self, images: int, inference_ms: float) -> None:
        for observer in self._classify_observers:
            observer(images, inference_ms)

    def _run_push(self, deliveries: list[Delivery]) -> list[BatchReport]:
        try:
            report = self.runner.run(deliveries)
        except Exception:
            for delivery in deliveries:  # a bug in one batch must not lose the messages: Pub/Sub redelivers
                delivery.nack()
            raise
        return [report] * len(deliveries)

    @property
    def ready(self) -> bool:
        return self._state == "ready"

    @property
    def failed(self) -> bool:
        return self._state.startswith("failed")

    @property
    def writes_rows(self) -> bool:
        return self._record_sink is not None and bool(self.options.results_table)

    def require_tables(self, for_what: str) -> None:
        """Raise NoTables when rows cannot be written; for_what says what was refused and why."""
        if not self.writes_rows:
            raise NoTables(f"no tables configured: {for_what}; set WORKER_RESULTS_TABLE and WORKER_ERRORS_TABLE "
                           "to write rows (this server answers /classify without them)")

    def readiness(self) -> dict[str, str]:
        """Check -> "ok" (or "disabled") or why not; ready when every check passes."""
        if self._make_puller is None:
            pull = "disabled"
        elif self.puller is None:
            pull = "not started"
        else:
            pull = "ok" if self.puller.healthy else "the pull stream ended"
        sink = self._sink_check() if self._sink_check is not None else "disabled"
        return {"model": "ok" if self.ready else self._state, "pull": pull, "sink": sink}

    def model_facts(self) -> dict:
        runner = self._ready_runner()
        info = runner.engine_info
        return {"model_name": runner.model_name, "model_version": runner.model_version,
                "model_form": info.model_form, "engine": info.name, "engine_version": info.version,
                "device": info.device, "precision": info.precision, "web_framework": self.options.web_framework}

    def classify(self, data: bytes, received_monotonic: float) -> Classification:
        self._ready_runner()
        return self._classifier.classify(data, received_monotonic)

    def record(self, row: dict):
        """Write a /classify row to the results table; returns the sink's InsertOutcome."""
        self.require_tables("the row cannot be recorded")
        return self._record_sink.insert(self.options.results_table, [row])

    def push(self, delivery: Delivery) -> Future:
        """Queue a pushed job for the next batch; the delivery's ack/nack say how it ended."""
        self.require_tables(PUSH_REFUSED)
        self._ready_runner()
        return self._push.submit(delivery)

    def _ready_runner(self) -> BatchRunner:
        if not self.ready:
            raise NotReady(f"the model is not ready: {self._state}")
        return self.runner

    def stop(self, timeout_s: float) -> None:
        """Stop pulling (queued messages are nacked), finish the batches in flight."""
        self._stopping.set()
        self._state = "stopping"
        if self.puller is not None:
            self.puller.stop(timeout_s)
        for batcher in (self._push, self._classifier):
            if batcher is not None:
                batcher.stop(timeout_s)
