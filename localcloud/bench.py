"""`make bench`: the pipeline under load on the local stack, one run id per configuration.

Two modes:
- pipeline: upload N images in parallel and wait for every row (upload -> row);
- worker-only: fill the jobs backlog with the worker stopped, then start it and time how fast it
  drains (the worker alone, without upload and notification costs).
Every configuration also times the bare engine on the same batch size in the same run, so the
worker's per-image inference time is reported as a ratio to the bare call.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from itertools import product
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from localcloud.config import PORT_FIELDS, StackConfig
from localcloud.demo import bigquery_rows, wait_for_rows
from localcloud.stack import Stack

console = Console(width=200)

STATS_SQL = """
WITH rows AS (
  SELECT r.*, b.sink_ms,
    r.end_to_end_ms + COALESCE(b.sink_ms, 0) AS upload_to_row_ms
  FROM `${project}.${dataset}.results_dedup` AS r
  LEFT JOIN `${project}.${dataset}.batches` AS b USING (batch_id)
  WHERE r.run_id = @run_id
)
SELECT
  COUNT(*) AS images,
  TIMESTAMP_DIFF(MAX(processed_at), MIN(received_at), MILLISECOND) AS worker_span_ms,
  TIMESTAMP_DIFF(MAX(processed_at), MIN(object_created_at), MILLISECOND) AS pipeline_span_ms,
  APPROX_QUANTILES(upload_to_row_ms, 100)[OFFSET(50)] AS e2e_p50_ms,
  APPROX_QUANTILES(upload_to_row_ms, 100)[OFFSET(95)] AS e2e_p95_ms,
  APPROX_QUANTILES(upload_to_row_ms, 100)[OFFSET(99)] AS e2e_p99_ms,
  APPROX_QUANTILES(total_ms, 100)[OFFSET(50)] AS worker_p50_ms,
  APPROX_QUANTILES(inference_ms, 100)[OFFSET(50)] AS inference_p50_ms,
  AVG(batch_size) AS mean_batch,
  AVG(created_to_function_ms) AS to_function_ms,
  AVG(function_to_worker_ms) AS to_worker_ms,
  AVG(queue_ms) AS queue_ms,
  AVG(download_ms) AS download_ms,
  AVG(preprocess_ms) AS preprocess_ms,
  AVG(batch_wait_ms) AS batch_wait_ms,
  AVG(batch_inference_ms) AS batch_inference_ms,
  AVG(inference_ms) AS inference_ms,
  AVG(sink_ms) AS sink_ms
