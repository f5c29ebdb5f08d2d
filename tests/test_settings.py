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
    nobody = "http://127.0.0.1:9"  # the clients are made (anonymous), nothing is called
    env = {"PATH": "/usr/bin:/bin", "WORKER_PROJECT": "p", "WORKER_SUBSCRIPTION": "s",
           "WORKER_RESULTS_TABLE": "p.d.results", "WORKER_ERRORS_TABLE": "p.d.errors", "WORKER_MODEL_URI": str(broken),
           "STORAGE_EMULATOR_HOST": nobody, "BIGQUERY_EMULATOR_HOST": nobody, "PUBSUB_EMULATOR_HOST": "127.0.0.1:9"}
    completed = subprocess.run([sys.executable, "-m", "worker", "run"], env=env, capture_output=True, text=True,
                               timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stderr.startswith("worker: cannot start: model location: WORKER_MODEL_URI=")
    assert str(broken) in completed.stderr and completed.stderr.count("\n") == 1


# --- tables, pull and project: what may be left out -------------------------------------------------

def offline(**changes) -> dict:
    """`serve` trying the model: no pull, no tables, no project."""
    return env(**{"WORKER_PULL": "false", "WORKER_SUBSCRIPTION": None, "WORKER_RESULTS_TABLE": None,
                  "WORKER_ERRORS_TABLE": None, "GOOGLE_CLOUD_PROJECT": None, **changes})


def test_without_pull_the_tables_and_the_project_may_be_left_out(model_dir):
    settings = WorkerSettings.from_env(offline())
    assert not settings.writes_rows and not settings.pull
    assert (settings.project, settings.results_table, settings.errors_table) == ("", "", "")


def test_with_both_tables_rows_are_written():
    assert WorkerSettings.from_env(env()).writes_rows


@pytest.mark.parametrize("changes, named", [
    # pull on: the subscription and both tables, all named at once
    ({"WORKER_RESULTS_TABLE": None, "WORKER_ERRORS_TABLE": None},
     "missing settings: WORKER_RESULTS_TABLE, WORKER_ERRORS_TABLE "),
    ({"WORKER_SUBSCRIPTION": None, "WORKER_ERRORS_TABLE": None},
     "missing settings: WORKER_SUBSCRIPTION, WORKER_ERRORS_TABLE "),
    ({"WORKER_PULL": "true", "WORKER_RESULTS_TABLE": None}, "missing settings: WORKER_RESULTS_TABLE "),
    # a project whenever a Google client is made
    ({"GOOGLE_CLOUD_PROJECT": None}, "GOOGLE_CLOUD_PROJECT"),
])
def test_pull_needs_its_subscription_tables_and_project(model_dir, changes, named):
    with pytest.raises(SettingsError, match=named):
        WorkerSettings.from_env(env(**changes))


@pytest.mark.parametrize("changes, named", [
    ({"WORKER_RESULTS_TABLE": "p.d.results"}, "missing settings: WORKER_ERRORS_TABLE "),
    ({"WORKER_ERRORS_TABLE": "p.d.errors"}, "missing settings: WORKER_RESULTS_TABLE "),
    ({"WORKER_BATCHES_TABLE": "p.d.batches"}, "WORKER_BATCHES_TABLE is set without"),
    ({"WORKER_RESULTS_TABLE": "p.d.results", "WORKER_ERRORS_TABLE": "p.d.errors"}, "GOOGLE_CLOUD_PROJECT"),
    ({"WORKER_MODEL_DIR": None, "WORKER_MODEL_URI": "gs://bucket/models/demo"}, "GOOGLE_CLOUD_PROJECT"),
    ({"WORKER_RESULTS_TABLE": "results", "WORKER_ERRORS_TABLE": "p.d.errors", "GOOGLE_CLOUD_PROJECT": "p"},
     "project.dataset.table"),
])
def test_without_pull_tables_are_both_or_neither_and_clients_need_a_project(model_dir, changes, named):
    with pytest.raises(SettingsError, match=named):
        WorkerSettings.from_env(offline(**changes))
