"""Micro-batching from a queue: shared by the pull pipelines and the HTTP batcher."""

from __future__ import annotations

import queue
import time
from typing import TypeVar

T = TypeVar("T")


def next_batch(source: queue.Queue[T], max_items: int, max_wait_s: float, first_wait_s: float = 0.2) -> list[T]:
    """Up to max_items from source: waits first_wait_s for the first item (an empty list if none
    came, so the caller can check for shutdown), then at most max_wait_s more to fill the batch."""
    try:
        batch = [source.get(timeout=first_wait_s)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + max_wait_s
    while len(batch) < max_items:
        remaining = deadline - time.monotonic()
        try:
            batch.append(source.get(timeout=remaining) if remaining > 0 else source.get_nowait())
        except queue.Empty:
            break
    return batch
