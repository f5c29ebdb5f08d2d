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

from modelspec.outputs import predictions
from modelspec.preprocess import DecodeLimits, preprocess_image
from modelspec.spec import ModelSpec
from worker.engines.base import Engine
from worker.http.batcher import MicroBatcher

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
    outputs: np.ndarray  # this image's row of the model's output
    batch_size: int
    batch_inference_ms: float
    queue_ms: float  # waiting for the batcher, before the engine call
    batch_id: str
    cold: bool
    returned_monotonic: float  # when the engine call returned


@dataclass(frozen=True)
class Classification:
    label: str
    score: float  # the label's own score
    class_index: int
    top_k: tuple[tuple[str, float, int], ...]
    logit: float
    threshold: float | None
    input_spec: str
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

    def top_k_records(self) -> list[dict]:
        return [{"label": label, "score": score, "class_index": index} for label, score, index in self.top_k]

    def timings_ms(self) -> dict[str, float]:
        return {"receive": self.receive_ms, "decode": self.decode_ms, "queue": self.queue_ms,
                "inference": self.inference_ms, "batch_inference": self.batch_inference_ms, "total": self.total_ms}


class Classifier:
    def __init__(self, engine: Engine, spec: ModelSpec, limits: DecodeLimits, *,
                 max_batch: int, max_wait_s: float = 0.0, pipelines: int = 1, on_batch=None):
        self._engine = engine
        self._spec = spec
        self._limits = limits
        self._on_batch = on_batch  # (images, engine call ms) after each call: metrics
        self._cold = True
        self._batcher = MicroBatcher(self._infer, max_batch=max_batch, max_wait_s=max_wait_s, pipelines=pipelines,
                                     name="classify")

    def classify(self, data: bytes, received_monotonic: float) -> Classification:
        """Raises ImageRejected (with .reason) for bytes that are not a usable image."""
        decode_started = time.monotonic()
        pixels = preprocess_image(data, self._spec, self._limits)
        decoded = time.monotonic()
        inference: _Inference = self._batcher.submit((pixels, decoded)).result()
        output = self._spec.output
        (prediction,) = predictions(inference.outputs[None], output)
        return Classification(
            label=prediction.label, score=prediction.score, class_index=prediction.class_index,
            top_k=prediction.top_k, logit=prediction.raw, threshold=output.threshold if output.width == 1 else None,
            input_spec=self._spec.summary(), size_bytes=len(data),
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
        outputs = self._engine.infer(batch).reshape(len(items), -1)
        returned = time.monotonic()
        batch_ms = (returned - started_monotonic) * 1000.0
        cold, self._cold = self._cold, False
        if self._on_batch:
            self._on_batch(len(items), batch_ms)
        batch_id = uuid.uuid4().hex
        return [_Inference(row, len(items), batch_ms, max(0.0, (started_monotonic - submitted) * 1000.0),
                           batch_id, cold, returned)
                for row, (_, submitted) in zip(outputs, items)]


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
        "label": result.label, "score": result.score, "class_index": result.class_index,
        "top_k": result.top_k_records(), "logit": result.logit, "threshold": result.threshold,
        "input_spec": result.input_spec,
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