FROM rows
"""

# Rows per worker process. Each row records the worker's host name and pid (worker/sysinfo.py):
# on one machine the pid tells the local workers apart, on VMs and pods the host name does.
SHARES_SQL = """
SELECT worker_host, worker_pid, COUNT(*) AS rows
FROM `${project}.${dataset}.results_dedup`
WHERE run_id = @run_id
GROUP BY worker_host, worker_pid
"""

# Stack processes whose CPU the bench watches (names as in localcloud/services.py).
WATCHED = ("worker", "bigquery", "pubsub", "gcs", "function", "eventarc")


class CpuWatch:
    """CPU % per stack process (and the whole machine) between start() and stop()."""

    def __init__(self, stack: Stack, workers: tuple[str, ...] = ()):
        self._stack = stack
        self._workers = workers  # extra worker processes (worker-2, ...) watched like "worker"
        self._start: dict[str, float] = {}
        self._processes: dict = {}

    @staticmethod
    def _cpu(process, with_children: bool = True) -> float:
        total = sum(process.cpu_times()[:2])
        for child in process.children(recursive=True) if with_children else ():
            try:
                total += sum(child.cpu_times()[:2])
            except Exception:
                pass
        return total

    def start(self) -> None:
        import psutil

        self._processes = {name: self._stack.processes.process(name) for name in WATCHED + self._workers}
        self._processes = {name: proc for name, proc in self._processes.items() if proc is not None}
        self._processes["bench"] = psutil.Process()  # uploads and polls BigQuery
        # The bench process is the parent of the whole stack: count only its own threads.
        self._start = {name: self._cpu(proc, name != "bench") for name, proc in self._processes.items()}
        self._machine = psutil.cpu_times()
        self._started = time.monotonic()

    def stop(self) -> dict[str, float]:
        import psutil

        elapsed = max(1e-6, time.monotonic() - self._started)
        self.elapsed_s = elapsed
        usage = {}
        for name, proc in self._processes.items():
            try:
                usage[name] = (self._cpu(proc, name != "bench") - self._start[name]) / elapsed * 100.0
            except Exception:  # the process ended (e.g. a worker restart)
                pass
        now = psutil.cpu_times()
        busy = (sum(now) - now.idle - now.iowait) - (sum(self._machine) - self._machine.idle - self._machine.iowait)
        usage["machine"] = busy / elapsed * 100.0 / psutil.cpu_count()
        # Extra workers count as "worker": the CPU table compares processes, not worker instances.
        for name in self._workers:
            if name in usage:
                usage["worker"] = usage.get("worker", 0.0) + usage.pop(name)
        return usage


@dataclass(frozen=True)
class BenchConfig:
    engine: str
    precision: str
    batch_size: int
    pipelines: int
    workers: int = 1  # worker processes on the one jobs subscription


def noise_png(rng: np.random.Generator, size: int = 128, compress_level: int = 1) -> bytes:
    """A size x size grayscale PNG of noise: distinct bytes for every draw of rng."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(buffer, format="PNG",
                                                                            compress_level=compress_level)
    return buffer.getvalue()


def bench_images(count: int, seed: int = 0) -> list[bytes]:
    """128x128 PNGs of textured noise (distinct bytes, so no two uploads are alike)."""
    rng = np.random.default_rng(seed)
    return [noise_png(rng) for _ in range(count)]


def multipart_upload(http, endpoint: str, bucket: str, name: str, data: bytes, metadata: dict[str, str]) -> int:
    """One JSON-API multipart upload (object metadata + bytes); returns the new generation.

    The load generator must stay light next to the system it loads: this costs ~0.5 ms of CPU per
    object against ~1.4 ms through google-cloud-storage's Blob.upload_from_string.
    """
    boundary = uuid.uuid4().hex
    resource = json.dumps({"name": name, "contentType": "image/png", "metadata": metadata}).encode()
    body = b"".join([f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(), resource,
                     f"\r\n--{boundary}\r\nContent-Type: image/png\r\n\r\n".encode(), data,
                     f"\r\n--{boundary}--\r\n".encode()])
    response = http.request("POST", f"{endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=multipart", body=body,
                            headers={"Content-Type": f"multipart/related; boundary={boundary}"})
    if response.status != 200:
        raise RuntimeError(f"upload of gs://{bucket}/{name} failed: HTTP {response.status} {response.data[:200]!r}")
    return int(json.loads(response.data)["generation"])


def upload_all(config: StackConfig, images: list[bytes], run_id: str, threads: int, rate: float = 0.0) -> float:
    """Upload every image (in parallel; at `rate` per second if given); returns seconds taken."""
    import urllib3

    http = urllib3.PoolManager(maxsize=threads)
    started = time.monotonic()

    def put(index: int) -> None:
        if rate:
            time.sleep(max(0.0, started + index / rate - time.monotonic()))
        multipart_upload(http, config.gcs_url, config.bucket, f"{config.prefix}{run_id}/{index:06d}.png",
                         images[index], {"run_id": run_id})

    with ThreadPoolExecutor(threads) as pool, Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"upload {run_id}" + (f" at {rate:.0f}/s" if rate else ""), total=len(images))
        for _ in pool.map(put, range(len(images))):
            progress.advance(task)
    return time.monotonic() - started


