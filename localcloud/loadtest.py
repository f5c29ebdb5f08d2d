"""`make loadtest`: POST /classify under load on loopback with wrk: engines x web frameworks x
connection counts, in one run.

Each engine gets one `python -m worker serve` per web framework (WORKER_WEB_FRAMEWORK=flask: Flask
under gunicorn, worker/http/gunicorn_conf.py; fastapi: FastAPI under uvicorn,
worker/http/uvicorn_conf.py; WORKER_PULL=false), each warmed by a short unrecorded run. Then wrk
runs for --duration seconds at each connection count, against the frameworks in turn at each
count, so a change in the machine's load falls on both alike. Only wrk's target is busy: the other
server idles. The table gives requests/s and client-side p50/p95/p99, next to what the server
measured itself (/metrics: mean batch size of the engine calls, time inside the server). wrk and
the server share this machine's cores; wrk runs one thread to take as little of them as it can.

/classify touches neither Cloud Storage nor BigQuery, so no stack is needed: the clients point at a
closed local port and /readyz reports the sink unreachable while the model is ready.

  python -m localcloud.loadtest --engines openvino,tensorflow,tfserving --frameworks flask,fastapi \
      --connections 1,4,16 --duration 8
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
FRAMEWORKS = ("flask", "fastapi")  # WORKER_WEB_FRAMEWORK


def server_setup(framework: str, threads: int) -> str:
    """How the server of a framework runs (worker/http/gunicorn_conf.py, uvicorn_conf.py)."""
    if framework == "flask":
        return f"gunicorn: 1 worker (gthread) x {threads} threads, preload off"
    return f"uvicorn: 1 process, uvloop + httptools, {threads} handler threads"


@dataclass(frozen=True)
class LoadPoint:
    """One engine on one web framework at one connection count: what wrk saw and what the server
    measured."""

    engine: str
    precision: str
    engine_version: str
    framework: str  # WORKER_WEB_FRAMEWORK
    web_framework: str  # as rows record it: "flask 3.1.3/gunicorn 27.0.1"
    server: str  # server_setup()
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


def load_point(engine: str, framework: str, facts: dict, server: str, connections: int, duration_s: float,
               wrk: dict, measured: dict) -> LoadPoint:
    latency = wrk["latency_us"]
    seconds = wrk["duration_us"] / 1e6
    return LoadPoint(
        engine=engine, precision=facts["precision"], engine_version=facts["engine_version"], framework=framework,
        web_framework=facts["web_framework"], server=server, connections=connections, duration_s=duration_s,
        requests=wrk["requests"], requests_per_s=wrk["requests"] / seconds if seconds else 0.0,
        p50_ms=latency["p50"] / 1000.0, p95_ms=latency["p95"] / 1000.0, p99_ms=latency["p99"] / 1000.0,
        mean_ms=latency["mean"] / 1000.0, max_ms=latency["max"] / 1000.0, errors=sum(wrk["errors"].values()),
        load_avg_1m=os.getloadavg()[0], **measured,
    )


def server_service(engine: str, framework: str, port: int, threads: int, model_dir: Path,
                   extra_env: dict[str, str]) -> Service:
    env = {
        "GOOGLE_CLOUD_PROJECT": "loadtest", "STORAGE_EMULATOR_HOST": CLOSED_PORT_URL,
        "BIGQUERY_EMULATOR_HOST": CLOSED_PORT_URL, "WORKER_PULL": "false",
        "WORKER_RESULTS_TABLE": "loadtest.none.results", "WORKER_ERRORS_TABLE": "loadtest.none.errors",
        "WORKER_MODEL_DIR": str(model_dir), "WORKER_HTTP_PORT": str(port), "WORKER_HTTP_THREADS": str(threads),
        "WORKER_LOG_LEVEL": "WARNING", "TF_CPP_MIN_LOG_LEVEL": "2", "WORKER_WEB_FRAMEWORK": framework,
        **ENGINES[engine], **extra_env,
    }
    return Service(name=f"serve-{engine}-{framework}", argv=[sys.executable, "-m", "worker", "serve"], env=env,
                   ports=(port,), ready=lambda: _model_ready(f"http://127.0.0.1:{port}"), ready_timeout_s=180.0,
                   stop_timeout_s=30.0)


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


@dataclass(frozen=True)
class Target:
    """One running server: an engine on a web framework."""

    engine: str
    framework: str
    url: str
    server: str  # server_setup()
    facts: dict  # the /classify answer's model facts (precision, engine_version, web_framework)


def warm_up(engine: str, framework: str, url: str, image: Path, connections: list[int], duration_s: float,
            server: str) -> Target:
    facts = requests.post(f"{url}/classify", data=image.read_bytes(), timeout=60).json()
    run_wrk(f"{url}/classify", image, max(connections), min(2.0, duration_s))  # not recorded
    return Target(engine, framework, url, server, facts)


def measure(target: Target, image: Path, connections: int, duration_s: float) -> LoadPoint:
    time.sleep(SETTLE_S)
    before = metric_values(requests.get(f"{target.url}/metrics", timeout=10).text)
    wrk = run_wrk(f"{target.url}/classify", image, connections, duration_s)
    after = metric_values(requests.get(f"{target.url}/metrics", timeout=10).text)
    return load_point(target.engine, target.framework, target.facts, target.server, connections, duration_s, wrk,
                      server_means(before, after))


def run_engine(manager: ProcessManager, engine: str, frameworks: list[str], image: Path, connections: list[int],
               duration_s: float, threads: int, model_dir: Path, on_point) -> list[LoadPoint]:
    """One server per framework for this engine, measured in turn at each connection count."""
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
        targets = []
        for framework in frameworks:
            port = free_ports(1)[0]
            server = server_service(engine, framework, port, threads, model_dir, extra_env)
            manager.start(server)
            started.append(server.name)
            targets.append(warm_up(engine, framework, f"http://127.0.0.1:{port}", image, connections, duration_s,
                                   server_setup(framework, threads)))
        points = []
        for count in connections:
            for target in targets:
                points.append(measure(target, image, count, duration_s))
                on_point(points[-1])
        return points
    finally:
        for name in reversed(started):
            manager.stop(name, timeout_s=30)


def table_order(points: list[LoadPoint], engines: list[str], frameworks: list[str],
                connections: list[int]) -> list[LoadPoint]:
    """Engine, then framework, then connections, in the order asked for (not the order measured)."""
    return sorted(points, key=lambda p: (engines.index(p.engine), frameworks.index(p.framework),
                                         connections.index(p.connections)))


def print_table(points: list[LoadPoint]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="POST /classify on loopback (wrk, 1 thread; Flask under gunicorn, FastAPI under uvicorn)")
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
@click.option("--frameworks", default=",".join(FRAMEWORKS), show_default=True,
              help="web frameworks (WORKER_WEB_FRAMEWORK), comma-separated: flask (gunicorn), fastapi (uvicorn)")
@click.option("--connections", default="1,4,16", show_default=True, help="wrk connection counts, comma-separated")
@click.option("--duration", "duration_s", type=click.FloatRange(min=1), default=8.0, show_default=True,
              help="seconds of load per connection count")
@click.option("--threads", type=click.IntRange(min=1), default=8, show_default=True,
              help="request threads of either server (WORKER_HTTP_THREADS)")
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=MODEL_DIR, show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path, file_okay=False), default=OUT_DIR, show_default=True)
def main(engines: str, frameworks: str, connections: str, duration_s: float, threads: int, model_dir: Path,
         out_dir: Path) -> None:
    """Load-test POST /classify per engine and web framework with wrk; print the table, write out-dir/*.json."""
    chosen = choose(engines, ENGINES, "--engines")
    web_frameworks = choose(frameworks, FRAMEWORKS, "--frameworks")
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
        click.echo(f"{engine}: starting a server per framework ({', '.join(web_frameworks)}; model load and "
                   "warm-up) ...", err=True)
        try:
            points += run_engine(manager, engine, web_frameworks, image, counts, duration_s, threads, model_dir,
                                 on_point=lambda p: click.echo(f"  {p.framework:>7} {p.connections:>3} connections: "
                                                               f"{p.requests_per_s:.1f} req/s, p50 {p.p50_ms:.1f} ms",
                                                               err=True))
        except StackError as exc:
            raise click.ClickException(str(exc))
    points = table_order(points, chosen, web_frameworks, counts)
    print_table(points)
    from worker.http import uvicorn_conf
    from worker.settings import HttpSettings

    uvicorn = uvicorn_conf.config_kwargs(HttpSettings(threads=threads))
    settings = {"engines": chosen, "frameworks": web_frameworks, "connections": counts, "duration_s": duration_s,
                "gunicorn_workers": 1, "gunicorn_worker_class": "gthread", "gunicorn_threads": threads,
                "preload_app": False, "uvicorn_workers": 1, "uvicorn_loop": uvicorn["loop"],
                "uvicorn_http": uvicorn["http"], "uvicorn_handler_threads": threads,
                "uvicorn_limit_concurrency": uvicorn["limit_concurrency"], "wrk_threads": 1,
                "image_bytes": image.stat().st_size}
    click.echo(f"results: {write_results(points, settings, out_dir)}", err=True)


def choose(value: str, known, option: str) -> list[str]:
    """A comma-separated option -> its names, each known, in the order given, once each."""
    chosen = list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise click.BadParameter(f"unknown {unknown or 'none given'}; known: {', '.join(known)}", param_hint=option)
    return chosen


if __name__ == "__main__":
    main()
