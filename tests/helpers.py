"""Helpers for tests on the local stack: make images, upload them, wait for their rows."""

from __future__ import annotations

import functools
import json
import time
import uuid
from pathlib import Path

import numpy as np

from localcloud.bench import noise_png
from localcloud.config import REPO_ROOT
from localcloud.demo import bigquery_rows
from localcloud.stack import Stack

DATA = Path(__file__).parent / "data"
DEMO_DATASET = REPO_ROOT / "build" / "demo-dataset"
MODEL_DIR = REPO_ROOT / "build" / "models" / "demo" / "1"


def png_bytes(seed: int = 0, size: int = 96) -> bytes:
    return noise_png(np.random.default_rng(seed), size, compress_level=6)


def demo_images(per_class: int) -> list[tuple[str, Path]]:
    """(class name, path) pairs from the demo dataset, both classes."""
    pairs = []
    for class_dir in sorted(p for p in DEMO_DATASET.iterdir() if p.is_dir()):
        pairs += [(class_dir.name, path) for path in sorted(class_dir.iterdir())[:per_class]]
    return pairs


def new_run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def upload(stack: Stack, name: str, data: bytes, run_id: str, content_type: str = "image/png",
           bucket: str | None = None) -> int:
    """Upload with the Python client (as an application would); returns the generation."""
    from worker.clients import storage_client

    config = stack.config
    client = storage_client(config.project, config.client_env())
    blob = client.bucket(bucket or config.bucket).blob(name)
    blob.metadata = {"run_id": run_id}
    blob.upload_from_string(data, content_type=content_type)
    return blob.generation


def rows_for_run(stack: Stack, run_id: str, expected: int, timeout_s: float = 60.0) -> tuple[list[dict], list[dict]]:
    """Wait until results + errors for the run reach expected (or the timeout); return both."""
    deadline = time.monotonic() + timeout_s
    while True:
        results = bigquery_rows(stack.config, "SELECT * FROM `${project}.${dataset}.results` WHERE run_id = @run_id",
                                {"run_id": run_id})
        errors = bigquery_rows(stack.config, "SELECT * FROM `${project}.${dataset}.errors` WHERE run_id = @run_id",
                               {"run_id": run_id})
        if len(results) + len(errors) >= expected or time.monotonic() > deadline:
            return results, errors
        time.sleep(0.3)


def load_json(name: str):
    return json.loads((DATA / name).read_text())