def _loaded_engine(model_dir, engine: str, precision: str):
    from worker.engines import create_engine

    manifest = json.loads((model_dir / "manifest.json").read_text())
    # The same engine settings as the worker under test (WORKER_ENGINE_THREADS via --worker-env).
    instance = create_engine(engine, precision, model_dir, manifest, threads=int(os.environ.get("WORKER_ENGINE_THREADS", 0)))
    instance.load()
    instance.warmup()
    return instance, manifest


class _MemoryFetcher:
    def __init__(self, images: dict[str, bytes]):
        self.images = images

    def fetch(self, job) -> bytes:
        return self.images[job.name]


class _NullSink:
    def __init__(self):
        self.rows: list[dict] = []

    def insert(self, table: str, rows: list[dict]):
        from worker.sink import InsertOutcome

        self.rows.extend(rows)
        return InsertOutcome()


def engine_overhead(model_dir, engine: str, precision: str, batch_size: int, rounds: int = 20) -> dict:
    """The worker's recorded inference time per image against the bare engine call on the same
    batch, interleaved A/B in one process, so machine noise hits both alike. Above 1.0 is what the
    worker adds around the engine call."""
    from worker.batch import BatchRunner, Delivery, Tables
    from modelspec.preprocess import DecodeLimits, preprocess_image
    from modelspec.spec import spec_from_manifest

    instance, manifest = _loaded_engine(model_dir, engine, precision)
    images = {f"{index}.png": data for index, data in enumerate(bench_images(batch_size, seed=7))}
    spec = spec_from_manifest(manifest)
    pixels = np.stack([preprocess_image(data, spec) for data in images.values()])
    sink = _NullSink()
    with ThreadPoolExecutor(8) as pool:
        runner = BatchRunner(engine=instance, manifest=manifest, fetcher=_MemoryFetcher(images), sink=sink,
                             tables=Tables("p.d.results", "p.d.errors"), limits=DecodeLimits(),
                             machine_row={"worker_host": "bench"}, sample_system=dict, io_pool=pool)
        worker_ms, bare_ms = [], []
        for round_index in range(rounds):
            deliveries = [Delivery(
                data=json.dumps({"event_key": f"k{round_index}-{name}", "bucket": "b", "name": name,
                                 "generation": "1"}).encode(),
                message_id=name, delivery_attempt=1, received_at=dt.datetime.now(dt.timezone.utc),
                received_monotonic=time.monotonic(), ack=lambda: None, nack=lambda: None) for name in images]
            runner.run(deliveries)
            worker_ms.append(sink.rows[-1]["inference_ms"])
            started = time.perf_counter()
            instance.infer(pixels)
            bare_ms.append((time.perf_counter() - started) * 1000.0 / batch_size)
    worker, bare = statistics.median(worker_ms), statistics.median(bare_ms)
    return {"worker_ms": worker, "bare_ms": bare, "ratio": worker / bare}


def worker_names(count: int) -> tuple[str, ...]:
    """The stack's worker, then extra ones named worker-2, worker-3, ... (see Stack.start_worker)."""
    return ("worker",) + tuple(f"worker-{index}" for index in range(2, count + 1))


def start_workers(stack: Stack, names: tuple[str, ...], env: dict[str, str]) -> None:
    """Start every worker on the stack's one jobs subscription: they compete for its messages."""
    for name in names:
        stack.start_worker(name, **env)


def stop_workers(stack: Stack, names: tuple[str, ...]) -> None:
    for name in names:
        stack.stop_worker(name)


def worker_shares(pids: dict[str, int], rows: list[dict]) -> dict[str, int]:
    """Rows per worker name, from SHARES_SQL rows and the pid each worker was started with.
    A row from a pid none of them had (a restarted worker) keeps its host/pid as its name."""
    names = {pid: name for name, pid in pids.items()}
    shares: dict[str, int] = {}
    for row in rows:
        name = names.get(row["worker_pid"], f"{row['worker_host']}/{row['worker_pid']}")
        shares[name] = shares.get(name, 0) + int(row["rows"])
    return dict(sorted(shares.items()))


