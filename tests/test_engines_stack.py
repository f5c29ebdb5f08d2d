"""Each engine in a real worker process on the local stack: upload -> ... -> worker -> BigQuery row
carrying the right engine, precision and model version.

The model is published to a bucket on fake-gcs-server and every worker loads it from there
(WORKER_MODEL_URI, pinned or latest). TF Serving is the stand-in (`python -m modelkit
tfserving-standin`), started here as its own process. Each extra worker has its own subscription
on the jobs topic and its own results table, so one upload reaches all of them and the main
worker goes on undisturbed.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from localcloud.demo import bigquery_rows
from localcloud.processes import Service
from tests.helpers import demo_images_the_model_gets_right, new_run_id, upload

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _reduced_precision() -> str:
    import openvino as ov

    return "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"


# worker name -> (env, expected engine, precision, model_form, engine_version or None to skip)
def _workers(model_uri: str, standin_ports: dict) -> dict[str, tuple[dict, tuple]]:
    import openvino as ov

    ov_version = ov.get_version().split("-")[0]
    rest = f"http://127.0.0.1:{standin_ports['rest_port']}"
    grpc = f"127.0.0.1:{standin_ports['grpc_port']}"
    return {
        "worker-ov-f32": ({"WORKER_ENGINE": "openvino", "WORKER_PRECISION": "f32"},
                          ("openvino", "f32", "openvino_fp32", ov_version)),
        "worker-ov-bf16": ({"WORKER_ENGINE": "openvino", "WORKER_PRECISION": "bf16"},
                           ("openvino", _reduced_precision(), "openvino_fp32", ov_version)),
        "worker-ov-int8": ({"WORKER_ENGINE": "openvino", "WORKER_PRECISION": "int8",
                            "WORKER_MODEL_URI": f"{model_uri}/1"},  # pinned
                           ("openvino", "int8", "openvino_int8", ov_version)),
        "worker-tf": ({"WORKER_ENGINE": "tensorflow", "WORKER_PRECISION": "f32"},
                      ("tensorflow", "f32", "saved_model", None)),
        "worker-tfs-rest": ({"WORKER_ENGINE": "tfserving", "WORKER_TFSERVING_URL": rest},
                            ("tfserving", "f32", "saved_model", "rest")),
        "worker-tfs-grpc": ({"WORKER_ENGINE": "tfserving", "WORKER_TFSERVING_URL": grpc,
                             "WORKER_TFSERVING_PROTOCOL": "grpc"},
                            ("tfserving", "f32", "saved_model", "grpc")),
    }


def test_every_engine_writes_rows_with_its_engine_precision_and_model_version(stack, model_dir, tmp_path):
    from google.cloud import bigquery

    from localcloud.resources import table_schema
    from modelkit.publish import publish_version
    from worker.clients import bigquery_client, storage_client, subscriber_client

    config = stack.config
    env = config.client_env()
    run_id = new_run_id()
    suffix = run_id.replace("-", "_")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    storage = storage_client(config.project, env)
    models_bucket = storage.create_bucket(f"models-{run_id}").name
    published = publish_version(model_dir, f"gs://{models_bucket}/models", storage)
    model_uri = f"gs://{models_bucket}/models/{manifest['name']}"  # latest, unless a worker pins /1

    ready_file = tmp_path / "standin.json"
    stack.processes.start(Service(
        name="tfserving-standin",
        argv=[sys.executable, "-m", "modelkit", "tfserving-standin", "--model-name", manifest["name"],
              "--model-base-path", str(model_dir.parent), "--port", "0", "--rest-api-port", "0",
              "--ready-file", str(ready_file)],
        ready=ready_file.is_file, ready_timeout_s=120.0,
    ))
    workers = _workers(model_uri, json.loads(ready_file.read_text()))
    subscriber = subscriber_client(env)
    bq = bigquery_client(config.project, env)
    schema = [bigquery.SchemaField.from_api_repr(field) for field in table_schema("results")]
    tables, subscriptions = {}, []
    try:
        for name in workers:
            tables[name] = config.table_id(f"results_{name.replace('-', '_')}_{suffix}")
            bq.create_table(bigquery.Table(tables[name], schema=schema))
            subscription = config.subscription_path(f"jobs-{name}-{run_id}")
            subscriber.create_subscription(request={"name": subscription,
                                                    "topic": config.topic_path(config.jobs_topic)})
            subscriptions.append(subscription)

        def start(item):
            name, (overrides, _) = item
            stack.start_worker(name, **{
                "WORKER_MODEL_DIR": "",  # the stack's default location; this test loads from the bucket
                "WORKER_MODEL_URI": model_uri,
                "WORKER_MODEL_CACHE_DIR": str(tmp_path / "model-cache"),  # shared: concurrent downloads
                "WORKER_SUBSCRIPTION": subscriptions[list(workers).index(name)],
                "WORKER_RESULTS_TABLE": tables[name],
                **overrides,
            })

        started = time.monotonic()
        with ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(start, workers.items()))
        startup_s = time.monotonic() - started

        images = demo_images_the_model_gets_right(per_class=2)
        expected_labels = {}
        for class_name, path in images:
            name = f"{config.prefix}{run_id}/{path.name}"
            upload(stack, name, path.read_bytes(), run_id)
            expected_labels[name] = class_name

        rows = _wait_for_rows(config, tables, run_id, len(images), timeout_s=120)

        for name, (_, (engine, precision, form, engine_version)) in workers.items():
            assert len(rows[name]) == len(images), (name, _log_tail(config, name))
            for row in rows[name]:
                assert (row["engine"], row["precision"], row["model_form"]) == (engine, precision, form), name
                assert (row["model_name"], row["model_version"]) == (manifest["name"], str(manifest["version"]))
                assert row["label"] == expected_labels[row["object_name"]], (name, row["object_name"])
                if engine_version:
                    assert row["engine_version"] == engine_version, name
                assert row["batch_inference_ms"] > 0
        for name in workers:
            log = (config.run_dir / "logs" / f"{name}.log").read_text()
            assert f"from {published.uri}" in log, name  # loaded from the bucket, verified
        assert startup_s < 150
    finally:
        for name in workers:
            stack.stop_worker(name)
        stack.processes.stop("tfserving-standin")
        for subscription in subscriptions:
            subscriber.delete_subscription(subscription=subscription)
        for blob in storage.list_blobs(models_bucket):
            blob.delete()
        storage.bucket(models_bucket).delete()


def _wait_for_rows(config, tables: dict[str, str], run_id: str, expected: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    rows: dict[str, list[dict]] = {}
    while True:
        for name, table in tables.items():
            if len(rows.get(name, [])) < expected:
                rows[name] = bigquery_rows(config, f"SELECT * FROM `{table}` WHERE run_id = @run_id",
                                           {"run_id": run_id})
        if all(len(found) >= expected for found in rows.values()) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _log_tail(config, name: str, lines: int = 15) -> str:
    path = config.run_dir / "logs" / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"
