from __future__ import annotations

from pathlib import Path

import pytest

from worker.settings import SettingsError, WorkerSettings
from tests.helpers import MODEL_DIR


def env(**changes) -> dict:
    values = {"GOOGLE_CLOUD_PROJECT": "p", "WORKER_SUBSCRIPTION": "jobs-worker",
              "WORKER_RESULTS_TABLE": "p.d.results", "WORKER_ERRORS_TABLE": "p.d.errors",
              "WORKER_MODEL_DIR": str(MODEL_DIR)}
    values.update(changes)
    return {k: v for k, v in values.items() if v is not None}


def test_settings_come_from_the_environment_with_typed_values(model_dir):
    settings = WorkerSettings.from_env(env(WORKER_BATCH_SIZE="16", WORKER_BATCH_WAIT_MS="2.5"))
    assert settings.batch_size == 16 and settings.batch_wait_ms == 2.5
    assert settings.subscription_path == "projects/p/subscriptions/jobs-worker"


@pytest.mark.parametrize("changes, named", [
    ({"WORKER_SUBSCRIPTION": None}, "WORKER_SUBSCRIPTION"),
    ({"WORKER_BATCH_SIZE": "many"}, "WORKER_BATCH_SIZE"),
    ({"WORKER_BATCH_SIZE": "0"}, "WORKER_BATCH_SIZE"),
    ({"WORKER_ENGINE": "onnx"}, "WORKER_ENGINE"),
    ({"WORKER_RESULTS_TABLE": "results"}, "project.dataset.table"),
    ({"WORKER_MODEL_DIR": "/nonexistent"}, "manifest.json"),
    ({"WORKER_BATCH_SIZE": "512"}, "WORKER_MAX_OUTSTANDING_MESSAGES"),
])
def test_bad_settings_stop_with_a_message_naming_the_variable(model_dir, changes, named):
    with pytest.raises(SettingsError, match=named):
        WorkerSettings.from_env(env(**changes))


def test_worker_run_with_a_model_that_fails_to_load_ends_in_one_line_naming_it(tmp_path):
    import subprocess
    import sys

    broken = tmp_path / "demo" / "1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text('{"name": "demo", "version": "1", "files": {"missing.bin": "00"}}')
    env = {"PATH": "/usr/bin:/bin", "WORKER_PROJECT": "p", "WORKER_SUBSCRIPTION": "s",
           "WORKER_RESULTS_TABLE": "p.d.results", "WORKER_ERRORS_TABLE": "p.d.errors", "WORKER_MODEL_URI": str(broken)}
    completed = subprocess.run([sys.executable, "-m", "worker", "run"], env=env, capture_output=True, text=True,
                               timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stderr.startswith("worker: cannot load the model:") and str(broken) in completed.stderr
