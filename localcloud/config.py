"""Where the local stack lives: ports, run directory, resource names. One frozen object."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
PORT_FIELDS = ("pubsub_port", "gcs_port", "gcs_http_port", "bigquery_port", "bigquery_grpc_port", "function_port")


@dataclass(frozen=True)
class StackConfig:
    run_dir: Path = REPO_ROOT / ".run"
    project: str = "local-project"
    pubsub_port: int = 8085
    gcs_port: int = 4443  # https, for gsutil (it speaks only https)
    gcs_http_port: int = 4080  # http, for the Python clients and gcloud storage
    bigquery_port: int = 9050
    bigquery_grpc_port: int = 9060
    function_port: int = 8080
    bucket: str = "uploads"
    prefix: str = "incoming/"
    notifications_topic: str = "gcs-notifications"
    eventarc_subscription: str = "eventarc-trigger"
    eventarc_dead_letter_topic: str = "eventarc-dead-letter"
    eventarc_dead_letter_subscription: str = "eventarc-dead-letter-hold"
    jobs_topic: str = "jobs"
    jobs_subscription: str = "jobs-worker"
    jobs_ack_deadline_s: int = 60
    dead_letter_topic: str = "jobs-dead-letter"
    dead_letter_subscription: str = "jobs-dead-letter-hold"
    max_delivery_attempts: int = 5
    dataset: str = "inference"
    results_table: str = "results"
    errors_table: str = "errors"
    batches_table: str = "batches"
    model_dir: Path = REPO_ROOT / "build" / "models" / "demo" / "1"
    worker_batch_size: int = 32

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides) -> "StackConfig":
        """LOCAL_<FIELD> variables override the defaults, e.g. LOCAL_PUBSUB_PORT=18085."""
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = env.get(f"LOCAL_{field.name.upper()}")
            if raw:
                kind = type(field.default)
                try:
                    values[field.name] = Path(raw) if isinstance(field.default, Path) else kind(raw)
                except ValueError:
                    raise SystemExit(f"LOCAL_{field.name.upper()}={raw!r} is not a valid {kind.__name__}")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def with_free_ports(cls, run_dir: Path, **overrides) -> "StackConfig":
        """A stack on ports nobody uses, e.g. for tests next to a running `make up`."""
        return cls(run_dir=run_dir, **dict(zip(PORT_FIELDS, free_ports(len(PORT_FIELDS)))), **overrides)

    # Derived names -------------------------------------------------------------------------
    @property
    def pubsub_host(self) -> str:
        return f"127.0.0.1:{self.pubsub_port}"

    @property
    def gcs_url(self) -> str:
        return f"http://127.0.0.1:{self.gcs_http_port}"

    @property
    def bigquery_url(self) -> str:
        return f"http://127.0.0.1:{self.bigquery_port}"

    @property
    def function_url(self) -> str:
        return f"http://127.0.0.1:{self.function_port}/"

    def topic_path(self, topic: str) -> str:
        return f"projects/{self.project}/topics/{topic}"

    def subscription_path(self, subscription: str) -> str:
        return f"projects/{self.project}/subscriptions/{subscription}"

    def table_id(self, table: str) -> str:
        return f"{self.project}.{self.dataset}.{table}"

    def client_env(self) -> dict[str, str]:
        """Environment that points Google's client libraries (and this project's) at the stack."""
        return {
            "GOOGLE_CLOUD_PROJECT": self.project,
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "STORAGE_EMULATOR_HOST": self.gcs_url,
            "BIGQUERY_EMULATOR_HOST": self.bigquery_url,
        }

    def save(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "stack.json"
        path.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()},
                                   indent=1))
        return path

    @classmethod
    def load(cls, run_dir: Path) -> "StackConfig | None":
        path = run_dir / "stack.json"
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        known = {f.name: f for f in fields(cls)}
        values = {k: Path(v) if isinstance(known[k].default, Path) else v for k, v in raw.items() if k in known}
        return replace(cls(), **values)


def free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
