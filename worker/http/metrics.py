"""GET /metrics: Prometheus text, from the runner's batch reports (pull and push alike), the
/classify path and the HTTP layer. One CollectorRegistry per app, never the global one, so
several apps (tests) in one process do not share counters.

One process serves everything (gunicorn workers = 1), so no multiprocess collector is needed.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from worker.batch import BatchReport

STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Per-image stages of a pipeline row (columns <stage>_ms of the results table).
PIPELINE_STAGES = ("queue", "download", "preprocess", "batch_wait", "inference", "total")
MODEL_LABELS = ("model_name", "model_version", "engine", "engine_version", "device", "precision", "model_form",
                "web_framework")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.images = Counter("worker_images", "Images classified (source: pipeline = pull or push jobs; "
                              "classify = POST /classify)", ["source"], registry=r)
        self.errors = Counter("worker_errors", "Images refused, by reason code (pipeline: error rows)",
                              ["source", "reason"], registry=r)
        self.deliveries = Counter("worker_deliveries", "Job deliveries (pull and push) by outcome: result, error "
                                  "(acked with a row), duplicate (acked, no row), retried (nacked)",
                                  ["outcome"], registry=r)
        self.stage_seconds = Histogram("worker_stage_seconds", "Time per image in each stage; batch_inference and "
                                       "sink once per engine call / insert", ["source", "stage"],
                                       buckets=STAGE_BUCKETS_S, registry=r)
        self.batch_size = Histogram("worker_batch_size", "Images per engine call", ["source"],
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.model_info = Gauge("worker_model_info", "The model this process serves (value 1)", MODEL_LABELS,
                                registry=r)
        self.ready = Gauge("worker_ready", "1 while GET /readyz answers 200", registry=r)
        self.http_requests = Counter("worker_http_requests", "HTTP requests by endpoint and status",
                                     ["endpoint", "method", "status"], registry=r)
        self.http_seconds = Histogram("worker_http_request_seconds", "HTTP request duration by endpoint",
                                      ["endpoint"], buckets=STAGE_BUCKETS_S, registry=r)

    def observe_batch(self, report: BatchReport) -> None:
        """A BatchRunner observer: every pulled or pushed batch."""
        self.images.labels("pipeline").inc(report.results)
        for reason, count in report.reasons.items():
            self.errors.labels("pipeline", reason).inc(count)
        for outcome, count in (("result", report.results), ("error", report.errors),
                               ("duplicate", report.duplicates), ("retried", report.retried)):
            self.deliveries.labels(outcome).inc(count)
        for row in report.result_rows:
            for stage in PIPELINE_STAGES:
                value = row.get(f"{stage}_ms")
                if value is not None:
                    self.stage_seconds.labels("pipeline", stage).observe(value / 1000.0)
        if report.images:
            self.batch_size.labels("pipeline").observe(report.images)
            self.stage_seconds.labels("pipeline", "batch_inference").observe(report.inference_ms / 1000.0)
        if report.result_rows:
            self.stage_seconds.labels("pipeline", "sink").observe(report.sink_ms / 1000.0)

    def observe_classify(self, timings_ms: dict[str, float]) -> None:
        self.images.labels("classify").inc()
        for stage, value in timings_ms.items():
            if stage != "batch_inference":  # observed once per call, in observe_classify_batch
                self.stage_seconds.labels("classify", stage).observe(value / 1000.0)

    def observe_classify_batch(self, images: int, inference_ms: float) -> None:
        self.batch_size.labels("classify").observe(images)
        self.stage_seconds.labels("classify", "batch_inference").observe(inference_ms / 1000.0)

    def observe_rejection(self, reason: str) -> None:
        self.errors.labels("classify", reason).inc()

    def set_model(self, facts: dict) -> None:
        self.model_info.labels(*(str(facts.get(label) or "") for label in MODEL_LABELS)).set(1)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(endpoint, method, str(status)).inc()
        self.http_seconds.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
