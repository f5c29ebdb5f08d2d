"""Gather items submitted from many request threads into one call per batch."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Generic, TypeVar

from worker.microbatch import next_batch

_LOGGER = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """`process(items) -> results` (one result per item, in order) runs on `pipelines` threads.

    A batch is whatever has queued while the previous one ran, up to `max_batch`, after waiting at
    most `max_wait_s` for more: under light load a request goes alone without delay, under heavy
    load the engine gets full batches. A failing `process` fails every item of its batch.
    """

    def __init__(self, process: Callable[[list[Item]], list[Result]], *, max_batch: int, max_wait_s: float = 0.0,
                 pipelines: int = 1, name: str = "batcher"):
        self._process = process
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: queue.Queue[tuple[Item, Future]] = queue.Queue()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{index}", daemon=True)
                         for index in range(pipelines)]
        for thread in self._threads:
            thread.start()

    def submit(self, item: Item) -> "Future[Result]":
        if self._stopping.is_set():
            raise RuntimeError("the batcher is stopped")
        future: Future[Result] = Future()
        self._queue.put((item, future))
        return future

    def stop(self, timeout_s: float = 5.0) -> None:
        """Finish the batches in flight; fail what is still queued."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        while True:
            try:
                _, future = self._queue.get_nowait()
            except queue.Empty:
                break
            future.set_exception(RuntimeError("the batcher stopped before this item ran"))

    def _loop(self) -> None:
        while not self._stopping.is_set():
            batch = next_batch(self._queue, self._max_batch, self._max_wait_s)
            if batch:
                self._run(batch)

    def _run(self, batch: list[tuple[Item, Future]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = self._process(items)
            if len(results) != len(items):
                raise RuntimeError(f"process returned {len(results)} results for {len(items)} items")
        except Exception as exc:
            _LOGGER.exception("a batch of %d failed", len(items))
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)
