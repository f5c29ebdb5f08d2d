"""The images in docker/, as `make images` built them, run for real in containers: the OpenVINO
worker against the local stack's emulators (non-root, health, readiness, /classify, a pulled job's
row, HEALTHCHECK, SIGTERM drain within the deployment's stop timeout, no TensorFlow and no training
code, size within budget), and every other image's own ENTRYPOINT and CMD.

Engine and tags come from localcloud/containers.py. Without an engine or a built image these tests
skip, unless REQUIRE_IMAGES=1 (set by `make test`, which builds the images first): then they fail.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass

import pytest
import requests

from localcloud import containers
from localcloud.config import REPO_ROOT, free_ports
from tests.helpers import IsolatedWorker, demo_images_the_model_gets_right, new_run_id, png_bytes, upload
from tests.test_infra import load_yaml

pytestmark = [pytest.mark.images, pytest.mark.slow]

# What each image may weigh (MB, as the engine reports the uncompressed image), with the Debian
# base of `make base-image` (225 MB: Debian's python3 brings more than python:3.11-slim's 125 MB).
# The OpenVINO worker: base + OpenVINO's wheel (184 MB installed: every plugin and frontend it
# ships) + numpy, grpc, the Google clients and both web frameworks. README "Container images".
SIZE_BUDGET_MB = {
    "worker-openvino": 680,
    "worker-tensorflow": 2300,
    "train": 2700,
    "function": 360,
    "localcloud": 360,
    "local-bigquery": 1050,
    "pubsub-emulator": 720,
    "fake-gcs-server": 290,
}
READY_TIMEOUT_S = 180.0


def _missing(message: str):
    if os.environ.get("REQUIRE_IMAGES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def require_image(name: str) -> str:
    """The image's tag, once the engine is known to hold it (else skip, or fail under REQUIRE_IMAGES=1)."""
    try:
        engine = containers.engine()
    except containers.EngineError as exc:
        _missing(str(exc))
    tag = containers.image_tag(name)
    if not containers.image_exists(tag, engine):
        _missing(f"{tag} is not built ({engine.name}): run `make images`")
    return tag


def stop_timeout_s() -> int:
    """The stop timeout the deployments give the worker: the instance template (infra/worker.tf)
    and compose (stop_grace_period) must agree, and the worker must drain within it."""
    terraform = re.search(r"stop_timeout_s\s*=\s*(\d+)", (REPO_ROOT / "infra" / "worker.tf").read_text())
    assert terraform, "infra/worker.tf no longer sets stop_timeout_s"
    compose = load_yaml(REPO_ROOT / "docker" / "docker-compose.yml")
    grace = {compose["services"][s]["stop_grace_period"] for s in ("worker", "worker-tensorflow", "worker-tfserving")}
    assert grace == {f"{terraform.group(1)}s"}, f"compose stop_grace_period {grace} != infra's {terraform.group(1)} s"
    return int(terraform.group(1))


def wait_for_http(container: containers.Container, url: str, timeout_s: float = READY_TIMEOUT_S,
                  accept=lambda r: r.status_code == 200) -> requests.Response:
    """Poll url until accept(response); fail with the container's log if it exits or never answers."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = requests.get(url, timeout=5)
            if accept(response):
                return response
            last = f"HTTP {response.status_code}: {response.text[:300]}"
        except requests.RequestException as exc:
            last = str(exc)
        if not container.running():
            pytest.fail(f"{container.image} exited ({container.wait()}) before {url} answered:\n{container.logs()[-4000:]}")
        time.sleep(1)
    pytest.fail(f"{container.image}: {url} did not answer within {timeout_s:.0f} s ({last}):\n{container.logs()[-4000:]}")


def healthcheck(container: containers.Container) -> subprocess.CompletedProcess:
    """Run the image's HEALTHCHECK once (without systemd, podman runs health checks only when asked)."""
    if container.eng.name != "podman":
        pytest.skip("health checks are run on demand with podman only; Docker runs them on its own")
    return container.eng.call("healthcheck", "run", container.name, check=False)


# --- The OpenVINO worker ------------------------------------------------------------------------

@dataclass
class RunningWorker:
    container: containers.Container
    url: str
    worker: IsolatedWorker


