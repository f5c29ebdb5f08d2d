"""Trying the model without the cloud: `python -m worker serve` with WORKER_PULL=false, a local
model and no tables makes no Google client, so it needs no credentials, emulators or project.
Start-up failures name their step and cause (credentials, not "the model did not load")."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import requests

from localcloud.config import free_ports
from localcloud.processes import ProcessManager, Service, StackError
from tests.helpers import demo_images, png_bytes
from worker.http.push import envelope_for
from worker.settings import StartupError, WorkerSettings

SERVE = [sys.executable, "-m", "worker", "serve"]
# What could lead a process to Google: credentials, emulators, gcloud's configuration, the worker's settings.
CLOUD_PREFIXES = ("GOOGLE_", "CLOUDSDK_", "GCE_", "WORKER_")


def without_the_cloud(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """The environment of a newcomer's laptop: no credentials, no emulators, no project, and a
    HOME without gcloud's application default credentials."""
    for name in list(os.environ):
        if name.startswith(CLOUD_PREFIXES) or name.endswith("_EMULATOR_HOST"):
            monkeypatch.delenv(name)
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))


def serve_service(name: str, port: int, model_dir: Path, **env: str) -> Service:
    url = f"http://127.0.0.1:{port}"
    return Service(name=name, argv=SERVE, ports=(port,), ready_timeout_s=120.0, stop_timeout_s=30.0,
                   ready=lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200,
                   env={"WORKER_PULL": "false", "WORKER_MODEL_DIR": str(model_dir), "WORKER_HTTP_PORT": str(port),
                        "WORKER_HTTP_THREADS": "2", **env})


def failed_start(manager: ProcessManager, service: Service, home: Path) -> tuple[str, str, float]:
    """Start a server that must not start: (StackError message, its whole log, seconds to exit)."""
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as monkeypatch:
        without_the_cloud(monkeypatch, home)
        with pytest.raises(StackError) as refused:
            manager.start(service)
    return str(refused.value), manager.log_file(service.name).read_text(), time.monotonic() - started


@pytest.fixture(scope="module")
def manager(tmp_path_factory) -> ProcessManager:
    return ProcessManager(tmp_path_factory.mktemp("serve-offline"))


@pytest.fixture(scope="module")
def offline(manager, model_dir, tmp_path_factory) -> str:
    """`serve` on the demo model with nothing of the cloud; its URL once /readyz is 200."""
    port = free_ports(1)[0]
    with pytest.MonkeyPatch.context() as monkeypatch:
        without_the_cloud(monkeypatch, tmp_path_factory.mktemp("home"))
        manager.start(serve_service("offline", port, model_dir))
    yield f"http://127.0.0.1:{port}"
    manager.stop("offline")


# --- the server (each real-process test starts gunicorn, most load the model: marked slow) --------

