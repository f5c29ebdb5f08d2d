"""Keep the local stack's processes alive: a service that exits unasked is started again.

`make up` starts this as one more process of the stack (`python -m localcloud.supervisor`). Every
second it looks for services whose pid file is there but whose process is gone (`make down` and
`Stack.stop_worker` remove the pid file first, under the same lock, so a stop on purpose is never
taken for a death). It restarts the service as it was started (argv and env from the pid record),
waits until it is ready, and re-creates what the restart lost (the Pub/Sub emulator keeps topics
and subscriptions in memory only). A service that keeps dying is retried with a growing pause.

What happened is written to `<run dir>/supervisor.json` for `localcloud status`, which reports a
restart or a service that is down loudly, with the last lines of its log. Extra workers
(`worker-*`, started by tests and the bench) are theirs to manage and are left alone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import click

from localcloud import resources, services
from localcloud.config import StackConfig
from localcloud.processes import ProcessManager, Service

_LOGGER = logging.getLogger("localcloud.supervisor")

SUPERVISED = ("pubsub", "gcs", "bigquery", "function", "eventarc", "worker")
STATE_FILE = "supervisor.json"
CHECK_INTERVAL_S = 1.0
MAX_PAUSE_S = 30.0  # between restarts of a service that keeps dying
LOG_TAIL_LINES = 15


def state_path(run_dir: Path) -> Path:
    return run_dir / STATE_FILE


def read_state(run_dir: Path) -> dict[str, dict]:
    try:
        return json.loads(state_path(run_dir).read_text())
    except (OSError, ValueError):
        return {}


def service_for(config: StackConfig, name: str, record: dict) -> Service:
    """The service as the stack defines it, with the environment it was started with."""
    factory = {"pubsub": services.pubsub, "gcs": services.gcs, "bigquery": services.bigquery,
               "function": services.function, "eventarc": services.eventarc}.get(name)
    service = factory(config) if factory else services.worker(config, name=name)
    return dataclasses.replace(service, env=record.get("env") or service.env)


AFTER_RESTART = {
    # In-memory emulator: the topics and subscriptions died with it. Messages did too; `python -m
    # worker reconcile --republish` recovers their uploads.
    "pubsub": resources.create_pubsub,
    "gcs": resources.create_bucket,
}


class Supervisor:
    def __init__(self, config: StackConfig, names: tuple[str, ...] = SUPERVISED,
                 make_service: Callable[[StackConfig, str, dict], Service] = service_for):
        self.config = config
        self.names = names
        self._make_service = make_service
        self.processes = ProcessManager(config.run_dir)
        self.state: dict[str, dict] = read_state(config.run_dir)
        self._next_try: dict[str, float] = {}
        self._failed_starts: dict[str, int] = {}  # in a row, per service: sets the pause

    def check_once(self) -> list[str]:
        """Restart every supervised service that died; returns the names restarted."""
        restarted = []
        for name in self.names:
            if time.monotonic() < self._next_try.get(name, 0.0):
                continue
            with self.processes.lock():
                if not self.processes.died(name):
                    continue
                record = self.processes.record(name) or {}
                tail = self.processes.tail(name, LOG_TAIL_LINES)
            if self._restart(name, record, tail):
                restarted.append(name)
        return restarted

    def _restart(self, name: str, record: dict, tail: str) -> bool:
        entry = self.state.setdefault(name, {"restarts": 0})
        entry["restarts"] += 1
        entry["last_exit_seen_at"] = _now()
        entry["log_before_exit"] = tail
        _LOGGER.error("%s exited unasked (restart %d); its log ended with:\n%s", name, entry["restarts"], tail)
        try:
            self.processes.start(self._make_service(self.config, name, record))
            hook = AFTER_RESTART.get(name)
            if hook:
                hook(self.config)
        except Exception as exc:
            entry["state"] = f"restart failed: {exc}"
            failures = self._failed_starts[name] = self._failed_starts.get(name, 0) + 1
            pause = min(MAX_PAUSE_S, 2.0 ** failures)
            self._next_try[name] = time.monotonic() + pause
            # start() removed the record of a process that would not start: put it back, so the
            # next round tries again and status shows the service as down.
            self.processes.pid_file(name).write_text(json.dumps(record))
            _LOGGER.error("restarting %s failed: %s; next try in %.0f s", name, exc, pause)
            self._save()
            return False
        self._failed_starts[name] = 0
        entry["state"] = "running"
        entry["last_restart_at"] = _now()
        _LOGGER.warning("%s restarted", name)
        self._save()
        return True

    def _save(self) -> None:
        path = state_path(self.config.run_dir)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.state, indent=2))
        os.replace(partial, path)

    def run(self, stop: threading.Event) -> None:
        self._save()
        while not stop.wait(CHECK_INTERVAL_S):
            try:
                self.check_once()
            except Exception:  # the supervisor must outlive whatever it watches
                _LOGGER.exception("supervisor round failed")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@click.command()
@click.option("--run-dir", type=click.Path(path_type=Path), required=True, help="the stack's run directory")
def main(run_dir: Path) -> None:
    from worker import logs

    logs.configure()
    config = StackConfig.load(run_dir)
    if config is None:
        raise SystemExit(f"no stack config in {run_dir}: start the stack with `make up`")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    _LOGGER.info("supervising %s in %s", ", ".join(SUPERVISED), run_dir)
    Supervisor(config).run(stop)


if __name__ == "__main__":
    main()
