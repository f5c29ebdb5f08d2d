"""Bring the whole local stack up in dependency order, and down again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from localcloud import resources, services
from localcloud.config import StackConfig
from localcloud.processes import ProcessManager, StackError

# Start order; stop goes in reverse so nothing loses its peer while still working.
SERVICE_ORDER = ("pubsub", "gcs", "bigquery", "function", "eventarc", "worker", "supervisor")
EXTRA_WORKER_PREFIX = "worker-"


class Stack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.processes = ProcessManager(config.run_dir)

    def up(self, with_worker: bool = True, on_step: Callable[[str], None] = lambda _: None,
           worker_env: dict[str, str] | None = None, supervise: bool = True) -> None:
        config = self.config
        if not (config.model_dir / "manifest.json").is_file() and with_worker:
            raise StackError(f"no model at {config.model_dir}: run `make model` first")
        config.save()
        write_cli_configs(config)
        try:
            on_step("Pub/Sub emulator")
            self.processes.start(services.pubsub(config))
            # Topics must exist before the first upload, else fake-gcs-server drops the notification.
            resources.create_pubsub(config)
            on_step("Cloud Storage (fake-gcs-server)")
            self.processes.start(services.gcs(config))
            resources.create_bucket(config)
            on_step("BigQuery (local-bigquery)")
            self.processes.start(services.bigquery(config))
            resources.create_bigquery(config)
            on_step("Cloud Function (functions-framework)")
            self.processes.start(services.function(config))
            on_step("Eventarc stand-in")
            self.processes.start(services.eventarc(config))
            if with_worker:
                on_step("worker (model load + warm-up)")
                self.start_worker(**(worker_env or {}))
            if supervise:
                on_step("supervisor (restarts a process that exits)")
                self.processes.start(services.supervisor(config))
        except BaseException:
            self.down()
            raise

    def start_worker(self, name: str = "worker", **env: str) -> None:
        """Start a worker; extra ones (name worker-*) may run next to the main one."""
        self.processes.start(services.worker(self.config, name=name, **env))

    def stop_worker(self, name: str = "worker") -> bool:
        return self.processes.stop(name, timeout_s=30)

    def down(self) -> list[str]:
        stopped = []
        extra_workers = [n for n in self.processes.running() if n.startswith(EXTRA_WORKER_PREFIX)]
        for name in extra_workers + list(reversed(SERVICE_ORDER)):
            if self.processes.stop(name):
                stopped.append(name)
        return stopped


def write_cli_configs(config: StackConfig) -> dict[str, str]:
    """Config for gcloud storage, gsutil and bq pointed at the stack; returns the env to use them."""
    run_dir = config.run_dir
    gcloud_dir = run_dir / "gcloud"
    gcloud_dir.mkdir(parents=True, exist_ok=True)
    (gcloud_dir / "configurations").mkdir(exist_ok=True)
    (gcloud_dir / "active_config").write_text("default")
    (gcloud_dir / "configurations" / "config_default").write_text(
        "[core]\n"
        f"project = {config.project}\n"
        "disable_usage_reporting = true\n"
        "[auth]\n"
        "disable_credentials = true\n"
        "[api_endpoint_overrides]\n"
        f"storage = {config.gcs_url}/\n"
        "[component_manager]\n"
        "disable_update_check = true\n"
    )
    boto = run_dir / "boto.cfg"
    # gsutil speaks only https: fake-gcs-server serves a self-signed https port for it.
    boto.write_text(
        "[Credentials]\n"
        "gs_json_host = 127.0.0.1\n"
        f"gs_json_port = {config.gcs_port}\n"
        "[Boto]\n"
        "https_validate_certificates = False\n"
        "[GSUtil]\n"
        f"default_project_id = {config.project}\n"
        "parallel_composite_upload_threshold = 0\n"
    )
    token = run_dir / "bq-token"
    token.write_text("local-emulator-needs-no-token\n")
    env = cli_env(config)
    lines = [f"export {k}={v}" for k, v in {**env, **config.client_env()}.items()]
    lines.append(f"alias bq='bq --api {config.bigquery_url} --project_id {config.project}'")
    (run_dir / "env.sh").write_text("\n".join(lines) + "\n")
    return env


def cli_env(config: StackConfig) -> dict[str, str]:
    return {
        "CLOUDSDK_CONFIG": str(config.run_dir / "gcloud"),
        "BOTO_CONFIG": str(config.run_dir / "boto.cfg"),
        "CLOUDSDK_CORE_PASS_CREDENTIALS_TO_GSUTIL": "false",
        "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(config.run_dir / "bq-token"),
    }


def stack_for(run_dir: Path) -> Stack | None:
    config = StackConfig.load(run_dir)
    return Stack(config) if config else None


@dataclass(frozen=True)
class ServiceHealth:
    name: str
    running: bool
    pid: int | None
    restarts: int
    supervisor_state: str
    log_file: Path
    log_tail: str


def stack_health(stack: Stack) -> list[ServiceHealth]:
    """Every service with a pid file (running, or exited unasked), with the supervisor's account."""
    from localcloud.supervisor import read_state

    processes = stack.processes
    state = read_state(stack.config.run_dir)
    health = []
    for name in processes.recorded():
        process = processes.process(name)
        entry = state.get(name, {})
        restarts = int(entry.get("restarts", 0))
        tail = entry.get("log_before_exit", "") if process else processes.tail(name, 15)
        health.append(ServiceHealth(name=name, running=process is not None, pid=process.pid if process else None,
                                    restarts=restarts, supervisor_state=entry.get("state", "") if not process else "",
                                    log_file=processes.log_file(name), log_tail=tail))
    return health