def upload_many(stack: Stack, items: list[tuple[str, bytes]], run_id: str, threads: int = 8) -> dict[str, int]:
    """Upload (name, bytes) pairs in parallel; returns name -> generation."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        generations = pool.map(lambda item: upload(stack, item[0], item[1], run_id), items)
        return dict(zip([name for name, _ in items], generations))


def key_counts(stack: Stack, run_id: str, results_table: str = "results", errors_table: str = "errors") -> dict:
    """Distinct event keys of a run in results and errors, plus raw row counts (to see duplicates)."""
    sql = f"""
    SELECT
      (SELECT COUNT(DISTINCT event_key) FROM `${{project}}.${{dataset}}.{results_table}` WHERE run_id = @run_id) AS results,
      (SELECT COUNT(DISTINCT event_key) FROM `${{project}}.${{dataset}}.{errors_table}` WHERE run_id = @run_id) AS errors,
      (SELECT COUNT(*) FROM `${{project}}.${{dataset}}.{results_table}` WHERE run_id = @run_id) AS result_rows,
      (SELECT COUNT(*) FROM `${{project}}.${{dataset}}.{errors_table}` WHERE run_id = @run_id) AS error_rows,
      (SELECT COUNT(*) FROM `${{project}}.${{dataset}}.{results_table}` r
         JOIN `${{project}}.${{dataset}}.{errors_table}` e USING (event_key)
        WHERE r.run_id = @run_id) AS in_both
    """
    return bigquery_rows(stack.config, sql, {"run_id": run_id})[0]


def wait_for_keys(stack: Stack, run_id: str, expected: int, timeout_s: float = 120.0, **tables) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = key_counts(stack, run_id, **tables)
        if counts["results"] + counts["errors"] >= expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


class IsolatedWorker:
    """A worker with its own subscription on the jobs topic and its own tables.

    Tests that stop, kill or hold back a worker use one, so the session's main worker goes on
    undisturbed (and the Pub/Sub emulator's habit of routing messages to the stream of a
    subscriber that just stopped cannot delay other tests).
    """

    def __init__(self, stack: Stack, name: str, ack_deadline_s: int = 10, dead_letter_topic: str | None = None,
                 **env: str):
        from google.cloud import bigquery

        from localcloud.resources import table_schema
        from worker.clients import bigquery_client, subscriber_client

        self.stack, self.name, self.env = stack, f"worker-{name}", env
        config = stack.config
        suffix = f"{name}_{uuid.uuid4().hex[:6]}".replace("-", "_")
        self.results_table, self.errors_table = f"results_{suffix}", f"errors_{suffix}"
        client = bigquery_client(config.project, config.client_env())
        for table, schema in ((self.results_table, "results"), (self.errors_table, "errors")):
            client.create_table(bigquery.Table(config.table_id(table), schema=[
                bigquery.SchemaField.from_api_repr(f) for f in table_schema(schema)]))
        self.subscription = config.subscription_path(f"jobs-{suffix.replace('_', '-')}")
        self._subscriber = subscriber_client(config.client_env())
        request = {"name": self.subscription, "topic": config.topic_path(config.jobs_topic),
                   "ack_deadline_seconds": ack_deadline_s}
        if dead_letter_topic:
            request["dead_letter_policy"] = {"dead_letter_topic": dead_letter_topic,
                                             "max_delivery_attempts": config.max_delivery_attempts}
        self._subscriber.create_subscription(request=request)

    def start(self) -> None:
        config = self.stack.config
        self.stack.start_worker(self.name, WORKER_SUBSCRIPTION=self.subscription,
                                WORKER_RESULTS_TABLE=config.table_id(self.results_table),
                                WORKER_ERRORS_TABLE=config.table_id(self.errors_table), **self.env)

    def process(self):
        return self.stack.processes.process(self.name)

    def stop(self) -> None:
        self.stack.stop_worker(self.name)

    def close(self) -> None:
        self.stop()
        self._subscriber.delete_subscription(subscription=self.subscription)

    def counts(self, run_id: str) -> dict:
        return key_counts(self.stack, run_id, results_table=self.results_table, errors_table=self.errors_table)

    def wait(self, run_id: str, expected: int, timeout_s: float = 120.0) -> dict:
        return wait_for_keys(self.stack, run_id, expected, timeout_s,
                             results_table=self.results_table, errors_table=self.errors_table)


@functools.cache
def _demo_logits(per_class: int) -> tuple[tuple[str, Path, float], ...]:
    """(class name, path, f32 logit) for the first per_class demo images of each class."""
    import openvino as ov

    from modelspec.preprocess import preprocess_image
    from modelspec.spec import spec_from_manifest

    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    compiled = ov.Core().compile_model(str(MODEL_DIR / manifest["forms"]["openvino_fp32"]), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    pairs = demo_images(per_class)
    spec = spec_from_manifest(manifest)
    pixels = np.stack([preprocess_image(path.read_bytes(), spec) for _, path in pairs])
    logits = compiled(pixels)[compiled.output(manifest["outputs"]["logits"])].ravel()
    return tuple((name, path, float(logit)) for (name, path), logit in zip(pairs, logits))


def demo_images_the_model_gets_right(per_class: int, margin_logit: float = 2.0) -> list[tuple[str, Path]]:
    """Demo images this build's model labels as their class, at least margin_logit from the threshold.

    Each clone trains its own model (about 99% held-out accuracy), so which images it gets right,
    and by how much, varies between builds: tests that check a row's label against the image's
    class take images with a clear margin, where every engine and precision agrees. A model too
    poor to give enough of them fails here, loudly.
    """
    import math

    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    threshold = math.log(manifest["threshold"] / (1 - manifest["threshold"]))
    positive = manifest["class_names"][1]
    chosen: dict[str, list[Path]] = {name: [] for name in manifest["class_names"]}
    for name, path, logit in _demo_logits(max(4 * per_class, 20)):
        sign = 1.0 if name == positive else -1.0
        if sign * (logit - threshold) >= margin_logit and len(chosen[name]) < per_class:
            chosen[name].append(path)
    short = {name: len(paths) for name, paths in chosen.items() if len(paths) < per_class}
    assert not short, (f"the model at {MODEL_DIR} labels too few demo images clearly ({short} of {per_class}); "
                       "rebuild it with `make model` or check its held-out metrics in manifest.json")
    return [(name, path) for name, paths in chosen.items() for path in paths]