def run_config(stack: Stack, bench: BenchConfig, images: list[bytes], mode: str, threads: int, rate: float,
               timeout_s: float, extra_env: dict[str, str] | None = None) -> dict:
    config = stack.config
    run_id = (f"bench-{bench.engine}-{bench.precision}-b{bench.batch_size}-p{bench.pipelines}"
              + (f"-w{bench.workers}" if bench.workers > 1 else "") + f"-{uuid.uuid4().hex[:6]}")
    worker_env = {"WORKER_ENGINE": bench.engine, "WORKER_PRECISION": bench.precision,
                  "WORKER_BATCH_SIZE": str(bench.batch_size), "WORKER_PIPELINES": str(bench.pipelines),
                  "WORKER_MAX_OUTSTANDING_MESSAGES": str(max(256, 4 * bench.pipelines * bench.batch_size)),
                  **(extra_env or {})}
    names = worker_names(bench.workers)
    watch = CpuWatch(stack, workers=names[1:])
    stop_workers(stack, names)
    if mode != "worker-only":
        start_workers(stack, names, worker_env)
        watch.start()
    upload_s = upload_all(config, images, run_id, threads, rate)
    if mode == "worker-only":
        time.sleep(2.0)  # let the last notifications become jobs before the worker starts
        start_workers(stack, names, worker_env)
        watch.start()
    counts = wait_for_rows(config, run_id, len(images), timeout_s, console, poll_s=2.0)
    cpu = watch.stop()
    stats = bigquery_rows(config, STATS_SQL, {"run_id": run_id})[0]
    pids = {name: (stack.processes.record(name) or {}).get("pid") for name in names}
    stats["shares"] = worker_shares(pids, bigquery_rows(config, SHARES_SQL, {"run_id": run_id}))
    span_ms = stats["worker_span_ms"] if mode == "worker-only" else stats["pipeline_span_ms"]
    done = counts["results"] + counts["errors"]
    # CPU ms each process spent per image: noisy machines change throughput, much less this.
    cpu_ms_per_image = {name: pct / 100.0 * watch.elapsed_s * 1000.0 / max(1, done)
                        for name, pct in cpu.items() if name != "machine"}
    stats.update(run_id=run_id, mode=mode, uploaded=len(images), done=done, errors=counts["errors"],
                 upload_s=upload_s, offered_per_s=rate or None, cpu=cpu, cpu_ms_per_image=cpu_ms_per_image,
                 images_per_s=stats["images"] / (span_ms / 1000.0) if span_ms else 0.0,
                 upload_per_s=len(images) / upload_s)
    return stats


def bottleneck(stats: dict) -> str:
    """The stage (or process) that limits this configuration, in words."""
    cpu = stats["cpu"]
    if cpu.get("machine", 0) >= 85:
        top = sorted(((v, k) for k, v in cpu.items() if k != "machine"), reverse=True)[:2]
        return "CPU: " + ", ".join(f"{name} {value:.0f}%" for value, name in top)
    if stats["mode"] == "pipeline" and not stats["offered_per_s"] and stats["upload_per_s"] < 1.1 * stats["images_per_s"]:
        return f"upload {stats['upload_per_s']:.0f}/s"
    stages = {"notification": stats["to_function_ms"], "pubsub": stats["to_worker_ms"],
              "batch queue": stats["queue_ms"], "download": stats["download_ms"], "decode": stats["preprocess_ms"],
              "batch wait": stats["batch_wait_ms"], "inference": stats["batch_inference_ms"], "sink": stats["sink_ms"]}
    if stats["mode"] == "worker-only":
        stages.pop("notification")
        stages.pop("pubsub")
    stages = {name: value or 0.0 for name, value in stages.items()}
    return max(stages, key=stages.get)