@pytest.fixture(scope="module")
def openvino_worker(stack, model_dir):
    """The OpenVINO worker image serving (HTTP + pull) on the host's network, against the stack's
    emulators, with its own subscription and tables and the demo model mounted read-only."""
    tag = require_image("worker-openvino")
    worker = IsolatedWorker(stack, "image-openvino")
    config = stack.config
    port = free_ports(1)[0]
    env = {
        **config.client_env(),
        "WORKER_SUBSCRIPTION": worker.subscription,
        "WORKER_RESULTS_TABLE": config.table_id(worker.results_table),
        "WORKER_ERRORS_TABLE": config.table_id(worker.errors_table),
        "WORKER_HTTP_PORT": str(port),
        "WORKER_MODEL_DIR": "/models/mounted/1",
    }
    container = containers.start(tag, network_host=True, env=env, volumes={str(model_dir): "/models/mounted/1:ro"},
                                 stop_timeout_s=stop_timeout_s(), name=f"test-worker-openvino-{uuid.uuid4().hex[:6]}")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(container, f"{url}/readyz")
        yield RunningWorker(container, url, worker)
    finally:
        container.remove()
        worker.close()


def test_openvino_worker_runs_as_non_root(openvino_worker):
    container = openvino_worker.container
    assert container.inspect()["Config"]["User"] == "10001:10001"
    assert container.exec(["id", "-u"]).stdout.strip() == "10001"


