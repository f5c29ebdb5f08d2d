"""POST /classify: image bytes -> label, without Cloud Storage or Pub/Sub.

Decoding runs in the request thread (Pillow releases the GIL, so requests decode in parallel);
the engine call goes through a MicroBatcher, so concurrent requests share one inference call
instead of fighting for the cores with one call each.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np

from worker.batch import sigmoid
from worker.engines.base import Engine
from worker.http.batcher import MicroBatcher
from worker.preprocess import DecodeLimits, decode_image

# ImageRejected.reason -> HTTP status: too big 413, not an image we take 415, damaged 400.
REJECTION_STATUS = {
    "too_many_bytes": 413,
    "too_many_pixels": 413,
    "not_an_image": 415,
    "unsupported_format": 415,
    "unsupported_mode": 415,
    "corrupt_image": 400,
    "empty_object": 400,
}
HTTP_BUCKET = "(http)"  # bucket of rows recorded from /classify: the image came in a request, not from a bucket


def status_for_rejection(reason: str) -> int:
    return REJECTION_STATUS.get(reason, 400)


@dataclass(frozen=True)
class _Inference:
    logit: float
    batch_size: int
    batch_inference_ms: float
    queue_ms: float  # waiting for the batcher, before the engine call
    batch_id: str
    cold: bool
    returned_monotonic: float  # when the engine call returned


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    logit: float
    threshold: float
    size_bytes: int
    receive_ms: float  # request in -> body read (before the decode starts)
    decode_ms: float
    queue_ms: float  # waiting for the engine call
    inference_ms: float  # this image's share of the engine call
    batch_inference_ms: float
    batch_size: int
    total_ms: float  # request in -> engine call returned (= receive + decode + queue + batch_inference)
    batch_id: str
    cold: bool

    def timings_ms(self) -> dict[str, float]:
        return {"receive": self.receive_ms, "decode": self.decode_ms, "queue": self.queue_ms,
                "inference": self.inference_ms, "batch_inference": self.batch_inference_ms, "total": self.total_ms}


class Classifier:
    def __init__(self, engine: Engine, class_names: list[str], threshold: float, limits: DecodeLimits, *,
                 max_batch: int, max_wait_s: float = 0.0, pipelines: int = 1, on_batch=None):
        self._engine = engine
        self._class_names = list(class_names)
        self._threshold = threshold
        self._limits = limits
        self._on_batch = on_batch  # (images, engine call ms) after each call: metrics
        self._cold = True
        self._batcher = MicroBatcher(self._infer, max_batch=max_batch, max_wait_s=max_wait_s, pipelines=pipelines,
                                     name="classify")

    def classify(self, data: bytes, received_monotonic: float) -> Classification:
        """Raises ImageRejected (with .reason) for bytes that are not a usable image."""
        decode_started = time.monotonic()
        pixels = decode_image(data, self._limits)
        decoded = time.monotonic()
        inference: _Inference = self._batcher.submit((pixels, decoded)).result()
        score = float(sigmoid(np.array([inference.logit]))[0])
        positive = score >= self._threshold
        return Classification(
            label=self._class_names[1 if positive else 0], score=score, logit=inference.logit,
            threshold=self._threshold, size_bytes=len(data),
            receive_ms=max(0.0, (decode_started - received_monotonic) * 1000.0),
            decode_ms=(decoded - decode_started) * 1000.0, queue_ms=inference.queue_ms,
            inference_ms=inference.batch_inference_ms / inference.batch_size,
            batch_inference_ms=inference.batch_inference_ms, batch_size=inference.batch_size,
            total_ms=(inference.returned_monotonic - received_monotonic) * 1000.0, batch_id=inference.batch_id,
            cold=inference.cold,
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        self._batcher.stop(timeout_s)

    def _infer(self, items: list[tuple[np.ndarray, float]]) -> list[_Inference]:
        batch = np.stack([pixels for pixels, _ in items])
        started_monotonic = time.monotonic()
        logits = self._engine.infer(batch).reshape(len(items), -1)[:, 0]
        returned = time.monotonic()
        batch_ms = (returned - started_monotonic) * 1000.0
        cold, self._cold = self._cold, False
        if self._on_batch:
            self._on_batch(len(items), batch_ms)
        batch_id = uuid.uuid4().hex
        return [_Inference(float(logit), len(items), batch_ms, max(0.0, (started_monotonic - submitted) * 1000.0),
                           batch_id, cold, returned)
                for logit, (_, submitted) in zip(logits, items)]


@dataclass(frozen=True)
class RecordFacts:
    """Who asked, for a row recorded from a request (?record=true)."""

    event_key: str
    object_name: str
    content_type: str | None
    run_id: str | None
    web_framework: str


def new_event_key() -> str:
    return f"classify:{uuid.uuid4().hex}"


def classify_row(result: Classification, facts: RecordFacts, model: dict, machine_row: dict, system: dict,
                 received_at, processed_at) -> dict:
    """The results-table row of one /classify request (sql/results_schema.json), shaped like a
    pipeline row so its stages add up to total_ms the same way: receiving the body is the queue
    stage, no download, the decode is preprocess, the wait for the engine call is batch_wait."""
    return {
        "event_key": facts.event_key, "run_id": facts.run_id, "bucket": HTTP_BUCKET,
        "object_name": facts.object_name, "generation": 0, "size_bytes": result.size_bytes,
        "content_type": facts.content_type, "object_created_at": None,
        "label": result.label, "score": result.score, "logit": result.logit, "threshold": result.threshold,
        "model_name": model["model_name"], "model_version": model["model_version"],
        "model_form": model["model_form"], "engine": model["engine"], "engine_version": model["engine_version"],
        "device": model["device"], "precision": model["precision"], "batch_size": result.batch_size,
        "created_to_function_ms": None, "function_to_worker_ms": None,
        "queue_ms": result.receive_ms, "download_ms": None, "preprocess_ms": result.decode_ms,
        "batch_wait_ms": result.queue_ms,
        "inference_ms": result.inference_ms, "batch_inference_ms": result.batch_inference_ms,
        "total_ms": result.total_ms, "end_to_end_ms": result.total_ms, "cold": result.cold,
        "batch_id": result.batch_id,
        **machine_row,
        "web_framework": facts.web_framework,
        **system,
        "message_id": None, "delivery_attempt": None,
        "received_at": received_at.isoformat(), "processed_at": processed_at.isoformat(),
    }