@pytest.mark.slow
def test_health_and_readiness_without_tables(offline):
    assert requests.get(f"{offline}/healthz", timeout=10).json() == {"status": "alive"}
    ready = requests.get(f"{offline}/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"model": "ok", "pull": "disabled", "sink": "disabled"}}


@pytest.mark.slow
def test_classify_demo_images_without_the_cloud(offline, model_dir):
    class_names = json.loads((model_dir / "manifest.json").read_text())["class_names"]
    for _, path in demo_images(per_class=1):
        response = requests.post(f"{offline}/classify", data=path.read_bytes(),
                                 headers={"Content-Type": "image/png"}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["label"] in class_names and 0.0 <= body["score"] <= 1.0
        assert body["engine"] == "openvino" and body["model_name"] == "demo" and body["recorded"] is False


@pytest.mark.slow
def test_a_push_without_tables_is_503_no_tables_so_pubsub_keeps_it(offline):
    job = json.dumps({"event_key": "b/a.png#1", "bucket": "b", "name": "a.png", "generation": "1"}).encode()
    response = requests.post(f"{offline}/pubsub/push", json=envelope_for(job, "m-1", "projects/p/subscriptions/s"),
                             timeout=30)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "no_tables" and "WORKER_RESULTS_TABLE" in response.json()["message"]
    recorded = requests.post(f"{offline}/classify?record=true", data=png_bytes(1), timeout=30)
    assert recorded.status_code == 503 and recorded.json()["error"] == "no_tables"


@pytest.mark.slow
def test_metrics_count_classify_and_the_refused_push(offline):
    from prometheus_client.parser import text_string_to_metric_families

    requests.post(f"{offline}/classify", data=png_bytes(2), timeout=30)
    requests.post(f"{offline}/pubsub/push", json=envelope_for(b"{}", "m-2", "projects/p/subscriptions/s"),
                  timeout=30)
    text = requests.get(f"{offline}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("worker_images_total", (("source", "classify"),))] >= 1
    assert samples[("worker_http_requests_total", (("endpoint", "/pubsub/push"), ("method", "POST"),
                                                   ("status", "503")))] >= 1
    assert samples[("worker_ready", ())] == 1


@pytest.mark.slow
def test_the_log_says_once_that_no_tables_are_configured_and_no_client_was_made(manager, offline):
    log = manager.log_file("offline").read_text()
    assert log.count("no tables configured") == 1
    assert "google.auth" not in log and "DefaultCredentialsError" not in log  # no client looked for credentials
    assert "cannot start" not in log and "Traceback" not in log


# --- start-up errors -----------------------------------------------------------------------------

@pytest.mark.slow
def test_pull_without_tables_stops_at_once_naming_them(manager, model_dir, tmp_path):
    service = serve_service("pull-no-tables", free_ports(1)[0], model_dir, WORKER_PULL="true",
                            GOOGLE_CLOUD_PROJECT="p", WORKER_SUBSCRIPTION="projects/p/subscriptions/jobs")
    refused, log, seconds = failed_start(manager, service, tmp_path / "home")
    assert "exited with code 2" in refused, refused
    assert "missing settings: WORKER_RESULTS_TABLE, WORKER_ERRORS_TABLE" in log
    assert "Booting worker" not in log and seconds < 20  # the settings stop it before gunicorn starts


@pytest.mark.slow
def test_tables_without_credentials_stop_naming_the_credentials_not_the_model(manager, model_dir, tmp_path):
    # NO_GCE_CHECK: no credentials from a metadata server either, should the tests run on a GCE VM.
    service = serve_service("no-credentials", free_ports(1)[0], model_dir, GOOGLE_CLOUD_PROJECT="p",
                            WORKER_RESULTS_TABLE="p.d.results", WORKER_ERRORS_TABLE="p.d.errors",
                            NO_GCE_CHECK="true")
    refused, log, _ = failed_start(manager, service, tmp_path / "home")
    assert "exited with code 3" in refused, refused  # gunicorn's boot error: the master stops too
    [line] = [json.loads(line) for line in log.splitlines() if '"exiting: cannot start' in line]
    message = line["message"]
    assert message.startswith("exiting: cannot start: Google clients: ")
    for named in ("google.auth.exceptions.DefaultCredentialsError", "GOOGLE_APPLICATION_CREDENTIALS",
                  "gcloud auth application-default login", "STORAGE_EMULATOR_HOST", "BIGQUERY_EMULATOR_HOST"):
        assert named in message, named
    assert "did not load" not in log and "loaded on" not in log and "Traceback" not in log


# --- in process ----------------------------------------------------------------------------------

def settings_of(model_dir: Path, **env: str) -> WorkerSettings:
    return WorkerSettings.from_env({"WORKER_PULL": "false", "WORKER_MODEL_DIR": str(model_dir), **env})


def test_offline_settings_make_no_google_client(monkeypatch, model_dir):
    from worker import __main__ as cli
    from worker import clients

    def refuse(*_args, **_kwargs):
        raise AssertionError("no Google client may be made without tables")

    for name in ("storage_client", "bigquery_client", "subscriber_client"):
        monkeypatch.setattr(clients, name, refuse)
    monkeypatch.setattr(cli, "authorized_http", refuse)
    assert cli.connect(settings_of(model_dir)) == cli.CloudClients()


def test_missing_credentials_are_a_startup_error_naming_them(monkeypatch, model_dir):
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    from worker.__main__ import connect

    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "BIGQUERY_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)

    def no_credentials(*_args, **_kwargs):
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(google.auth, "default", no_credentials)
    with pytest.raises(StartupError) as refused:
        connect(settings_of(model_dir, GOOGLE_CLOUD_PROJECT="p", WORKER_RESULTS_TABLE="p.d.r",
                            WORKER_ERRORS_TABLE="p.d.e"))
    assert refused.value.step == "Google clients"
    message = str(refused.value)
    for named in ("DefaultCredentialsError: Your default credentials were not found.",
                  "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "BIGQUERY_EMULATOR_HOST",
                  "WORKER_PULL=false and neither table set"):
        assert named in message, named


def test_an_engine_that_fails_to_load_is_a_model_load_error(monkeypatch, model_dir):
    from concurrent.futures import ThreadPoolExecutor

    from worker import __main__ as cli

    class Broken:
        def load(self):
            raise RuntimeError("cannot compile the IR")

    monkeypatch.setattr(cli, "create_engine", lambda *args, **kwargs: Broken())
    with ThreadPoolExecutor(1) as pool, pytest.raises(StartupError) as refused:
        cli.build_runner(settings_of(model_dir), pool)
    assert refused.value.step == "model load"
    assert "WORKER_ENGINE=openvino" in str(refused.value) and "cannot compile the IR" in str(refused.value)
