"""The process manager: clear messages for taken ports and missing binaries; stop by PID."""

from __future__ import annotations

import socket
import sys

import pytest

from localcloud.processes import ProcessManager, Service, StackError


def test_a_taken_port_is_named_with_what_to_do(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        service = Service("pubsub", [sys.executable, "-c", "pass"], ready=lambda: True, ports=(port,))
        with pytest.raises(StackError, match=f"port {port} .* taken.*LOCAL_"):
            ProcessManager(tmp_path).start(service)


def test_a_missing_executable_is_named_with_the_hint(tmp_path):
    service = Service("gcs", ["/nonexistent/fake-gcs-server"], ready=lambda: True, hint="Run `make install`.")
    with pytest.raises(StackError, match="fake-gcs-server not found. Run `make install`"):
        ProcessManager(tmp_path).start(service)


def test_a_process_that_dies_while_starting_shows_its_log(tmp_path):
    service = Service("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], ready=lambda: False)
    with pytest.raises(StackError, match="(?s)exited with code 3.*boom"):
        ProcessManager(tmp_path).start(service)


def test_start_records_the_pid_and_stop_ends_the_whole_group(tmp_path):
    manager = ProcessManager(tmp_path)
    # A parent with a child: both must be gone after stop.
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    process = manager.start(Service("sleeper", [sys.executable, "-c", code], ready=lambda: True))
    assert manager.running() == ["sleeper"]
    with pytest.raises(StackError, match="already running"):
        manager.start(Service("sleeper", [sys.executable, "-c", code], ready=lambda: True))
    import time
    time.sleep(0.5)
    children = process.children(recursive=True)
    assert manager.stop("sleeper", timeout_s=5)
    assert not process.is_running() and not any(child.is_running() for child in children)
    assert manager.running() == [] and manager.stop("sleeper") is False


def test_the_supervisor_restarts_a_service_that_died_but_not_one_stopped_on_purpose(tmp_path):
    import os
    import signal

    from localcloud.config import StackConfig
    from localcloud.supervisor import Supervisor, read_state

    def sleeper(name: str) -> Service:
        log = tmp_path / "logs" / f"{name}.log"
        return Service(name, [sys.executable, "-c", f"print('{name} up', flush=True); import time; time.sleep(60)"],
                       ready=lambda: f"{name} up" in log.read_text(), env={"WHO": name})

    config = StackConfig(run_dir=tmp_path)
    manager = ProcessManager(tmp_path)
    supervisor = Supervisor(config, names=("dies", "stopped"),
                            make_service=lambda _config, name, record: sleeper(name))
    first = manager.start(sleeper("dies"))
    manager.start(sleeper("stopped"))

    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    manager.stop("stopped", timeout_s=5)
    restarted = supervisor.check_once()

    assert restarted == ["dies"]
    assert manager.process("dies").pid != first.pid and manager.process("stopped") is None
    assert manager.record("dies")["env"] == {"WHO": "dies"}
    state = read_state(tmp_path)
    assert state["dies"]["restarts"] == 1 and state["dies"]["state"] == "running"
    assert "dies up" in state["dies"]["log_before_exit"]
    assert supervisor.check_once() == []  # alive now: nothing to do
    manager.stop("dies", timeout_s=5)