def test_openvino_worker_is_alive_and_ready(openvino_worker):
    assert requests.get(f"{openvino_worker.url}/healthz", timeout=10).json() == {"status": "alive"}
    ready = requests.get(f"{openvino_worker.url}/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"model": "ok", "pull": "ok", "sink": "ok"}}


def test_openvino_worker_classifies_demo_images(openvino_worker):
    for class_name, path in demo_images_the_model_gets_right(per_class=1):
        response = requests.post(f"{openvino_worker.url}/classify", data=path.read_bytes(),
                                 headers={"Content-Type": "image/png"}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["label"] == class_name and body["engine"] == "openvino" and body["model_name"] == "demo"


def test_openvino_worker_pulls_an_upload_into_its_row(stack, openvino_worker):
    run_id = new_run_id()
    upload(stack, f"{stack.config.prefix}{run_id}/container.png", png_bytes(3), run_id)
    counts = openvino_worker.worker.wait(run_id, expected=1, timeout_s=120)
    assert counts["results"] == 1, counts


def test_openvino_worker_health_check_passes(openvino_worker):
    result = healthcheck(openvino_worker.container)
    assert result.returncode == 0, f"HEALTHCHECK failed: {result.stdout}{result.stderr}"
    assert "healthy" in result.stdout + result.stderr or result.returncode == 0


def test_openvino_image_holds_no_tensorflow_and_no_training_code():
    tag = require_image("worker-openvino")
    probe = ("import importlib.util, json, importlib.metadata as m; "
             "print(json.dumps({'modules': [n for n in ('tensorflow', 'keras', 'modelkit', 'nncf', 'onnx', 'skimage') "
             "if importlib.util.find_spec(n)], 'dists': sorted(d.metadata['Name'].lower() for d in m.distributions())}))")
    found = json.loads(containers.run(tag, ["-c", probe], entrypoint="python").stdout)
    assert found["modules"] == [], f"{tag} can import {found['modules']}"
    assert not {d for d in found["dists"] if d.startswith(("tensorflow", "keras", "tf-", "nncf"))}, found["dists"]
    assert "openvino" in found["dists"]
    listing = containers.run(tag, ["-c", "import os; print('\\n'.join(os.listdir('/app')))"], entrypoint="python")
    assert set(listing.stdout.split()) == {"worker", "functions", "modelspec"}


@pytest.mark.parametrize("name", sorted(SIZE_BUDGET_MB))
def test_image_size_within_budget(name):
    tag = require_image(name)
    size_mb = containers.image_size_bytes(tag) / 1e6
    print(f"{tag}: {size_mb:.0f} MB (budget {SIZE_BUDGET_MB[name]} MB)")
    assert size_mb <= SIZE_BUDGET_MB[name], f"{tag} weighs {size_mb:.0f} MB, over its {SIZE_BUDGET_MB[name]} MB budget"


def test_openvino_worker_drains_on_sigterm_within_the_stop_timeout(stack, openvino_worker):
    """Last of the worker's tests: it stops the module's container."""
    run_id = new_run_id()
    for index in range(4):
        upload(stack, f"{stack.config.prefix}{run_id}/drain-{index}.png", png_bytes(20 + index), run_id)
    container = openvino_worker.container
    # `stop` sends SIGTERM, then SIGKILL (exit 137) once the stop timeout has passed.
    exit_code = container.stop(stop_timeout_s())
    logs = container.logs()
    assert exit_code == 0, f"exit {exit_code} after SIGTERM (137: killed at the stop timeout):\n{logs[-3000:]}"
    assert "queued messages returned for redelivery" in logs, logs[-3000:]


# --- Every other image: its own ENTRYPOINT and CMD ----------------------------------------------

def test_worker_tensorflow_image_serves_in_process_and_through_the_tf_serving_stand_in(stack, model_dir):
    """The tensorflow/serving image cannot be pulled here (no registry): the project's stand-in
    (python -m modelkit tfserving-standin, from the training image) takes its place."""
    tag = require_image("worker-tensorflow")
    train = require_image("train")
    worker = IsolatedWorker(stack, "image-tensorflow")
    config = stack.config
    grpc_port, rest_port, tf_port, serving_port = free_ports(4)
    tables = {"WORKER_SUBSCRIPTION": worker.subscription, "WORKER_PULL": "false",
              "WORKER_RESULTS_TABLE": config.table_id(worker.results_table),
              "WORKER_ERRORS_TABLE": config.table_id(worker.errors_table)}
    standin = containers.start(train, ["tfserving-standin", "--model-name", "demo", "--model-base-path", "/models/demo",
                                       "--model-version", model_dir.name, "--port", str(grpc_port),
                                       "--rest-api-port", str(rest_port)],
                               network_host=True, volumes={str(model_dir.parent): "/models/demo:ro"})
    in_process = containers.start(tag, network_host=True, volumes={str(model_dir): "/models/mounted/1:ro"},
                                  env={**config.client_env(), **tables, "WORKER_HTTP_PORT": str(tf_port),
                                       "WORKER_MODEL_DIR": "/models/mounted/1"})
    serving = None
    try:
        # The worker refuses to start without its model server: the stand-in first.
        wait_for_http(standin, f"http://127.0.0.1:{rest_port}/v1/models/demo")
        serving = containers.start(tag, network_host=True, env={
            **config.client_env(), **tables, "WORKER_HTTP_PORT": str(serving_port), "WORKER_ENGINE": "tfserving",
            "WORKER_TFSERVING_URL": f"http://127.0.0.1:{rest_port}", "WORKER_TFSERVING_PROTOCOL": "rest"})
        class_name, path = demo_images_the_model_gets_right(per_class=1)[0]
        for container, port, engine in ((in_process, tf_port, "tensorflow"), (serving, serving_port, "tfserving")):
            wait_for_http(container, f"http://127.0.0.1:{port}/readyz")
            response = requests.post(f"http://127.0.0.1:{port}/classify", data=path.read_bytes(),
                                     headers={"Content-Type": "image/png"}, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["engine"] == engine and response.json()["label"] == class_name
        assert healthcheck(in_process).returncode == 0
    finally:
        for container in (serving, in_process, standin):
            if container:
                container.remove()
        worker.close()


def test_train_image_default_command_builds_the_demo_model(tmp_path):
    """The default CMD (build-demo into /work) trains and exports a model a worker can load."""
    tag = require_image("train")
    tmp_path.chmod(0o777)  # the image's user (10001) writes here
    result = containers.run(tag, volumes={str(tmp_path): "/work"}, timeout_s=1800)
    manifest = tmp_path / "models" / "demo" / "1" / "manifest.json"
    assert manifest.is_file(), result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads(manifest.read_text())["name"] == "demo"


def free_port_container(tag: str, container_port: int, **options) -> tuple[containers.Container, int]:
    port = free_ports(1)[0]
    return containers.start(tag, ports={port: container_port}, **options), port


def test_function_image_serves_the_function(stack):
    tag = require_image("function")
    container, port = free_port_container(tag, 8080, env={"GOOGLE_CLOUD_PROJECT": stack.config.project,
                                                          "JOBS_TOPIC": "projects/p/topics/jobs",
                                                          "UPLOAD_BUCKET": "uploads"})
    with container:
        # A GET is no CloudEvent: any HTTP answer shows functions-framework serves the target.
        wait_for_http(container, f"http://127.0.0.1:{port}/", timeout_s=60, accept=lambda r: r.status_code < 600)
        assert healthcheck(container).returncode == 0


def test_localcloud_image_default_command_runs():
    tag = require_image("localcloud")
    result = containers.run(tag)
    assert "--subscription" in result.stdout and "--target" in result.stdout


def test_local_bigquery_image_serves_the_api():
    tag = require_image("local-bigquery")
    container, port = free_port_container(tag, 9050)
    with container:
        wait_for_http(container, f"http://127.0.0.1:{port}/bigquery/v2/projects/local-project/datasets", timeout_s=90)
        assert healthcheck(container).returncode == 0


def test_pubsub_emulator_image_serves_pubsub():
    tag = require_image("pubsub-emulator")
    container, port = free_port_container(tag, 8085)
    with container:
        wait_for_http(container, f"http://127.0.0.1:{port}/", timeout_s=90)
        topic = requests.put(f"http://127.0.0.1:{port}/v1/projects/local-project/topics/images-test", timeout=10)
        assert topic.status_code == 200, topic.text
        assert healthcheck(container).returncode == 0


def test_fake_gcs_server_image_serves_storage():
    tag = require_image("fake-gcs-server")
    container, port = free_port_container(tag, 4443)
    with container:
        wait_for_http(container, f"http://127.0.0.1:{port}/storage/v1/b", timeout_s=60)
        assert healthcheck(container).returncode == 0


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- The compose stack: upload with gcloud from the host, row queried with bq -------------------

COMPOSE_SERVICES = ("pubsub-emulator", "fake-gcs-server", "local-bigquery", "localcloud", "function", "worker-openvino")


@pytest.fixture(scope="module")
def compose_stack(tmp_path_factory):
    """docker/docker-compose.yml up (podman-compose) on free host ports, under a project name of its
    own; down with its volumes afterwards."""
    from localcloud.config import StackConfig
    from localcloud.stack import write_cli_configs

    for name in COMPOSE_SERVICES:
        require_image(name)
    engine = containers.engine()
    project = f"images-test-{uuid.uuid4().hex[:6]}"
    ports = dict(zip(containers.COMPOSE_PORTS, free_ports(len(containers.COMPOSE_PORTS))))
    env = {k: str(v) for k, v in ports.items()}
    config = StackConfig(run_dir=tmp_path_factory.mktemp("compose"), pubsub_port=ports["COMPOSE_PUBSUB_PORT"],
                         gcs_http_port=ports["COMPOSE_GCS_PORT"], bigquery_port=ports["COMPOSE_BIGQUERY_PORT"])
    cli = {**os.environ, **write_cli_configs(config)}
    try:
        up = containers.compose("up", project, env, engine)
        assert up.returncode == 0, f"compose up: {up.stdout[-3000:]}{up.stderr[-3000:]}"
        yield project, config, cli, ports
    finally:
        logs = containers.compose("logs", project, env, engine, timeout_s=120)
        (config.run_dir / "compose.log").write_text(logs.stdout + logs.stderr)
        containers.compose("down", project, env, engine, timeout_s=300)


def bq_rows(config, cli: dict, sql: str) -> list[dict]:
    result = subprocess.run(["bq", "--api", config.bigquery_url, "--project_id", config.project, "--format=json",
                             "query", "--nouse_legacy_sql", sql], env=cli, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return []
    out = result.stdout.strip()
    return json.loads(out[out.index("["):]) if "[" in out else []


@pytest.mark.timeout(900)
def test_compose_stack_turns_a_gcloud_upload_into_a_row(compose_stack, tmp_path):
    project, config, cli, ports = compose_stack
    worker_url = f"http://127.0.0.1:{ports['COMPOSE_WORKER_PORT']}/readyz"
    deadline = time.monotonic() + 600
    # Ready when the worker is (model warm, pull stream up, BigQuery answers): init has run by then.
    while True:
        try:
            if requests.get(worker_url, timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, f"the compose worker never became ready; logs in {config.run_dir}"
        time.sleep(3)
    run_id = new_run_id()
    image = tmp_path / "compose.png"
    image.write_bytes(png_bytes(11))
    name = f"{config.prefix}{run_id}/compose.png"
    copied = subprocess.run(["gcloud", "storage", "cp", f"--custom-metadata=run_id={run_id}", str(image),
                             f"gs://{config.bucket}/{name}"], env=cli, capture_output=True, text=True, timeout=120)
    assert copied.returncode == 0, copied.stderr[-2000:]
    sql = (f"SELECT object_name, engine FROM `{config.project}.{config.dataset}.{config.results_table}` "
           f"WHERE run_id = '{run_id}'")
    rows: list[dict] = []
    while not rows and time.monotonic() < deadline:
        rows = bq_rows(config, cli, sql)
        time.sleep(2)
    assert len(rows) == 1, f"no row for {name} within the deadline; compose logs in {config.run_dir}"
    assert rows[0]["engine"] == "openvino"
