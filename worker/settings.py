"""The worker's one settings object, read from the environment once at start."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

from modelspec.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DecodeLimits


class SettingsError(ValueError):
    """A setting is missing or wrong; the message names the variable and what to do."""


class StartupError(RuntimeError):
    """A start-up step failed (`step`: "Google clients", "model location", "model load"); the
    message gives the real cause and the setting to change."""

    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step = step


ENGINES = ("openvino", "tensorflow", "tfserving", "onnxruntime")
# WORKER_WEB_FRAMEWORK of `serve` -> the server it runs under (worker/http/).
WEB_FRAMEWORKS = {"flask": "gunicorn", "fastapi": "uvicorn"}
PRECISIONS = ("f32", "bf16", "f16", "int8", "default")
TFSERVING_PROTOCOLS = ("rest", "grpc")


@dataclass(frozen=True)
class WorkerSettings:
    # The Google Cloud project of the clients (GOOGLE_CLOUD_PROJECT); required whenever one is made.
    project: str = ""
    # Where every job ends as a row. Required while pull is on; `serve` with WORKER_PULL=false may
    # leave both empty: it then answers /classify without writing and refuses push deliveries.
    results_table: str = ""
    errors_table: str = ""
    # Required while pull is on (`run`, and `serve` unless WORKER_PULL=false).
    subscription: str = ""
    # `serve` only: pull jobs in the same process as the HTTP face (one model for both).
    pull: bool = True
    batches_table: str = ""  # empty: batch rows (sink time) are not written
    # The model version: WORKER_MODEL_URI (local dir or gs://BUCKET/models/NAME[/VERSION], see
    # worker/models.py) or WORKER_MODEL_DIR (a local version directory; the older name). One of them.
    model_dir: Path | None = None
    model_uri: str = ""
    model_cache_dir: Path = Path(tempfile.gettempdir()) / "worker-model-cache"
    # With a location that names a model (not one version): look for a newer verified version this
    # often and switch to it between batches (worker/rollout.py); 0: never, the start's version stays.
    model_poll_s: float = 60.0
    engine: str = "openvino"
    precision: str = "f32"
    engine_threads: int = 0  # OpenVINO INFERENCE_NUM_THREADS, ONNX Runtime intra-op threads; 0: every core
    batch_size: int = 32
    batch_wait_ms: float = 10.0
    max_outstanding_messages: int = 256
    download_threads: int = 8
    pipelines: int = 4
    # Inserts of concurrent batches are merged (group commit) up to this many rows a request.
    sink_max_rows: int = 500
    sink_linger_ms: float = 0.0
    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    download_timeout_s: float = 30.0
    insert_timeout_s: float = 30.0
    shutdown_timeout_s: float = 20.0
    # The subscription's dead-letter max_delivery_attempts: the last attempt writes an error row.
    max_delivery_attempts: int = 5
    ready_file: Path | None = None
    # engine=tfserving: REST http://host:8501 or gRPC host:8500; the model name defaults to the manifest's
    tfserving_url: str = ""
    tfserving_protocol: str = "rest"
    tfserving_model_name: str = ""
    tfserving_timeout_s: float = 10.0

    @property
    def subscription_path(self) -> str:
        if self.subscription.startswith("projects/"):
            return self.subscription
        return f"projects/{self.project}/subscriptions/{self.subscription}"

    @property
    def writes_rows(self) -> bool:
        """Tables are configured (validate() allows both or neither): rows are written to BigQuery."""
        return bool(self.results_table and self.errors_table)

    @property
    def model_location(self) -> str:
        return self.model_uri or (str(self.model_dir) if self.model_dir else "")

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "WorkerSettings":
        """Build from WORKER_* variables (and GOOGLE_CLOUD_PROJECT). Raises SettingsError."""
        values = _values_from_env(cls, "WORKER_", env)
        if "project" not in values and env.get("GOOGLE_CLOUD_PROJECT"):
            values["project"] = env["GOOGLE_CLOUD_PROJECT"]
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        self._validate_cloud()
        if self.engine not in ENGINES:
            raise SettingsError(f"WORKER_ENGINE={self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise SettingsError(f"WORKER_PRECISION={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "max_outstanding_messages", "download_threads", "pipelines", "sink_max_rows",
                     "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise SettingsError(f"WORKER_{name.upper()}={getattr(self, name)} must be >= 1")
        if self.max_outstanding_messages < self.batch_size:
            raise SettingsError(
                f"WORKER_MAX_OUTSTANDING_MESSAGES={self.max_outstanding_messages} is below "
                f"WORKER_BATCH_SIZE={self.batch_size}: a batch could never fill"
            )
        for table_setting in ("results_table", "errors_table", "batches_table"):
            value = getattr(self, table_setting)
            if value and value.count(".") != 2:
                raise SettingsError(f"WORKER_{table_setting.upper()}={value!r} must be project.dataset.table")
        from worker.engines import ENGINE_PRECISIONS

        if self.precision not in ENGINE_PRECISIONS[self.engine]:
            raise SettingsError(f"WORKER_PRECISION={self.precision!r} does not apply to WORKER_ENGINE={self.engine}; "
                                f"use one of {', '.join(ENGINE_PRECISIONS[self.engine])}")
        if self.engine == "tfserving" and not self.tfserving_url:
            raise SettingsError("WORKER_ENGINE=tfserving needs WORKER_TFSERVING_URL "
                                "(REST http://host:8501 or gRPC host:8500)")
        if self.tfserving_protocol not in TFSERVING_PROTOCOLS:
            raise SettingsError(f"WORKER_TFSERVING_PROTOCOL={self.tfserving_protocol!r} is not one of "
                                f"{', '.join(TFSERVING_PROTOCOLS)}")
        if not (self.model_poll_s == 0 or 1 <= self.model_poll_s <= 86400):
            raise SettingsError(f"WORKER_MODEL_POLL_S={self.model_poll_s:g} must be 0 (never look for a newer model "
                                "version: the one found at start stays) or between 1 and 86400 seconds")
        if self.model_uri and self.model_dir:
            raise SettingsError("set WORKER_MODEL_URI or WORKER_MODEL_DIR, not both")
        if not self.model_location:
            raise SettingsError("missing settings: WORKER_MODEL_URI (or WORKER_MODEL_DIR): "
                                "a model version directory or gs://BUCKET/models/NAME[/VERSION]")
        if not self.model_location.startswith("gs://"):
            local = Path(self.model_location)
            has_versions = local.is_dir() and any((p / "manifest.json").is_file() for p in local.iterdir()
                                                  if p.is_dir() and p.name.isdigit())
            if not ((local / "manifest.json").is_file() or has_versions):
                name = "WORKER_MODEL_URI" if self.model_uri else "WORKER_MODEL_DIR"
                raise SettingsError(
                    f"{name}={local} has no manifest.json (nor version sub-directories with one): "
                    "point it at a model version directory (make model builds build/models/demo/1)"
                )

    def _validate_cloud(self) -> None:
        """Pull needs a subscription and both tables; without pull, both tables or neither. A project
        only when a Google client will be made (offline `serve` on a local model needs none)."""
        tables = {"WORKER_RESULTS_TABLE": self.results_table, "WORKER_ERRORS_TABLE": self.errors_table}
        missing_tables = [name for name, value in tables.items() if not value]
        if self.pull:
            missing = (["WORKER_SUBSCRIPTION"] if not self.subscription else []) + missing_tables
            if missing:
                raise SettingsError(
                    f"missing settings: {', '.join(missing)} (pulling jobs needs the subscription and the tables "
                    "every job ends in, project.dataset.table; `serve` with WORKER_PULL=false takes push "
                    "deliveries only, and with neither table set answers /classify alone)")
        elif len(missing_tables) == 1:
            [missing], [present] = missing_tables, [name for name in tables if name not in missing_tables]
            raise SettingsError(
                f"missing settings: {missing} ({present} is set: every job ends as a row in one of the two, "
                "so set both, or neither to serve /classify without writing rows)")
        if self.batches_table and missing_tables:
            raise SettingsError("WORKER_BATCHES_TABLE is set without WORKER_RESULTS_TABLE and WORKER_ERRORS_TABLE: "
                                "batch rows describe pipeline batches; set those two as well, or unset it")
        if not self.project and (self.pull or self.writes_rows or self.model_uri.startswith("gs://")):
            raise SettingsError("missing settings: GOOGLE_CLOUD_PROJECT (or WORKER_PROJECT): the project of the "
                                "Google Cloud clients (Pub/Sub, BigQuery, Cloud Storage)")


GOOGLE_OAUTH2_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP face (`python -m worker serve`), from WORKER_HTTP_* variables; see worker/http/."""

    host: str = "0.0.0.0"
    port: int = 8080
    # WORKER_WEB_FRAMEWORK (not WORKER_HTTP_*): flask under gunicorn, or fastapi under uvicorn.
    web_framework: str = "flask"
    # Request threads of the one server process: gunicorn's gthread threads, or the thread pool
    # FastAPI runs the handlers in (worker/http/gunicorn_conf.py, worker/http/uvicorn_conf.py).
    threads: int = 8
    timeout_s: float = 60.0
    # SIGTERM -> finish requests and pulled batches; below the container's stop timeout (30 s).
    graceful_timeout_s: float = 25.0
    keepalive_s: float = 5.0
    # Pub/Sub push: with an audience set, every push must carry a Google-signed OIDC token for it,
    # issued to the service account named here (when set).
    push_audience: str = ""
    push_service_account: str = ""
    push_certs_url: str = GOOGLE_OAUTH2_CERTS_URL
    # How long a push request waits for its row; then 503 and Pub/Sub delivers it again.
    push_wait_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "HttpSettings":
        values = _values_from_env(cls, "WORKER_HTTP_", env)
        values.pop("web_framework", None)  # its variable is WORKER_WEB_FRAMEWORK
        if env.get("WORKER_WEB_FRAMEWORK", "").strip():
            values["web_framework"] = env["WORKER_WEB_FRAMEWORK"].strip().lower()
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.web_framework not in WEB_FRAMEWORKS:
            raise SettingsError(f"WORKER_WEB_FRAMEWORK={self.web_framework!r} is not one of "
                                f"{', '.join(WEB_FRAMEWORKS)} (flask runs under gunicorn, fastapi under uvicorn)")
        if not 0 < self.port < 65536:
            raise SettingsError(f"WORKER_HTTP_PORT={self.port} is not a TCP port (1-65535)")
        for name in ("threads", "timeout_s", "graceful_timeout_s", "keepalive_s", "push_wait_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"WORKER_HTTP_{name.upper()}={getattr(self, name)} must be > 0")
        if self.push_service_account and not self.push_audience:
            raise SettingsError("WORKER_HTTP_PUSH_SERVICE_ACCOUNT is set but WORKER_HTTP_PUSH_AUDIENCE is not: "
                                "set the audience the push subscription's OIDC tokens are issued for")
        if not self.push_certs_url.startswith(("https://", "http://")):
            raise SettingsError(f"WORKER_HTTP_PUSH_CERTS_URL={self.push_certs_url!r} is not an http(s) URL")


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _values_from_env(cls, prefix: str, env: Mapping[str, str]) -> dict[str, object]:
    """PREFIX<FIELD> variables of a settings dataclass, converted to the fields' types."""
    values: dict[str, object] = {}
    for field in fields(cls):
        name = f"{prefix}{field.name.upper()}"
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        values[field.name] = _convert(name, raw, field.type)
    return values


def _convert(name: str, raw: str, annotation: object) -> object:
    kind = str(annotation)
    if kind == "bool":
        if raw.strip().lower() in _TRUE + _FALSE:
            return raw.strip().lower() in _TRUE
        raise SettingsError(f"{name}={raw!r} is not true or false")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if "Path" in kind:
            return Path(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind}")
    return raw
