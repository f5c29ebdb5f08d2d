"""The HTTP face for real, on free ports, against the local stack's emulators and the demo model, one
contract for both web frameworks (`python -m worker serve` with WORKER_WEB_FRAMEWORK=flask: Flask
under gunicorn; fastapi: FastAPI under uvicorn): every endpoint, bad input, push delivery with a
duplicate, push authentication, metrics, pull + HTTP in one process and its SIGTERM drain, and the
SQL framework tables over rows both servers wrote."""

from __future__ import annotations

import datetime as dt
import functools
import importlib.util
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass, replace

import psutil
import pytest
import requests

from localcloud import services
from localcloud.config import REPO_ROOT, free_ports
from localcloud.demo import bigquery_rows
from tests.helpers import IsolatedWorker, demo_images_the_model_gets_right, new_run_id, png_bytes, upload
from tests.http_helpers import FRAMEWORKS, PUSH_AUDIENCE, PUSH_SERVICE_ACCOUNT, CertsServer, push_token
from worker.http.push import envelope_for
from worker.settings import WEB_FRAMEWORKS

pytestmark = [pytest.mark.stack, pytest.mark.slow]

MAX_IMAGE_BYTES = 1_000_000
SERVE = [sys.executable, "-m", "worker", "serve"]


@dataclass
class Server:
    url: str
    worker: IsolatedWorker
    name: str  # of its process (stack.processes)
    framework: str

    @property
    def web_framework_prefix(self) -> str:
        """What rows and answers of this server name, before the versions: "flask ", "fastapi "."""
        return f"{self.framework} "

    @property
    def http_server(self) -> str:
        return f"/{WEB_FRAMEWORKS[self.framework]} "

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url + path, timeout=30, **kwargs)

    def push(self, data: bytes, message_id: str, token: str | None = None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.post("/pubsub/push", json=envelope_for(data, message_id, "projects/p/subscriptions/push"),
                         headers=headers)

    def rows(self, table: str, column: str, value: str) -> list[dict]:
        name = self.worker.results_table if table == "results" else self.worker.errors_table
        return bigquery_rows(self.worker.stack.config, f"SELECT * FROM `${{project}}.${{dataset}}.{name}` "
                             f"WHERE {column} = @value", {"value": value})


def start_server(stack, worker: IsolatedWorker, framework: str, **env: str) -> Server:
    """`python -m worker serve` on the isolated worker's subscription and tables, with the web
    framework given; ready once its model is warm."""
    config = stack.config
    port = free_ports(1)[0]
    name = f"{worker.name}-{framework}"
    service = services.worker(config, name=name, WORKER_SUBSCRIPTION=worker.subscription,
                              WORKER_RESULTS_TABLE=config.table_id(worker.results_table),
                              WORKER_ERRORS_TABLE=config.table_id(worker.errors_table), WORKER_BATCHES_TABLE="",
                              WORKER_HTTP_PORT=str(port), WORKER_HTTP_THREADS="4",
                              WORKER_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES), WORKER_WEB_FRAMEWORK=framework, **env)
    stack.processes.start(replace(service, argv=SERVE, ports=(port,)))
    return Server(f"http://127.0.0.1:{port}", worker, name, framework)


@pytest.fixture(scope="module")
def certs():
    server = CertsServer()
    yield server
    server.close()


class PushServers:
    """Push-only servers (WORKER_PULL=false) with push authentication on (certificates from the test
    key), one per web framework, started when first asked for and writing to the same tables."""

    def __init__(self, stack, certs):
        self.stack, self.certs = stack, certs
        self.tables = IsolatedWorker(stack, "http-push")
        self._servers: dict[str, Server] = {}

    def get(self, framework: str) -> Server:
        if framework not in self._servers:
            self._servers[framework] = start_server(
                self.stack, self.tables, framework, WORKER_PULL="false", WORKER_HTTP_PUSH_AUDIENCE=PUSH_AUDIENCE,
                WORKER_HTTP_PUSH_SERVICE_ACCOUNT=PUSH_SERVICE_ACCOUNT, WORKER_HTTP_PUSH_CERTS_URL=self.certs.url)
        return self._servers[framework]

    def close(self) -> None:
        for server in self._servers.values():
            self.stack.processes.stop(server.name, timeout_s=30)
        self.tables.close()


@pytest.fixture(scope="module")
def push_servers(stack, certs):
    servers = PushServers(stack, certs)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(params=FRAMEWORKS)
def push_server(request, push_servers) -> Server:
    """The contract's server: each test runs against both frameworks (both servers stay up)."""
    return push_servers.get(request.param)