def results_table(rows: list[tuple[BenchConfig, dict]], title: str) -> Table:
    table = Table(title=title)
    for column in ("engine", "prec", "batch", "pipes", "rows", "img/s", "e2e p50", "e2e p95", "e2e p99",
                   "worker p50", "infer/img", "bare/img", "load ratio", "A/B ratio", "download", "decode", "sink", "cpu %",
                   "bottleneck"):
        table.add_column(column, justify="right", no_wrap=column != "bottleneck")
    for bench, s in rows:
        cpu = s["cpu"]
        table.add_row(bench.engine, bench.precision, str(bench.batch_size), str(bench.pipelines),
                      f"{s['done']}/{s['uploaded']}", f"{s['images_per_s']:.0f}", _ms(s["e2e_p50_ms"], 0),
                      _ms(s["e2e_p95_ms"], 0), _ms(s["e2e_p99_ms"], 0), _ms(s["worker_p50_ms"], 0),
                      _ms(s["inference_p50_ms"], 2), _ms(s["bare_ms"], 2),
                      f"{s['inference_p50_ms'] / s['bare_ms']:.2f}" if s["inference_p50_ms"] else "-",
                      f"{s['overhead']['ratio']:.2f}",
                      _ms(s["download_ms"], 1), _ms(s["preprocess_ms"], 1), _ms(s["sink_ms"], 0),
                      f"{cpu.get('machine', 0):.0f}", bottleneck(s))
    return table


def cpu_table(rows: list[tuple[BenchConfig, dict]]) -> Table:
    """Where the CPU went: ms of CPU per image in each process of the stack (2 cores = 2,000 ms/s)."""
    table = Table(title="CPU ms per image, by process (the whole stack shares this machine's cores)")
    names = [name for name in (*WATCHED, "bench") if any(name in s["cpu_ms_per_image"] for _, s in rows)]
    for column in ("engine", "prec", "batch", "pipes", *names, "sum", "ceiling img/s"):
        table.add_column(column, justify="right")
    cores = os.cpu_count() or 1
    for bench, s in rows:
        per_image = s["cpu_ms_per_image"]
        total = sum(per_image.values())
        table.add_row(bench.engine, bench.precision, str(bench.batch_size), str(bench.pipelines),
                      *(f"{per_image.get(name, 0):.2f}" for name in names), f"{total:.2f}",
                      f"{cores * 1000.0 / total:.0f}" if total else "-")
    return table


def shares_table(rows: list[tuple[BenchConfig, dict]]) -> Table:
    """Each worker's share of the result rows: the subscription spreads the work among them."""
    table = Table(title="Rows per worker (N worker processes on one subscription, on this machine's cores)")
    for column in ("engine", "prec", "batch", "pipes", "workers", "img/s", "rows per worker", "min share",
                   "max share"):
        table.add_column(column, justify="left" if column == "rows per worker" else "right")
    for bench, s in rows:
        shares = s.get("shares") or {}
        total = max(1, sum(shares.values()))
        fractions = [count / total for count in shares.values()] or [0.0]
        table.add_row(bench.engine, bench.precision, str(bench.batch_size), str(bench.pipelines), str(bench.workers),
                      f"{s['images_per_s']:.0f}",
                      ", ".join(f"{name} {count} ({count / total:.0%})" for name, count in shares.items()),
                      f"{min(fractions):.0%}", f"{max(fractions):.0%}")
    return table


