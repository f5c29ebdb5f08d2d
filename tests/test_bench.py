"""make bench: the pure parts, and a small real run of each mode on a stack of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localcloud.bench import bottleneck, multipart_upload

REPO = Path(__file__).resolve().parents[1]


def stats(**overrides) -> dict:
    base = {"mode": "pipeline", "offered_per_s": None, "upload_per_s": 500.0, "images_per_s": 100.0,
            "cpu": {"machine": 40.0, "worker": 30.0, "bigquery": 20.0},
            "to_function_ms": 50.0, "to_worker_ms": 30.0, "queue_ms": 10.0, "download_ms": 5.0,
            "preprocess_ms": 1.0, "batch_wait_ms": 4.0, "batch_inference_ms": 20.0, "sink_ms": 90.0}
    return {**base, **overrides}


def test_a_saturated_machine_names_the_processes_that_use_it():
    assert bottleneck(stats(cpu={"machine": 97.0, "worker": 90.0, "bigquery": 70.0, "gcs": 5.0})) == \
        "CPU: worker 90%, bigquery 70%"


def test_uploads_slower_than_the_pipeline_are_the_bottleneck_only_without_a_fixed_rate():
    assert bottleneck(stats(upload_per_s=105.0)) == "upload 105/s"
    assert bottleneck(stats(upload_per_s=105.0, offered_per_s=100.0)) == "sink"


def test_otherwise_the_slowest_stage_and_worker_only_ignores_the_stages_before_the_worker():
    assert bottleneck(stats(to_function_ms=400.0)) == "notification"
    assert bottleneck(stats(mode="worker-only", to_function_ms=400.0, sink_ms=None)) == "inference"


@pytest.mark.stack
def test_the_bench_uploader_writes_the_object_with_its_run_id(stack):
    import urllib3

    from worker.clients import storage_client

    config = stack.config
    generation = multipart_upload(urllib3.PoolManager(), config.gcs_url, config.bucket, "elsewhere/bench.png",
                                  b"\x89PNG not really", {"run_id": "bench-x"})
    blob = storage_client(config.project, config.client_env()).bucket(config.bucket).get_blob("elsewhere/bench.png")
    assert blob.generation == generation and blob.metadata == {"run_id": "bench-x"}
    assert blob.content_type == "image/png" and blob.download_as_bytes() == b"\x89PNG not really"
    with pytest.raises(RuntimeError, match="gs://no-such-bucket/x.png failed: HTTP 404"):
        multipart_upload(urllib3.PoolManager(), config.gcs_url, "no-such-bucket", "x.png", b"x", {})


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.parametrize("mode_args", [["--rate", "40", "--workers", "2"], ["--worker-only"]],
                         ids=["pipeline-2-workers", "worker-only"])
def test_a_small_bench_run_gets_every_row_and_writes_its_table(tmp_path, mode_args):
    env = {**os.environ, "LOCAL_RUN_DIR": str(tmp_path / "run")}
    completed = subprocess.run(
        [sys.executable, "-m", "localcloud.bench", "--images", "40", "--precisions", "bf16", "--batch-sizes", "8",
         "--pipelines", "2", "--out", str(tmp_path / "out"), "--timeout", "120", *mode_args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    [result_file] = (tmp_path / "out").glob("*.json")
    [run] = json.loads(result_file.read_text())
    assert run["done"] == run["uploaded"] == run["images"] == 40
    workers = 2 if "--workers" in mode_args else 1
    assert run["config"] == {"engine": "openvino", "precision": "bf16", "batch_size": 8, "pipelines": 2,
                             "workers": workers}
    # Rows per worker process, by the name the bench gave it (the rows record each worker's pid).
    assert sum(run["shares"].values()) == 40
    assert set(run["shares"]) <= ({"worker", "worker-2"} if workers == 2 else {"worker"})
    assert ("Rows per worker" in completed.stdout) == (workers > 1)
    assert 0 < run["images_per_s"] and run["e2e_p50_ms"] <= run["e2e_p95_ms"] <= run["e2e_p99_ms"]
    assert run["bottleneck"] and run["cpu_ms_per_image"]["worker"] > 0
    assert 0.5 < run["overhead"]["ratio"] < 2.0
    assert "CPU ms per image" in completed.stdout and "make report" in completed.stdout
    if mode_args[0] == "--worker-only":
        return
    # make report after make bench on a fresh clone: no stack in .run, the bench's own is read.
    report = subprocess.run([sys.executable, "-m", "report", "--out", str(tmp_path / "report.html"), "--quiet"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "reading the last bench's" in report.stderr and "40 result rows" in report.stderr
    assert (tmp_path / "report.html").read_text().count('<img class="plot" src="data:image/svg+xml;base64,') == 3


def test_the_preprocessing_bench_times_every_spec_and_format_with_the_machine_facts():
    from localcloud.bench_preprocess import measure, specs

    result = measure(repeats=3, warmup=1)

    assert {(row["spec"], row["format"]) for row in result["rows"]} == {
        (name, fmt) for name in specs() for fmt in ("JPEG", "PNG")}
    assert all(0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] for row in result["rows"])
    assert isinstance(result["machine"]["cpu_flags"], list) and result["source"]["size"] == "1024x768"
    assert result["engine_call_ms"]["median_ms"] > 0


def test_worker_shares_name_each_workers_rows_by_its_pid():
    from localcloud.bench import worker_names, worker_shares

    rows = [{"worker_host": "vm", "worker_pid": 11, "rows": 30}, {"worker_host": "vm", "worker_pid": 12, "rows": 9},
            {"worker_host": "vm", "worker_pid": 99, "rows": 1}]
    assert worker_names(3) == ("worker", "worker-2", "worker-3")
    assert worker_shares({"worker": 11, "worker-2": 12, "worker-3": 13}, rows) == {
        "vm/99": 1, "worker": 30, "worker-2": 9}