def wait_for_rows(server: Server, table: str, column: str, value: str, expected: int = 1,
                  timeout_s: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = server.rows(table, column, value)
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def job_for_upload(stack, name: str, data: bytes, run_id: str) -> bytes:
    """Upload outside the notified prefix (so the pipeline leaves it alone) and build the job the
    Cloud Function would publish for it, with the function's own code."""
    import json

    from cloudevents.http import CloudEvent

    from worker.clients import storage_client

    upload(stack, name, data, run_id)
    blob = storage_client(stack.config.project, stack.config.client_env()).bucket(stack.config.bucket).get_blob(name)
    event = CloudEvent({"id": uuid.uuid4().hex, "type": "google.cloud.storage.object.v1.finalized",
                        "source": f"//storage.googleapis.com/projects/_/buckets/{blob.bucket.name}"},
                       blob._properties)
    return json.dumps(function_module().build_job(event, dt.datetime.now(dt.timezone.utc))).encode()


@functools.cache
def function_module():
    # main.py imports storage_job from its own directory, which functions-framework puts on sys.path.
    if str(REPO_ROOT / "functions") not in sys.path:
        sys.path.append(str(REPO_ROOT / "functions"))
    spec = importlib.util.spec_from_file_location("function_main_for_http_tests", REPO_ROOT / "functions" / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_health_and_readiness(push_server):
    assert push_server.get("/healthz").json() == {"status": "alive"}
    ready = push_server.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"model": "ok", "pull": "disabled", "sink": "ok"}}


