"""Streaming pull with flow control, micro-batching of messages into one inference call each."""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

from worker.batch import BatchRunner, Delivery
from worker.microbatch import next_batch

_LOGGER = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0


class PullWorker:
    def __init__(self, *, subscriber, subscription_path: str, runner: BatchRunner, batch_size: int,
                 batch_wait_ms: float, max_outstanding_messages: int, pipelines: int):
        self._subscriber = subscriber
        self._subscription_path = subscription_path
        self._runner = runner
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_ms / 1000.0
        self._max_outstanding = max_outstanding_messages
        self._pipelines = pipelines
        self._queue: queue.Queue[Delivery] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stream = None
        self.processed = 0
        self._failures = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        flow_control = pubsub_v1.types.FlowControl(max_messages=self._max_outstanding)
        # The callback only enqueues, so a small executor keeps up with any message rate.
        scheduler = ThreadScheduler(ThreadPoolExecutor(max_workers=2, thread_name_prefix="pull-callback"))
        self._stream = self._subscriber.subscribe(
            self._subscription_path, callback=self._on_message, flow_control=flow_control, scheduler=scheduler,
        )
        for index in range(self._pipelines):
            thread = threading.Thread(target=self._pipeline_loop, name=f"pipeline-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        _LOGGER.info("pulling from %s", self._subscription_path)

    @property
    def healthy(self) -> bool:
        return self._stream is not None and not self._stream.done()

    def _on_message(self, message) -> None:
        self._queue.put(Delivery(
            data=message.data,
            message_id=message.message_id,
            delivery_attempt=message.delivery_attempt,
            received_at=dt.datetime.now(dt.timezone.utc),
            received_monotonic=time.monotonic(),
            ack=message.ack,
            nack=message.nack,
        ))

    def _pipeline_loop(self) -> None:
        while not self._stopping.is_set():
            batch = next_batch(self._queue, self._batch_size, self._batch_wait_s)
            if not batch:
                continue
            try:
                report = self._runner.run(batch)
            except Exception:
                # A bug in one batch must not kill the worker: return the messages and go on.
                _LOGGER.exception("batch of %d failed; messages returned for redelivery", len(batch))
                for delivery in batch:
                    delivery.nack()
                self._back_off()
                continue
            with self._lock:
                self.processed += report.results + report.errors
            if report.retried and not (report.results or report.errors):
                self._back_off()
            else:
                self._failures = 0

    def _back_off(self) -> None:
        # Nacked messages come straight back; pausing here keeps an outage from becoming a busy loop.
        self._failures += 1
        self._stopping.wait(min(MAX_BACKOFF_S, 0.1 * 2 ** self._failures))

    def stop(self, timeout_s: float) -> None:
        """Finish the batches in hand, return what is queued, then close the stream, within timeout_s.

        The stream closes last: the client drops acks sent after it closed, and a batch written but
        not acked would be delivered again (a second insert the views must hide).
        """
        deadline = time.monotonic() + timeout_s
        self._stopping.set()  # pipelines take no new batch
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        returned = self._return_queued()
        if self._stream is not None:
            self._stream.cancel()
            returned += self._return_queued()  # arrived while the last batches finished
            try:
                self._stream.result(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                pass
        _LOGGER.info("stopped; %d queued messages returned for redelivery", returned)

    def _return_queued(self) -> int:
        returned = 0
        while True:
            try:
                self._queue.get_nowait().nack()
                returned += 1
            except queue.Empty:
                return returned

    def wait(self) -> None:
        """Block until the stream ends (stop() or a terminating error)."""
        if self._stream is not None:
            self._stream.result()
