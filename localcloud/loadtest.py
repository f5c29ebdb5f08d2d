"""`make loadtest`: POST /classify under load on loopback with wrk, one engine at a time.

Each engine gets its own `python -m worker serve` (gunicorn with worker/http/gunicorn_conf.py,
WORKER_PULL=false), warmed by a short unrecorded run, then wrk runs for --duration seconds at each
connection count. The table gives requests/s and client-side p50/p95/p99, next to what the server
measured itself (/metrics: mean batch size of the engine calls, time inside the server). wrk and the
server share this machine's cores; wrk runs one thread to take as little of them as it can.

/classify touches neither Cloud Storage nor BigQuery, so no stack is needed: the clients point at a
closed local port and /readyz reports the sink unreachable while the model is ready.

  python -m localcloud.loadtest --engines openvino,tensorflow,tfserving --connections 1,4,16 --duration 8
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import requests

from localcloud.config import REPO_ROOT, free_ports
from localcloud.processes import ProcessManager, Service, StackError

LUA_SCRIPT = Path(__file__).with_name("wrk_classify.lua")
OUT_DIR = REPO_ROOT / "build" / "loadtest"
MODEL_DIR = REPO_ROOT / "build" / "models" / "demo" / "1"
CLOSED_PORT_URL = "http://127.0.0.1:9"  # nothing listens: the clients exist, no call is made
JSON_MARKER = "LOADTEST_JSON "
SETTLE_S = 1.0  # before each measured run: requests of the previous run still in the server finish
ENGINES = {
    "openvino": {"WORKER_ENGINE": "openvino", "WORKER_PRECISION": "f32"},
    "openvino-bf16": {"WORKER_ENGINE": "openvino", "WORKER_PRECISION": "bf16"},
    "openvino-int8": {"WORKER_ENGINE": "openvino", "WORKER_PRECISION": "int8"},
    "tensorflow": {"WORKER_ENGINE": "tensorflow", "WORKER_PRECISION": "f32"},
    "tfserving": {"WORKER_ENGINE": "tfserving", "WORKER_PRECISION": "f32", "WORKER_TFSERVING_PROTOCOL": "rest"},
    "tfserving-grpc": {"WORKER_ENGINE": "tfserving", "WORKER_PRECISION": "f32", "WORKER_TFSERVING_PROTOCOL": "grpc"},
}


@dataclass(frozen=True)
class LoadPoint:
    """One engine at one connection count: what wrk saw and what the server measured."""

    engine: str
    precision: str
    engine_version: str
    web_framework: str
    gunicorn: str
    connections: int
    duration_s: float
    requests: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int  # socket errors, timeouts and non-2xx answers
    mean_batch: float | None  # images per engine call (the micro-batcher), from /metrics
    server_total_ms: float | None  # request received -> answer built, mean, from /metrics
    server_inference_ms: float | None  # the image's share of its engine call, mean
    load_avg_1m: float  # after the run: other work on the machine shows here


def wrk_command(url: str, connections: int, duration_s: float, threads: int = 1) -> list[str]:
    return ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s",
            "-s", str(LUA_SCRIPT), url]


def parse_wrk_output(stdout: str) -> dict:
    """The JSON line the Lua script prints at the end of a run."""
    for line in stdout.splitlines():
        if line.startswith(JSON_MARKER):
            return json.loads(line[len(JSON_MARKER):])
    raise RuntimeError(f"wrk printed no {JSON_MARKER.strip()} line (is {LUA_SCRIPT.name} in use?):\n{stdout}")


def run_wrk(url: str, image: Path, connections: int, duration_s: float) -> dict:
    completed = subprocess.run(wrk_command(url, connections, duration_s), capture_output=True, text=True,
                               env={**os.environ, "LOADTEST_IMAGE": str(image)},
                               timeout=duration_s + 60)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr or completed.stdout}")
    return parse_wrk_output(completed.stdout)


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _mean(after: dict, before: dict, name: str, labels: tuple) -> float | None:
    count = after.get((f"{name}_count", labels), 0.0) - before.get((f"{name}_count", labels), 0.0)
    total = after.get((f"{name}_sum", labels), 0.0) - before.get((f"{name}_sum", labels), 0.0)
    return total / count if count else None


def server_means(before: dict, after: dict) -> dict[str, float | None]:
    """Mean batch size and per-request server times (ms) between two /metrics scrapes."""
    def stage(name: str) -> float | None:
        seconds = _mean(after, before, "worker_stage_seconds", (("source", "classify"), ("stage", name)))
        return None if seconds is None else seconds * 1000.0

    return {"mean_batch": _mean(after, before, "worker_batch_size", (("source", "classify"),)),
            "server_total_ms": stage("total"), "server_inference_ms": stage("inference")}


def load_point(engine: str, facts: dict, gunicorn: str, connections: int, duration_s: float, wrk: dict,
               server: dict) -> LoadPoint:
    latency = wrk["latency_us"]
    seconds = wrk["duration_us"] / 1e6
    return LoadPoint(
        engine=engine, precision=facts["precision"], engine_version=facts["engine_version"],
        web_framework=facts["web_framework"], gunicorn=gunicorn, connections=connections, duration_s=duration_s,
        requests=wrk["requests"], requests_per_s=wrk["requests"] / seconds if seconds else 0.0,
        p50_ms=latency["p50"] / 1000.0, p95_ms=latency["p95"] / 1000.0, p99_ms=latency["p99"] / 1000.0,
        mean_ms=latency["mean"] / 1000.0, max_ms=latency["max"] / 1000.0, errors=sum(wrk["errors"].values()),
        load_avg_1m=os.getloadavg()[0], **server,
    )


def server_service(engine: str, port: int, threads: int, model_dir: Path, extra_env: dict[str, str]) -> Service:
    env = {
        "GOOGLE_CLOUD_PROJECT": "loadtest", "STORAGE_EMULATOR_HOST": CLOSED_PORT_URL,
        "BIGQUERY_EMULATOR_HOST": CLOSED_PORT_URL, "WORKER_PULL": "false",
        "WORKER_RESULTS_TABLE": "loadtest.none.results", "WORKER_ERRORS_TABLE": "loadtest.none.errors",
        "WORKER_MODEL_DIR": str(model_dir), "WORKER_HTTP_PORT": str(port), "WORKER_HTTP_THREADS": str(threads),
        "WORKER_LOG_LEVEL": "WARNING", "TF_CPP_MIN_LOG_LEVEL": "2", **ENGINES[engine], **extra_env,
    }
    return Service(name=f"serve-{engine}", argv=[sys.executable, "-m", "worker", "serve"], env=env, ports=(port,),
                   ready=lambda: _model_ready(f"http://127.0.0.1:{port}"), ready_timeout_s=180.0, stop_timeout_s=30.0)


def _model_ready(url: str) -> bool:
    return requests.get(f"{url}/readyz", timeout=2).json()["checks"]["model"] == "ok"


def standin_service(run_dir: Path, model_dir: Path) -> tuple[Service, Path]:
    ready_file = run_dir / "tfserving-standin.ready"
    ready_file.unlink(missing_ok=True)
    grpc_port, rest_port = free_ports(2)
    argv = [sys.executable, "-m", "modelkit", "tfserving-standin", "--model-name", "demo",
            "--model-base-path", str(model_dir.parent), "--model-version", model_dir.name,
            "--port", str(grpc_port), "--rest-api-port", str(rest_port), "--ready-file", str(ready_file)]
    return Service(name="tfserving-standin", argv=argv, env={"TF_CPP_MIN_LOG_LEVEL": "2"},
                   ports=(grpc_port, rest_port), ready=ready_file.is_file, ready_timeout_s=180.0), ready_file


def sample_image(path: Path) -> Path:
    """A 128x128 grayscale PNG like the demo's: a demo image when there is one, else noise."""
    demo = sorted((REPO_ROOT / "build" / "demo-dataset" / "moon").glob("*.png"))[:1]
    if demo:
        shutil.copyfile(demo[0], path)
        return path
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((128, 128)) * 255).astype("uint8")).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def measure_engine(engine: str, url: str, image: Path, connections: list[int], duration_s: float, gunicorn: str,
                   on_point=lambda point: None) -> list[LoadPoint]:
    facts = requests.post(f"{url}/classify", data=image.read_bytes(), timeout=60).json()
    run_wrk(f"{url}/classify", image, max(connections), min(2.0, duration_s))  # warm-up, not recorded
    points = []
    for count in connections:
        time.sleep(SETTLE_S)
        before = metric_values(requests.get(f"{url}/metrics", timeout=10).text)
        wrk = run_wrk(f"{url}/classify", image, count, duration_s)
        after = metric_values(requests.get(f"{url}/metrics", timeout=10).text)
        points.append(load_point(engine, facts, gunicorn, count, duration_s, wrk, server_means(before, after)))
        on_point(points[-1])
    return points