def _ms(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@click.command()
@click.option("--images", "count", default=2000, show_default=True, help="images per configuration")
@click.option("--engines", default="openvino", show_default=True)
@click.option("--precisions", default="f32,bf16", show_default=True)
@click.option("--batch-sizes", default="32", show_default=True)
@click.option("--pipelines", default="4", show_default=True, help="worker batches in flight")
@click.option("--workers", default="1", show_default=True,
              help="worker processes on the one subscription (a list runs each: 1,2,3)")
@click.option("--worker-only", is_flag=True, help="measure the worker alone on a pre-filled backlog")
@click.option("--rate", default=0.0, show_default=True, help="offered load in uploads/s (0: as fast as possible)")
@click.option("--upload-threads", default=16, show_default=True)
@click.option("--timeout", "timeout_s", default=600.0, show_default=True)
@click.option("--worker-env", multiple=True, metavar="NAME=VALUE", help="extra worker setting, e.g. WORKER_SINK_LINGER_MS=50")
@click.option("--out", "out_dir", default="build/bench", show_default=True, type=click.Path(path_type=Path),
              help="where the JSON of every run goes")
def main(count, engines, precisions, batch_sizes, pipelines, workers, worker_only, rate, upload_threads, timeout_s, worker_env,
         out_dir) -> None:
    """Run the configuration matrix on a fresh local stack and print one table."""
    # A stack of its own, started empty: the emulators slow down as their tables grow, and a bench
    # must not depend on what earlier runs left behind.
    base = StackConfig.from_env()
    free = StackConfig.with_free_ports(base.run_dir / "bench")  # next to a `make up` stack, if one runs
    config = replace(base, run_dir=free.run_dir, **{name: getattr(free, name) for name in PORT_FIELDS})
    extra_env = dict(item.split("=", 1) for item in worker_env)
    os.environ.update({k: v for k, v in extra_env.items() if k == "WORKER_ENGINE_THREADS"})
    if Stack(config).processes.running():
        raise SystemExit(f"a bench stack is still running in {config.run_dir}: "
                         f"LOCAL_RUN_DIR={config.run_dir} python -m localcloud down")
    shutil.rmtree(config.run_dir, ignore_errors=True)
    mode = "worker-only" if worker_only else "pipeline"
    matrix = [BenchConfig(e, p, int(b), int(w), int(n)) for e, p, b, w, n in product(
        engines.split(","), precisions.split(","), batch_sizes.split(","), pipelines.split(","), workers.split(","))]
    images = bench_images(count)
    stack = Stack(config)
    rows = []
    try:
        with console.status("starting the local stack"):
            stack.up(with_worker=False)
        for bench in matrix:
            console.print(f"[bold]{bench}[/bold] ({mode}, {count} images"
                          + (f", offered {rate:.0f}/s" if rate else "") + ")")
            stats = run_config(stack, bench, images, mode, upload_threads, rate, timeout_s, extra_env)
            # The bare engine gets the machine to itself, as it would in a micro-benchmark.
            stop_workers(stack, worker_names(bench.workers))
            batch = max(1, round(stats["mean_batch"] or 1))
            # One engine load gives both: the bare call on the quiet machine, and the A/B ratio.
            stats["overhead"] = engine_overhead(config.model_dir, bench.engine, bench.precision, batch)
            stats["bare_ms"] = stats["overhead"]["bare_ms"]
            stats["bottleneck"] = bottleneck(stats)
            rows.append((bench, stats))
    finally:
        stack.down()
    title = ("Worker alone, pre-filled backlog" if worker_only else "Pipeline, upload -> row") + \
        f": {count} images per configuration" + (f", offered {rate:.0f}/s" if rate else "") + " (ms unless noted)"
    console.print(results_table(rows, title))
    console.print(cpu_table(rows))
    if any(bench.workers > 1 for bench, _ in rows):
        console.print(shares_table(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_file.write_text(json.dumps([{"config": asdict(bench), **stats} for bench, stats in rows], indent=2,
                                   default=str))
    console.print(f"written {out_file}; plots and SQL tables of these runs: "
                  f"make report REPORT_ARGS='--run-dir {config.run_dir} --run-prefix bench-'")
    if any(s["done"] < s["uploaded"] for _, s in rows):
        raise SystemExit("some images have no row: see .run/logs")


if __name__ == "__main__":
    main()
