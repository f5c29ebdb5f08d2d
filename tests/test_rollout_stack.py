"""Training publishes a version to the bucket and a running worker switches to it mid-load, on the
real local stack (fake-gcs-server, Pub/Sub emulator, BigQuery emulator, `python -m worker run`).

The training step runs the training image (`inference-train:local`, issue 17's localcloud.containers)
when the container engine holds it, else the same `python -m modelkit train ...` as a host process:
TRAIN_RUNNER=host|container forces one. Either way it reads the dataset from gs:// on the fake
bucket and publishes gs://BUCKET/models/demo/2 with the manifest last.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from modelkit.publish import publish_version
from modelspec.manifest import load_manifest, write_manifest
from tests.helpers import DEMO_DATASET, IsolatedWorker, new_run_id, png_bytes, upload
from localcloud.demo import bigquery_rows

pytestmark = [pytest.mark.stack, pytest.mark.slow]
POLL_S = "1"


@pytest.fixture
def models_bucket(stack, model_dir):
    """A bucket of its own holding demo/1 (the build's model) at gs://BUCKET/models/demo/1."""
    from worker.clients import storage_client

    client = storage_client(stack.config.project, stack.config.client_env())
    bucket = client.create_bucket(f"models-{uuid.uuid4().hex[:10]}")
    publish_version(model_dir, f"gs://{bucket.name}/models", client)
    yield client, bucket.name
    for blob in client.list_blobs(bucket.name):
        blob.delete()
    bucket.delete()


def rollout_worker(stack, name: str, bucket: str, tmp_path: Path) -> IsolatedWorker:
    return IsolatedWorker(stack, name, WORKER_MODEL_DIR="", WORKER_MODEL_URI=f"gs://{bucket}/models/demo",
                          WORKER_MODEL_POLL_S=POLL_S, WORKER_MODEL_CACHE_DIR=str(tmp_path / "model-cache"))


class Uploads:
    """Uploads small PNGs to the pipeline at a steady pace, from a thread, until stopped."""

    def __init__(self, stack, run_id: str, per_s: float = 4.0):
        self.stack, self.run_id, self.pause_s = stack, run_id, 1.0 / per_s
        self.names: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            name = f"{self.stack.config.prefix}{self.run_id}/{len(self.names)}.png"
            upload(self.stack, name, png_bytes(7000 + len(self.names), size=64), self.run_id)
            self.names.append(name)
            self._stop.wait(self.pause_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def run_training(args: list[str], env: dict[str, str]) -> tuple[str, str]:
    """`python -m modelkit ARGS` in the training image when it is built, else on the host.
    Returns (which, output). Both talk to the stack's emulators on 127.0.0.1."""
    # make test builds the images first (REQUIRE_IMAGES=1): there the container must run, never a fallback.
    choice = os.environ.get("TRAIN_RUNNER") or ("container" if os.environ.get("REQUIRE_IMAGES") == "1" else "auto")
    if choice in ("auto", "container"):
        try:
            from localcloud import containers

            if containers.image_exists(containers.image_tag("train")):
                done = containers.run(containers.image_tag("train"), args, env=env, network_host=True, timeout_s=900)
                return "container " + containers.image_tag("train"), done.stdout + done.stderr
            if choice == "container":
                raise AssertionError(f"no image {containers.image_tag('train')}: run `make images`")
        except Exception as exc:  # no engine here: the host process below (or a failure when forced)
            if choice == "container":
                raise
            print(f"training image not usable ({exc}); training as a host process")
    done = subprocess.run([sys.executable, "-m", "modelkit", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"training failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return "host process", done.stdout + done.stderr


def upload_dataset(client, bucket: str, per_class: int) -> str:
    """The first per_class demo images of each class under gs://BUCKET/datasets/demo/<class>/."""
    bucket_ref = client.bucket(bucket)
    for class_dir in sorted(p for p in DEMO_DATASET.iterdir() if p.is_dir()):
        for path in sorted(class_dir.iterdir())[:per_class]:
            bucket_ref.blob(f"datasets/demo/{class_dir.name}/{path.name}").upload_from_filename(str(path))
    bucket_ref.blob("datasets/demo/dataset.json").upload_from_filename(str(DEMO_DATASET / "dataset.json"))
    return f"gs://{bucket}/datasets/demo"


def rows_by_version(stack, worker: IsolatedWorker, run_id: str) -> list[dict]:
    return bigquery_rows(stack.config, f"SELECT model_version, batch_id, processed_at, object_name FROM "
                                       f"`${{project}}.${{dataset}}.{worker.results_table}` WHERE run_id = @run_id",
                         {"run_id": run_id})


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_training_publishes_the_next_version_and_a_running_worker_switches_to_it_mid_load(stack, models_bucket,
                                                                                          tmp_path):
    client, bucket = models_bucket
    dataset_uri = upload_dataset(client, bucket, per_class=40)
    worker = rollout_worker(stack, "rollout", bucket, tmp_path)
    worker.start()
    run_id = new_run_id()
    try:
        with Uploads(stack, run_id) as uploads:
            wait_until(lambda: worker.counts(run_id)["results"] >= 20, 120, "rows from version 1")
            # --epochs 1 keeps the test short; the version still verifies and loads like any other.
            how, output = run_training(["train", "--data", dataset_uri, "--out", f"gs://{bucket}/models",
                                        "--name", "demo", "--epochs", "1"], stack.config.client_env())
            print(f"\ntrained with the {how}")
            assert f"published gs://{bucket}/models/demo/2 " in output, output[-3000:]
            wait_until(lambda: any(r["model_version"] == "2" for r in rows_by_version(stack, worker, run_id)), 120,
                       "a row served by version 2")
            served_by_2 = sum(r["model_version"] == "2" for r in rows_by_version(stack, worker, run_id))
            wait_until(lambda: sum(r["model_version"] == "2" for r in rows_by_version(stack, worker, run_id))
                       >= served_by_2 + 20, 120, "more rows after the switch")
        uploaded = len(uploads.names)
        counts = worker.wait(run_id, uploaded, timeout_s=180)
        rows = rows_by_version(stack, worker, run_id)
        log = stack.processes.log_file(worker.name).read_text()
    finally:
        worker.close()

    print(f"ROLLOUT | {uploaded} uploaded | {counts['results']} result rows | {counts['errors']} error rows | "
          f"version 1: {sum(r['model_version'] == '1' for r in rows)} rows, version 2: "
          f"{sum(r['model_version'] == '2' for r in rows)} rows")
    assert counts["results"] + counts["errors"] == uploaded, "an upload has no row"
    assert counts["result_rows"] + counts["error_rows"] == uploaded, "an upload has two rows"
    assert counts["in_both"] == 0
    assert {r["model_version"] for r in rows} == {"1", "2"}
    versions_per_batch = {}
    for row in rows:
        versions_per_batch.setdefault(row["batch_id"], set()).add(row["model_version"])
    assert all(len(v) == 1 for v in versions_per_batch.values()), "a batch mixed two versions"
    first_v2 = min(r["processed_at"] for r in rows if r["model_version"] == "2")
    assert min(r["processed_at"] for r in rows if r["model_version"] == "1") < first_v2
    assert "model switched from demo/1 to demo/2" in log and "model demo/1 freed" in log
    published = load_manifest_from_bucket(client, bucket, "models/demo/2")
    assert published["dataset"]["source"] == dataset_uri
    assert published["training"]["epochs"] == 1


def load_manifest_from_bucket(client, bucket: str, prefix: str) -> dict:
    return json.loads(client.bucket(bucket).blob(f"{prefix}/manifest.json").download_as_bytes())


def small_version(model_dir: Path, root: Path, version: int, model_xml: bytes) -> Path:
    """A version whose manifest is the demo's (version changed) over small stand-in files: its hashes
    match, so it passes verification, and whether it loads depends on model_xml."""
    target = root / "demo" / str(version)
    for form in ("fp32", "fp16", "int8"):
        (target / "openvino" / form).mkdir(parents=True)
        (target / "openvino" / form / "model.xml").write_bytes(model_xml)
        (target / "openvino" / form / "model.bin").write_bytes(b"\0" * 64)
    manifest = load_manifest(model_dir)
    write_manifest(target, {**manifest, "version": version})
    return target


def test_corrupt_or_half_published_versions_never_replace_the_serving_one(stack, models_bucket, model_dir, tmp_path):
    client, bucket = models_bucket
    worker = rollout_worker(stack, "guard", bucket, tmp_path)
    worker.start()
    run_id = new_run_id()
    destination = f"gs://{bucket}/models"
    try:
        with Uploads(stack, run_id) as uploads:
            wait_until(lambda: worker.counts(run_id)["results"] >= 10, 120, "rows from version 1")
            # 2: published complete, then a file changed in the bucket (sha256 mismatch).
            publish_version(small_version(model_dir, tmp_path / "v", 2, b"<net/>"), destination, client)
            client.bucket(bucket).blob("models/demo/2/openvino/fp32/model.bin").upload_from_string(b"swapped")
            # 3: half-published: files are up, the manifest (uploaded last) is not.
            three = small_version(model_dir, tmp_path / "v", 3, b"<net/>")
            client.bucket(bucket).blob("models/demo/3/openvino/fp32/model.xml").upload_from_filename(
                str(three / "openvino" / "fp32" / "model.xml"))
            # 4: every hash matches, but the engine cannot read the model.
            publish_version(small_version(model_dir, tmp_path / "v", 4, b"this is not OpenVINO IR"), destination,
                            client)
            log_file = stack.processes.log_file(worker.name)
            wait_until(lambda: "models/demo/2: fails verification" in log_file.read_text(), 60, "version 2 refused")
            before = worker.counts(run_id)["results"]
            wait_until(lambda: worker.counts(run_id)["results"] >= before + 10, 120, "rows after the refusals")
        uploaded = len(uploads.names)
        counts = worker.wait(run_id, uploaded, timeout_s=180)
        rows = rows_by_version(stack, worker, run_id)
        log = log_file.read_text()
        alive = worker.process() is not None
    finally:
        worker.close()

    assert alive, "the worker died on a bad version"
    assert counts["results"] + counts["errors"] == uploaded and counts["result_rows"] == counts["results"]
    assert {r["model_version"] for r in rows} == {"1"}, "a bad version served rows"
    assert f"refused model version gs://{bucket}/models/demo/4: fails to load" in log
    assert (f"refused model version gs://{bucket}/models/demo/2: fails verification" in log
            and "openvino/fp32/model.bin differs from the manifest (sha256 mismatch)" in log)
    assert "models/demo/3" not in log, "a version without its manifest was looked at"
    assert log.count("refused model version") == 2, "a refused version was tried again"
