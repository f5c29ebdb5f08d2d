"""Start and stop the stack's processes, each by its own PID file, with readiness checks."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from localcloud.config import port_is_free


class StackError(RuntimeError):
    """Something the user can fix: the message says what and how."""


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = ()
    ready_timeout_s: float = 60.0
    stop_timeout_s: float = 15.0
    hint: str = ""  # what to do when the executable is missing


class ProcessManager:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.pid_dir = run_dir / "pids"
        self.log_dir = run_dir / "logs"

    def pid_file(self, name: str) -> Path:
        return self.pid_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def process(self, name: str) -> psutil.Process | None:
        """The live process recorded for name, or None (a recycled PID does not count)."""
        path = self.pid_file(name)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            process = psutil.Process(record["pid"])
            if abs(process.create_time() - record["create_time"]) > 1.0 or process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except (ValueError, KeyError, psutil.Error):
            return None

    def start(self, service: Service) -> psutil.Process:
        if self.process(service.name):
            raise StackError(f"{service.name} is already running (pid file {self.pid_file(service.name)}); "
                             "run `make down` first")
        executable = service.argv[0]
        if not (Path(executable).is_file() or shutil.which(executable)):
            raise StackError(f"{service.name}: executable {executable} not found. {service.hint}".strip())
        for port in service.ports:
            if not port_is_free(port):
                raise StackError(
                    f"{service.name}: port {port} on 127.0.0.1 is taken by another process. Stop it "
                    f"(`ss -ltnp 'sport = :{port}'` shows which) or choose other ports with LOCAL_*_PORT variables."
                )
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file(service.name), "ab")
        env = {**os.environ, **service.env}
        popen = subprocess.Popen(service.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
        log.close()
        process = psutil.Process(popen.pid)
        # The record is what a restart needs: the supervisor rebuilds the service from it.
        self.pid_file(service.name).write_text(json.dumps({"pid": popen.pid, "create_time": process.create_time(),
                                                           "argv": service.argv, "env": service.env}))
        deadline = time.monotonic() + service.ready_timeout_s
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                self.pid_file(service.name).unlink(missing_ok=True)
                raise StackError(f"{service.name} exited with code {popen.returncode} while starting:\n"
                                 f"{self.tail(service.name)}\n(full log: {self.log_file(service.name)})")
            try:
                if service.ready():
                    return process
            except Exception:
                pass
            time.sleep(0.1)
        self.stop(service.name)
        raise StackError(f"{service.name} was not ready after {service.ready_timeout_s:.0f} s:\n"
                         f"{self.tail(service.name)}\n(full log: {self.log_file(service.name)})")

    @contextlib.contextmanager
    def lock(self):
        """Held while a pid file is removed on purpose, and while the supervisor decides on a
        restart: a service stopped on purpose is never mistaken for one that died."""
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        with open(self.pid_dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def died(self, name: str) -> bool:
        """True when name's pid file is there but its process is not: it exited unasked."""
        return self.pid_file(name).is_file() and self.process(name) is None

    def record(self, name: str) -> dict | None:
        try:
            return json.loads(self.pid_file(name).read_text())
        except (OSError, ValueError):
            return None

    def stop(self, name: str, timeout_s: float = 15.0) -> bool:
        """SIGTERM the service's process group, SIGKILL what is left after timeout_s."""
        with self.lock():
            process = self.process(name)
            self.pid_file(name).unlink(missing_ok=True)
        if process is None:
            return False
        group = [process] + process.children(recursive=True)
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(group, timeout=timeout_s)
        for leftover in alive:
            try:
                leftover.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        return True

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log_file(name)
        if not path.is_file():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def running(self) -> list[str]:
        return [name for name in self.recorded() if self.process(name)]

    def recorded(self) -> list[str]:
        """Every service with a pid file: running, or exited without being stopped."""
        if not self.pid_dir.is_dir():
            return []
        return sorted(p.stem for p in self.pid_dir.glob("*.pid"))
