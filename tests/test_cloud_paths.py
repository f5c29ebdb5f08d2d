"""Where `modelkit train` reads and writes on Vertex AI: gs:// <-> /gcs FUSE paths, AIP_MODEL_DIR,
the machine's cores, the JSON log lines (pure functions; the bucket round trip is in
tests/test_rollout_stack.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from modelkit import cloud_paths
from modelkit.errors import ModelkitError


def test_gcs_uris_and_fuse_paths_map_both_ways():
    assert cloud_paths.to_fuse_path("gs://b/datasets/demo") == Path("/gcs/b/datasets/demo")
    assert cloud_paths.to_fuse_path("gs://b") == Path("/gcs/b")
    assert cloud_paths.from_fuse_path("/gcs/b/models") == "gs://b/models"
    assert cloud_paths.from_fuse_path("/gcs") is None and cloud_paths.from_fuse_path("/data/x") is None
    with pytest.raises(ModelkitError, match="names no bucket"):
        cloud_paths.to_fuse_path("gs://")


def test_the_output_is_out_else_aip_model_dir_and_a_fuse_path_is_written_through_the_api():
    vertex = {"AIP_MODEL_DIR": "gs://b/vertex-jobs/x/model/", "CLOUD_ML_JOB_ID": "42"}

    assert cloud_paths.output_location("gs://b/models/", vertex) == "gs://b/models"
    assert cloud_paths.output_location(None, vertex) == "gs://b/vertex-jobs/x/model"
    assert cloud_paths.output_location("/gcs/b/models", {}) == "gs://b/models"
    assert cloud_paths.output_location("build/models", {}) == "build/models"
    assert cloud_paths.on_vertex(vertex) and not cloud_paths.on_vertex({})
    with pytest.raises(ModelkitError, match="pass --out .* or run where AIP_MODEL_DIR is set"):
        cloud_paths.output_location(None, {})


def test_a_gcs_dataset_is_read_through_the_fuse_mount_when_it_is_there(tmp_path):
    mounted = tmp_path / "gcs" / "b" / "datasets" / "demo"
    mounted.mkdir(parents=True)

    def no_client():
        raise AssertionError("the mount was there: nothing should be downloaded")

    assert cloud_paths.dataset_folder("gs://b/datasets/demo", tmp_path / "scratch", no_client,
                                      fuse_root=tmp_path / "gcs") == mounted
    assert cloud_paths.dataset_folder("local/dir", tmp_path / "scratch", no_client) == Path("local/dir")


class Blob:
    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data

    def download_to_filename(self, path: str) -> None:
        Path(path).write_bytes(self.data)


class Client:
    def __init__(self, blobs):
        self.blobs = blobs

    def list_blobs(self, bucket, prefix=None):
        return [blob for blob in self.blobs if blob.name.startswith(prefix or "")]


def test_without_the_mount_the_prefix_is_downloaded_keeping_class_folders(tmp_path):
    client = Client([Blob("datasets/demo/", b""), Blob("datasets/demo/grass/a.png", b"g"),
                     Blob("datasets/demo/moon/b.png", b"m"), Blob("datasets/demo-other/c.png", b"x")])

    folder = cloud_paths.dataset_folder("gs://b/datasets/demo", tmp_path, lambda: client,
                                        fuse_root=tmp_path / "no-mount")

    assert folder == tmp_path / "demo"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "grass/a.png", "moon/b.png"]
    with pytest.raises(ModelkitError, match=r"no objects under gs://b/empty/: upload the dataset there"):
        cloud_paths.download_prefix("gs://b/empty", tmp_path / "e", client)


def test_the_next_version_is_one_above_the_highest_with_a_manifest(tmp_path):
    for version in (1, 4):
        (tmp_path / "demo" / str(version)).mkdir(parents=True)
        (tmp_path / "demo" / str(version) / "manifest.json").write_text("{}")
    (tmp_path / "demo" / "7").mkdir()  # no manifest: not a version yet

    assert cloud_paths.next_version(str(tmp_path), "demo", lambda: None) == 5
    assert cloud_paths.next_version(str(tmp_path), "other", lambda: None) == 1


def test_cores_come_from_the_affinity_capped_by_a_cgroup_quota():
    assert cloud_paths._quota_v2("max 100000") is None
    assert cloud_paths._quota_v2("400000 100000") == 4
    assert cloud_paths._quota_v2("150000 100000") == 2  # 1.5 CPUs: two threads
    assert 1 <= cloud_paths.available_cores() <= len(__import__("os").sched_getaffinity(0))


def test_json_log_lines_carry_severity_step_and_metrics_for_cloud_logging():
    from worker.logs import JsonFormatter

    record = logging.LogRecord("modelkit.train", logging.INFO, __file__, 1, "epoch %d/%d: loss %.4f", (2, 12, 0.25),
                               None)
    record.step, record.metrics = 2, {"loss": 0.25}

    line = json.loads(JsonFormatter().format(record))

    assert (line["severity"], line["message"], line["step"], line["metrics"]) == (
        "INFO", "epoch 2/12: loss 0.2500", 2, {"loss": 0.25})
    import datetime as dt

    # RFC 3339 in UTC, which Cloud Logging reads as the entry's timestamp.
    stamp = dt.datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert line["time"].endswith("Z") and abs(stamp.timestamp() - record.created) < 0.002
