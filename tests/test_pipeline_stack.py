"""The main flow on the real local servers: upload -> notification -> Eventarc stand-in -> function
-> Pub/Sub -> worker -> BigQuery."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from localcloud.demo import bigquery_rows
from localcloud.stack import cli_env
from tests.helpers import demo_images_the_model_gets_right, new_run_id, png_bytes, rows_for_run, upload

pytestmark = pytest.mark.stack


def test_uploaded_images_become_one_row_each_with_the_right_label(stack):
    run_id = new_run_id()
    images = demo_images_the_model_gets_right(per_class=3)
    generations = {}
    for class_name, path in images:
        name = f"{stack.config.prefix}{run_id}/{path.name}"
        generations[name] = (class_name, upload(stack, name, path.read_bytes(), run_id))

    results, errors = rows_for_run(stack, run_id, expected=len(images))

    assert errors == []
    assert len(results) == len(images)
    manifest_version = str(json.loads((stack.config.model_dir / "manifest.json").read_text())["version"])
    for row in results:
        class_name, generation = generations[row["object_name"]]
        assert row["label"] == class_name, row["object_name"]
        assert row["generation"] == generation
        assert row["event_key"] == f"{stack.config.bucket}/{row['object_name']}#{generation}"
        assert row["engine"] == "openvino" and row["precision"] == "f32"
        assert row["model_name"] == "demo" and row["model_version"] == manifest_version
        assert 0.5 <= row["score"] <= 1.0  # the label's own score: a binary model's winner has at least 0.5
        assert row["class_index"] == ["grass", "moon"].index(class_name)
        assert [(c["label"], c["class_index"]) for c in row["top_k"]] == [(class_name, row["class_index"]),
                                                                          (({"grass", "moon"} - {class_name}).pop(),
                                                                           1 - row["class_index"])]
        assert row["top_k"][0]["score"] == pytest.approx(row["score"])
        assert row["top_k"][0]["score"] + row["top_k"][1]["score"] == pytest.approx(1.0)
        assert row["input_spec"] == "128x128x1 NHWC gray"
        assert row["content_type"] == "image/png" and row["size_bytes"] > 0
        assert row["inference_ms"] > 0 and row["total_ms"] >= row["inference_ms"]
        assert row["download_ms"] is not None and row["preprocess_ms"] is not None
        assert row["function_to_worker_ms"] is not None and row["worker_host"]
        assert row["processed_at"] >= row["received_at"]
        stages = sum(row[stage] for stage in ("queue_ms", "download_ms", "preprocess_ms", "batch_wait_ms",
                                              "batch_inference_ms"))
        assert abs(stages - row["total_ms"]) <= 0.05 * row["total_ms"], (stages, row)
        assert isinstance(row["memory_available_bytes"], int) and isinstance(row["cpu_percent"], float)
    # Batch rows (the sink's time) are written after the results, off the critical path.
    deadline = time.monotonic() + 15
    while True:
        batches = bigquery_rows(stack.config, "SELECT batch_id, images, results, sink_ms FROM "
                                              "`${project}.${dataset}.batches`", {})
        by_id = {batch["batch_id"]: batch for batch in batches}
        if {row["batch_id"] for row in results} <= set(by_id) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for batch_id in {row["batch_id"] for row in results}:
        batch = by_id[batch_id]
        assert batch["sink_ms"] > 0 and batch["results"] == batch["images"] >= 1
        assert sum(1 for row in results if row["batch_id"] == batch_id) <= batch["images"]


def test_a_non_image_upload_ends_as_one_error_row_with_a_reason(stack):
    run_id = new_run_id()
    upload(stack, f"{stack.config.prefix}{run_id}/report.pdf", b"%PDF-1.4 not an image", run_id,
           content_type="application/pdf")
    upload(stack, f"{stack.config.prefix}{run_id}/empty.png", b"", run_id)
    upload(stack, f"{stack.config.prefix}{run_id}/ok.png", png_bytes(1), run_id)

    results, errors = rows_for_run(stack, run_id, expected=3)

    assert [r["object_name"].rsplit("/", 1)[1] for r in results] == ["ok.png"]
    reasons = {e["object_name"].rsplit("/", 1)[1]: e["reason"] for e in errors}
    assert reasons == {"report.pdf": "not_an_image", "empty.png": "empty_object"}
    assert all(e["message"] for e in errors)


def test_objects_outside_the_prefix_or_in_other_buckets_are_not_classified(stack):
    from google.api_core.exceptions import Conflict

    from worker.clients import storage_client

    run_id = new_run_id()
    try:
        storage_client(stack.config.project, stack.config.client_env()).create_bucket("other-bucket")
    except Conflict:
        pass
    upload(stack, f"elsewhere/{run_id}/skip.png", png_bytes(2), run_id)
    upload(stack, f"{stack.config.prefix}{run_id}/other-bucket.png", png_bytes(2), run_id, bucket="other-bucket")
    upload(stack, f"{stack.config.prefix}{run_id}/take.png", png_bytes(3), run_id)

    results, errors = rows_for_run(stack, run_id, expected=1)
    time.sleep(1.0)  # give a wrongly published job time to arrive too
    results, errors = rows_for_run(stack, run_id, expected=2, timeout_s=0)

    assert [r["object_name"] for r in results] == [f"{stack.config.prefix}{run_id}/take.png"]
    assert errors == []
    function_log = (stack.config.run_dir / "logs" / "function.log").read_text()
    assert "not the upload bucket" in function_log


@pytest.mark.parametrize("tool", ["gcloud", "gsutil"])
def test_the_real_cli_upload_yields_a_row(stack, tool, tmp_path):
    run_id = new_run_id()
    image = tmp_path / f"{tool}.png"
    image.write_bytes(png_bytes(4))
    destination = f"gs://{stack.config.bucket}/{stack.config.prefix}{run_id}/{tool}.png"
    if tool == "gcloud":
        command = ["gcloud", "storage", "cp", f"--custom-metadata=run_id={run_id}", str(image), destination]
    else:
        command = ["gsutil", "-q", "-h", f"x-goog-meta-run_id:{run_id}", "cp", str(image), destination]
    completed = subprocess.run(command, env={**os.environ, **cli_env(stack.config)}, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr

    results, errors = rows_for_run(stack, run_id, expected=1)

    assert len(results) == 1 and errors == []
    assert results[0]["object_name"].endswith(f"{tool}.png")


def test_reuploading_the_same_name_gives_a_new_generation_and_a_new_row(stack):
    run_id = new_run_id()
    name = f"{stack.config.prefix}{run_id}/same.png"
    first = upload(stack, name, png_bytes(5), run_id)
    rows_for_run(stack, run_id, expected=1)
    second = upload(stack, name, png_bytes(6), run_id)

    results, _ = rows_for_run(stack, run_id, expected=2)

    assert first != second
    assert sorted(r["generation"] for r in results) == sorted([first, second])


def test_the_worker_acks_only_after_the_row_is_accepted(stack):
    """With its results table missing, a worker must keep the job (nack), not drop it.
    Once the table exists, the same job becomes a row: nothing was acked before the insert.

    The test worker has a subscription of its own on the jobs topic, so the main worker goes on
    undisturbed (it writes its own row to the usual table)."""
    from google.cloud import bigquery

    from localcloud.resources import table_schema
    from worker.clients import bigquery_client, subscriber_client

    config = stack.config
    run_id = new_run_id()
    late_table = config.table_id(f"results_late_{run_id.replace('-', '_')}")
    subscription = config.subscription_path(f"jobs-late-{run_id}")
    subscriber = subscriber_client(config.client_env())
    subscriber.create_subscription(request={"name": subscription, "topic": config.topic_path(config.jobs_topic)})
    try:
        stack.start_worker("worker-late", WORKER_RESULTS_TABLE=late_table, WORKER_SUBSCRIPTION=subscription)
        upload(stack, f"{config.prefix}{run_id}/late.png", png_bytes(7), run_id)
        time.sleep(4.0)  # several delivery attempts fail meanwhile
        log = (config.run_dir / "logs" / "worker-late.log").read_text().splitlines()
        assert any("will retry" in line and f"{run_id}/late.png" in line for line in log)

        client = bigquery_client(config.project, config.client_env())
        client.create_table(bigquery.Table(late_table, schema=[bigquery.SchemaField.from_api_repr(f)
                                                               for f in table_schema("results")]))
        deadline = time.monotonic() + 60
        rows = []
        while time.monotonic() < deadline and not rows:
            rows = bigquery_rows(config, f"SELECT object_name FROM `{late_table}` WHERE run_id = @run_id",
                                 {"run_id": run_id})
            time.sleep(0.5)
        assert [r["object_name"] for r in rows] == [f"{config.prefix}{run_id}/late.png"]
    finally:
        stack.stop_worker("worker-late")
        subscriber.delete_subscription(subscription=subscription)


def test_a_results_table_from_before_schema_v2_gains_the_new_columns_and_takes_new_rows(stack):
    """The migration of sql/migrations/002: class_index, top_k and input_spec are added in place."""
    from google.cloud import bigquery

    from localcloud.resources import add_missing_columns, table_schema
    from worker.clients import bigquery_client

    config = stack.config
    client = bigquery_client(config.project, config.client_env())
    current = [bigquery.SchemaField.from_api_repr(field) for field in table_schema("results")]
    v2_columns = ["class_index", "top_k", "input_spec"]
    table_id = config.table_id(f"results_v1_{new_run_id().replace('-', '_')}")
    client.create_table(bigquery.Table(table_id, schema=[f for f in current if f.name not in v2_columns]))

    added = add_missing_columns(client, table_id, current)
    row = {"event_key": "b/o#1", "label": "moon", "score": 0.9, "model_name": "demo", "model_version": "1",
           "engine": "openvino", "processed_at": "2026-12-01T00:00:00+00:00", "class_index": 1,
           "top_k": [{"label": "moon", "score": 0.9, "class_index": 1}], "input_spec": "128x128x1 NHWC gray"}
    required = {f.name for f in current if f.mode == "REQUIRED"} - set(row)
    filler = {"INTEGER": 1, "FLOAT": 0.0, "TIMESTAMP": "2026-12-01T00:00:00+00:00", "BOOLEAN": False, "STRING": "x"}
    row.update({f.name: filler[f.field_type] for f in current if f.name in required})
    errors = client.insert_rows_json(table_id, [row])

    assert added == v2_columns
    assert errors == []
    assert add_missing_columns(client, table_id, current) == []
