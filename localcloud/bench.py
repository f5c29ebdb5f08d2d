"""`make bench`: the pipeline under load on the local stack, one run id per configuration.

Two modes:
- pipeline: upload N images in parallel and wait for every row (upload -> row);
- worker-only: fill the jobs backlog with the worker stopped, then start it and time how fast it
  drains (the worker alone, without upload and notification costs).
Every configuration also times the bare engine on the same batch size in the same run, so the
worker's per-image inference time is reported as a ratio to the bare call.
"""

from __future__ import annotations

import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product

import click
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from localcloud.config import StackConfig
from localcloud.demo import bigquery_rows
from localcloud.stack import Stack

console = Console(width=170)

STATS_SQL = """
SELECT
  COUNT(DISTINCT event_key) AS images,
  TIMESTAMP_DIFF(MAX(processed_at), MIN(received_at), MILLISECOND) AS worker_span_ms,
  TIMESTAMP_DIFF(MAX(processed_at), MIN(object_created_at), MILLISECOND) AS pipeline_span_ms,
  APPROX_QUANTILES(end_to_end_ms, 100)[OFFSET(50)] AS e2e_p50_ms,
  APPROX_QUANTILES(end_to_end_ms, 100)[OFFSET(95)] AS e2e_p95_ms,
  APPROX_QUANTILES(end_to_end_ms, 100)[OFFSET(99)] AS e2e_p99_ms,
  APPROX_QUANTILES(total_ms, 100)[OFFSET(50)] AS worker_p50_ms,
  APPROX_QUANTILES(inference_ms, 100)[OFFSET(50)] AS inference_p50_ms,
  AVG(batch_size) AS mean_batch,
  AVG(created_to_function_ms) AS to_function_ms,
  AVG(function_to_worker_ms) AS to_worker_ms,
  AVG(queue_ms) AS queue_ms,
  AVG(download_ms) AS download_ms,
  AVG(preprocess_ms) AS preprocess_ms,
  AVG(inference_ms) AS inference_ms
FROM `${project}.${dataset}.results`
WHERE run_id = @run_id
"""


@dataclass(frozen=True)
class BenchConfig:
    engine: str
    precision: str
    batch_size: int
    pipelines: int