def test_classify_a_demo_image(push_server):
    class_name, path = demo_images_the_model_gets_right(per_class=1)[1]
    response = push_server.post("/classify", data=path.read_bytes(), headers={"Content-Type": "image/png"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == class_name and body["engine"] == "openvino" and body["precision"] == "f32"
    assert body["model_name"] == "demo" and body["web_framework"].startswith(push_server.web_framework_prefix)
    assert push_server.http_server in body["web_framework"] and body["timings_ms"]["total"] > 0


def test_classify_multipart(push_server):
    files = {"image": ("x.png", png_bytes(1), "image/png")}
    assert push_server.post("/classify", files=files).status_code == 200


@pytest.mark.parametrize("data, status, reason", [
    (b"just some text, not an image", 415, "not_an_image"),
    (png_bytes(2)[:-40], 400, "corrupt_image"),
    (bytes(MAX_IMAGE_BYTES + 1), 413, "too_many_bytes"),
    (bytes(MAX_IMAGE_BYTES + 500_000), 413, "too_many_bytes"),
])
def test_classify_refuses_bad_input_with_a_reason(push_server, data, status, reason):
    response = push_server.post("/classify", data=data, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == status and response.json()["error"] == reason


def test_classify_record_lands_a_row_in_bigquery(push_server):
    run_id = new_run_id()
    response = push_server.post(f"/classify?record=true&run_id={run_id}&name=direct.png", data=png_bytes(3))

    assert response.status_code == 200 and response.json()["recorded"] is True
    [row] = push_server.rows("results", "run_id", run_id)
    assert row["event_key"] == response.json()["event_key"] and row["bucket"] == "(http)"
    assert row["object_name"] == "direct.png" and row["web_framework"] == response.json()["web_framework"]
    assert row["label"] == response.json()["label"] and row["total_ms"] > 0


def test_a_push_writes_its_row_before_answering_and_a_duplicate_adds_none(stack, push_server):
    run_id = new_run_id()
    job = job_for_upload(stack, f"pushed/{run_id}/a.png", png_bytes(4), run_id)
    message_id = f"push-{run_id}"

    first = push_server.push(job, message_id, push_token())
    rows = push_server.rows("results", "run_id", run_id)  # no waiting: 204 means written
    again = push_server.push(job, message_id, push_token())

    assert (first.status_code, again.status_code) == (204, 204)
    assert len(rows) == 1 and rows[0]["message_id"] == message_id
    assert rows[0]["web_framework"].startswith(push_server.web_framework_prefix)  # push-only: rows name the server
    time.sleep(1.0)
    assert len(push_server.rows("results", "run_id", run_id)) == 1


def test_a_malformed_push_is_acked_with_an_error_row(push_server):
    message_id = f"push-bad-{uuid.uuid4().hex[:8]}"
    response = push_server.push(b'{"bucket": "uploads"}', message_id, push_token())
    assert response.status_code == 204
    [row] = push_server.rows("errors", "message_id", message_id)
    assert row["reason"] == "malformed_job"


# Tokens are minted when the test runs, not when pytest collects it: a token minted at collection
# had expired (600 s) by the time a slow machine reached this test, and 401 came back for 403.
@pytest.mark.parametrize("make_token, status", [
    (lambda: None, 401),
    (lambda: "not-a-jwt", 401),
    (lambda: push_token(audience="https://someone-else.test/push"), 401),
    (lambda: push_token(email="intruder@other.iam.gserviceaccount.com"), 403),
], ids=["no-token", "not-a-jwt", "other-audience", "other-account"])
def test_a_push_without_the_right_token_is_refused(push_server, make_token, status):
    message_id = f"push-refused-{uuid.uuid4().hex[:8]}"
    response = push_server.push(b'{"bucket": "uploads"}', message_id, make_token())
    assert response.status_code == status, response.text
    assert push_server.rows("errors", "message_id", message_id) == []


def test_metrics_after_the_requests(push_server):
    from prometheus_client.parser import text_string_to_metric_families

    text = push_server.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("worker_images_total", (("source", "classify"),))] >= 3
    assert samples[("worker_images_total", (("source", "pipeline"),))] >= 1
    assert samples[("worker_errors_total", (("reason", "not_an_image"), ("source", "classify")))] >= 1
    assert samples[("worker_errors_total", (("reason", "malformed_job"), ("source", "pipeline")))] >= 1
    assert samples[("worker_deliveries_total", (("outcome", "duplicate"),))] >= 1
    assert samples[("worker_http_requests_total", (("endpoint", "/pubsub/push"), ("method", "POST"),
                                                   ("status", "401")))] >= 2
    assert samples[("worker_batch_size_count", (("source", "classify"),))] >= 1
    assert samples[("worker_ready", ())] == 1
    [info] = [labels for (name, labels) in samples if name == "worker_model_info"]
    assert ("engine", "openvino") in info and ("model_version", "1") in info


def test_one_server_process_holds_the_model(stack, push_server):
    process = stack.processes.process(push_server.name)
    children = process.children()
    # gunicorn: the master and one worker (workers = 1); uvicorn serves in the process itself.
    expected = {"flask": 1, "fastapi": 0}[push_server.framework]
    assert len(children) == expected, [c.cmdline() for c in children]
    log = stack.processes.log_file(push_server.name).read_text()
    assert log.count("loaded on openvino") == 1  # one model in memory


def test_a_two_second_load_smoke(push_server, tmp_path):
    """make loadtest's wrk script against the server: all answers 2xx."""
    if not shutil.which("wrk"):
        if os.environ.get("REQUIRE_CI_TOOLS") == "1":
            pytest.fail("wrk is missing: make test installs it (make wrk)")
        pytest.skip("wrk is not installed (make wrk)")
    from localcloud.loadtest import run_wrk, sample_image

    result = run_wrk(f"{push_server.url}/classify", sample_image(tmp_path / "image.png"), connections=2,
                     duration_s=2)
    assert result["requests"] > 10 and sum(result["errors"].values()) == 0
    assert result["latency_us"]["p50"] <= result["latency_us"]["p99"]


def test_the_framework_tables_show_both_frameworks(stack, push_servers):
    """sql/queries' by_engine_framework and by_engine_machine_framework (the seed's tables 3 and 4)
    over rows both servers recorded: one group per framework."""
    from report.queries import load_query

    prefix = new_run_id()
    servers = [push_servers.get(framework) for framework in FRAMEWORKS]
    for server in servers:
        response = server.post(f"/classify?record=true&run_id={prefix}-{server.framework}", data=png_bytes(8))
        assert response.status_code == 200 and response.json()["recorded"] is True
    written = {server.post("/classify", data=png_bytes(9)).json()["web_framework"] for server in servers}
    # The queries read results_dedup; these servers write to tables of their own.
    table = push_servers.tables.results_table
    for name in ("by_engine_framework", "by_engine_machine_framework"):
        sql = load_query(name).sql.replace("${dataset}.results_dedup", f"${{dataset}}.{table}")
        rows = bigquery_rows(stack.config, sql, {"run_id": None, "run_prefix": prefix})
        assert {row["web_framework"] for row in rows} == written, rows
        assert all(row["engine"] == "openvino" and row["images"] == 1 for row in rows), rows
    assert sorted(value.split()[0] for value in written) == sorted(FRAMEWORKS)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_pull_and_http_in_one_process_and_sigterm_drains(stack, framework):
    worker = IsolatedWorker(stack, "http-pull")
    try:
        server = start_server(stack, worker, framework)
        checks = server.get("/readyz").json()["checks"]
        assert checks == {"model": "ok", "pull": "ok", "sink": "ok"}
        run_id = new_run_id()
        upload(stack, f"{stack.config.prefix}{run_id}/pulled.png", png_bytes(5), run_id)

        [row] = wait_for_rows(server, "results", "run_id", run_id, timeout_s=60)
        assert row["web_framework"] is None  # pulled, not served: the views show it as "pull (none)"
        assert server.post("/classify", data=png_bytes(6)).status_code == 200
        # The same process also takes a push: that row names the server it came through.
        pushed_run = new_run_id()
        job = job_for_upload(stack, f"pushed/{pushed_run}/b.png", png_bytes(7), pushed_run)
        assert server.push(job, f"push-{pushed_run}").status_code == 204
        [pushed] = server.rows("results", "run_id", pushed_run)
        assert pushed["web_framework"].startswith(server.web_framework_prefix)
        process = psutil.Process(stack.processes.process(server.name).pid)
        assert len(process.children()) == {"flask": 1, "fastapi": 0}[framework]
        # The instance group's stop: requests finish, pulling stops, queued messages go back, exit 0.
        process.send_signal(signal.SIGTERM)
        assert process.wait(40) == 0
        assert "queued messages returned for redelivery" in stack.processes.log_file(server.name).read_text()
    finally:
        stack.processes.stop(f"{worker.name}-{framework}", timeout_s=30)
        worker.close()