def run_engine(manager: ProcessManager, engine: str, image: Path, connections: list[int], duration_s: float,
               threads: int, model_dir: Path, on_point) -> list[LoadPoint]:
    extra_env: dict[str, str] = {}
    started: list[str] = []
    try:
        if ENGINES[engine]["WORKER_ENGINE"] == "tfserving":
            service, ready_file = standin_service(manager.run_dir, model_dir)
            manager.start(service)
            started.append(service.name)
            ports = json.loads(ready_file.read_text())
            grpc = ENGINES[engine]["WORKER_TFSERVING_PROTOCOL"] == "grpc"
            extra_env["WORKER_TFSERVING_URL"] = (f"127.0.0.1:{ports['grpc_port']}" if grpc
                                                 else f"http://127.0.0.1:{ports['rest_port']}")
        port = free_ports(1)[0]
        server = server_service(engine, port, threads, model_dir, extra_env)
        manager.start(server)
        started.append(server.name)
        gunicorn = f"1 worker (gthread) x {threads} threads, preload off"
        return measure_engine(engine, f"http://127.0.0.1:{port}", image, connections, duration_s, gunicorn, on_point)
    finally:
        for name in reversed(started):
            manager.stop(name, timeout_s=30)


def print_table(points: list[LoadPoint]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="POST /classify on loopback (wrk, 1 thread; server: gunicorn + Flask)")
    columns = ("engine", "precision", "web framework", "conns", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors",
               "mean batch", "server ms", "infer ms/img", "load 1m")
    for column in columns:
        table.add_column(column, justify="left" if column in ("engine", "precision", "web framework") else "right")
    for p in points:
        table.add_row(p.engine, p.precision, p.web_framework, str(p.connections), f"{p.requests_per_s:.1f}",
                      f"{p.p50_ms:.1f}", f"{p.p95_ms:.1f}", f"{p.p99_ms:.1f}", str(p.errors), _fmt(p.mean_batch),
                      _fmt(p.server_total_ms), _fmt(p.server_inference_ms, 2), f"{p.load_avg_1m:.1f}")
    Console(width=200).print(table)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_results(points: list[LoadPoint], settings: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {"settings": settings, "machine": _machine(), "points": [asdict(p) for p in points]}
    path = out_dir / f"loadtest-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(document, indent=2))
    (out_dir / "latest.json").write_text(json.dumps(document, indent=2))
    return path


def _machine() -> dict:
    import psutil

    from worker.sysinfo import machine_facts

    facts = machine_facts()
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    return {"cpu_model": facts.cpu_model, "logical_cores": psutil.cpu_count(), "os": facts.os,
            "python": platform.python_version(), "wrk": wrk_version[0] if wrk_version else "?"}


@click.command()
@click.option("--engines", default="openvino,tensorflow,tfserving", show_default=True,
              help=f"comma-separated, of: {', '.join(ENGINES)}")
@click.option("--connections", default="1,4,16", show_default=True, help="wrk connection counts, comma-separated")
@click.option("--duration", "duration_s", type=click.FloatRange(min=1), default=8.0, show_default=True,
              help="seconds of load per connection count")
@click.option("--threads", type=click.IntRange(min=1), default=8, show_default=True,
              help="gunicorn threads (WORKER_HTTP_THREADS)")
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=MODEL_DIR, show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=OUT_DIR, show_default=True)
def main(engines: str, connections: str, duration_s: float, threads: int, model_dir: Path, out_dir: Path) -> None:
    """Load-test POST /classify per engine with wrk; print the table, write out-dir/*.json."""
    chosen = [name.strip() for name in engines.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in ENGINES]
    if unknown:
        raise click.BadParameter(f"unknown engines {unknown}; known: {', '.join(ENGINES)}", param_hint="--engines")
    if not shutil.which("wrk"):
        raise click.ClickException("wrk is not installed: `make wrk` (Debian package wrk)")
    if not (model_dir / "manifest.json").is_file():
        raise click.ClickException(f"no model at {model_dir}: run `make model`")
    counts = [int(value) for value in connections.split(",")]
    manager = ProcessManager(out_dir / "run")
    out_dir.mkdir(parents=True, exist_ok=True)
    image = sample_image(out_dir / "image.png")
    points: list[LoadPoint] = []
    for engine in chosen:
        click.echo(f"{engine}: starting the server (model load and warm-up) ...", err=True)
        try:
            points += run_engine(manager, engine, image, counts, duration_s, threads, model_dir,
                                 on_point=lambda p: click.echo(f"  {p.connections:>3} connections: "
                                                               f"{p.requests_per_s:.1f} req/s, p50 {p.p50_ms:.1f} ms",
                                                               err=True))
        except StackError as exc:
            raise click.ClickException(str(exc))
    print_table(points)
    settings = {"engines": chosen, "connections": counts, "duration_s": duration_s, "gunicorn_workers": 1,
                "gunicorn_worker_class": "gthread", "gunicorn_threads": threads, "preload_app": False,
                "wrk_threads": 1, "image_bytes": image.stat().st_size}
    click.echo(f"results: {write_results(points, settings, out_dir)}", err=True)


if __name__ == "__main__":
    main()