def bench_images(count: int, seed: int = 0) -> list[bytes]:
    """128x128 PNGs of textured noise (distinct bytes, so no two uploads are alike)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = (rng.random((128, 128)) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        images.append(buffer.getvalue())
    return images


def upload_all(config: StackConfig, images: list[bytes], run_id: str, threads: int) -> float:
    from worker.clients import storage_client

    client = storage_client(config.project, config.client_env())
    bucket = client.bucket(config.bucket)
    started = time.monotonic()

    def put(index: int) -> None:
        blob = bucket.blob(f"{config.prefix}{run_id}/{index:06d}.png")
        blob.metadata = {"run_id": run_id}
        blob.upload_from_string(images[index], content_type="image/png")

    with ThreadPoolExecutor(threads) as pool, Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"upload {run_id}", total=len(images))
        for _ in pool.map(put, range(len(images))):
            progress.advance(task)
    return time.monotonic() - started


def wait_rows(config: StackConfig, run_id: str, expected: int, timeout_s: float) -> int:
    sql = "SELECT COUNT(DISTINCT event_key) AS n FROM `${project}.${dataset}.results` WHERE run_id = @run_id"
    deadline = time.monotonic() + timeout_s
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"rows {run_id}", total=expected)
        while True:
            done = bigquery_rows(config, sql, {"run_id": run_id})[0]["n"]
            progress.update(task, completed=done)
            if done >= expected or time.monotonic() > deadline:
                return done
            time.sleep(0.5)


def bare_engine_ms_per_image(model_dir, engine: str, precision: str, batch_size: int, repeats: int = 30) -> float:
    """Median ms per image of the engine call alone, on real preprocessed images."""
    import json

    from worker.engines import create_engine
    from worker.preprocess import decode_image

    manifest = json.loads((model_dir / "manifest.json").read_text())
    instance = create_engine(engine, precision, model_dir, manifest)
    instance.load()
    instance.warmup()
    batch = np.stack([decode_image(data) for data in bench_images(batch_size, seed=99)])
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        instance.infer(batch)
        timings.append((time.perf_counter() - started) * 1000.0 / batch_size)
    return statistics.median(timings)


def run_config(stack: Stack, bench: BenchConfig, images: list[bytes], worker_only: bool, threads: int,
               timeout_s: float) -> dict:
    config = stack.config
    run_id = f"bench-{bench.engine}-{bench.precision}-b{bench.batch_size}-p{bench.pipelines}-{uuid.uuid4().hex[:6]}"
    worker_env = {"WORKER_ENGINE": bench.engine, "WORKER_PRECISION": bench.precision,
                  "WORKER_BATCH_SIZE": str(bench.batch_size), "WORKER_PIPELINES": str(bench.pipelines),
                  "WORKER_MAX_OUTSTANDING_MESSAGES": str(max(256, 4 * bench.batch_size))}
    stack.stop_worker()
    if not worker_only:
        stack.start_worker(**worker_env)
    upload_s = upload_all(config, images, run_id, threads)
    if worker_only:
        time.sleep(2.0)  # let the last notifications become jobs before the worker starts
        stack.start_worker(**worker_env)
    done = wait_rows(config, run_id, len(images), timeout_s)
    stats = bigquery_rows(config, STATS_SQL, {"run_id": run_id})[0]
    span_ms = stats["worker_span_ms"] if worker_only else stats["pipeline_span_ms"]
    stats.update(run_id=run_id, uploaded=len(images), done=done, upload_s=upload_s,
                 images_per_s=done / (span_ms / 1000.0) if span_ms else 0.0,
                 upload_per_s=len(images) / upload_s)
    return stats


def bottleneck(stats: dict, worker_only: bool) -> str:
    stages = {"notification": stats["to_function_ms"] or 0, "pubsub": stats["to_worker_ms"] or 0,
              "batch queue": stats["queue_ms"] or 0, "download": stats["download_ms"] or 0,
              "decode": stats["preprocess_ms"] or 0, "inference": (stats["inference_ms"] or 0) * (stats["mean_batch"] or 1)}
    if worker_only:
        stages.pop("notification")
        stages.pop("pubsub")
    if not worker_only and stats["upload_per_s"] < 1.1 * stats["images_per_s"]:
        return f"upload {stats['upload_per_s']:.0f}/s"
    return max(stages, key=stages.get)


@click.command()
@click.option("--images", "count", default=2000, show_default=True, help="images per configuration")
@click.option("--engines", default="openvino", show_default=True)
@click.option("--precisions", default="f32,bf16", show_default=True)
@click.option("--batch-sizes", default="32", show_default=True)
@click.option("--pipelines", default="2", show_default=True, help="worker batches in flight")
@click.option("--worker-only", is_flag=True, help="measure the worker alone on a pre-filled backlog")
@click.option("--upload-threads", default=16, show_default=True)
@click.option("--timeout", "timeout_s", default=600.0, show_default=True)
def main(count, engines, precisions, batch_sizes, pipelines, worker_only, upload_threads, timeout_s) -> None:
    """Run the configuration matrix on a fresh local stack and print one table."""
    config = StackConfig.from_env()
    matrix = [BenchConfig(e, p, int(b), int(w)) for e, p, b, w in product(
        engines.split(","), precisions.split(","), batch_sizes.split(","), pipelines.split(","))]
    images = bench_images(count)
    stack = Stack(config)
    rows = []
    try:
        with console.status("starting the local stack"):
            stack.up(with_worker=False)
        for bench in matrix:
            console.print(f"[bold]{bench}[/bold] ({'worker only' if worker_only else 'pipeline'}, {count} images)")
            stats = run_config(stack, bench, images, worker_only, upload_threads, timeout_s)
            stats["bare_ms"] = bare_engine_ms_per_image(config.model_dir, bench.engine, bench.precision,
                                                        max(1, round(stats["mean_batch"] or 1)))
            rows.append((bench, stats))
    finally:
        stack.down()
    table = Table(title=f"{'Worker alone, pre-filled backlog' if worker_only else 'Pipeline, upload -> row'}: "
                        f"{count} images per configuration (ms unless noted)")
    for column in ("engine", "prec", "batch", "pipes", "rows", "img/s", "e2e p50", "e2e p95", "e2e p99",
                   "worker p50", "infer/img", "bare/img", "ratio", "download", "decode", "bottleneck"):
        table.add_column(column, justify="right", no_wrap=True)
    for bench, s in rows:
        table.add_row(bench.engine, bench.precision, str(bench.batch_size), str(bench.pipelines),
                      f"{s['done']}/{s['uploaded']}", f"{s['images_per_s']:.0f}", f"{s['e2e_p50_ms']:.0f}",
                      f"{s['e2e_p95_ms']:.0f}", f"{s['e2e_p99_ms']:.0f}", f"{s['worker_p50_ms']:.0f}",
                      f"{s['inference_p50_ms']:.2f}", f"{s['bare_ms']:.2f}",
                      f"{s['inference_p50_ms'] / s['bare_ms']:.2f}", f"{s['download_ms']:.1f}",
                      f"{s['preprocess_ms']:.1f}", bottleneck(s, worker_only))
    console.print(table)
    if any(s["done"] < s["uploaded"] for _, s in rows):
        raise SystemExit("some images have no row: see .run/logs")


if __name__ == "__main__":
    main()
