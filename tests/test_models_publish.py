"""Publishing model versions to a bucket and locating them in the worker (worker.models).

Local-directory cases need nothing; bucket cases run on the stack's fake-gcs-server.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from modelspec.manifest import MANIFEST_NAME, write_manifest
from modelkit.publish import PublishError, publish_version
from worker.models import ModelLocationError, locate_model


def make_version(models_root: Path, name: str, version: int, payload: bytes = b"weights") -> Path:
    """A small version directory with the manifest contract (files hashed, manifest last)."""
    version_dir = models_root / name / str(version)
    (version_dir / "variables").mkdir(parents=True)
    (version_dir / "saved_model.pb").write_bytes(b"graph-" + payload)
    (version_dir / "variables" / "variables.data").write_bytes(payload * 100)
    write_manifest(version_dir, {
        "name": name, "version": version, "input": {}, "outputs": {}, "preprocessing": {},
        "class_names": ["a", "b"], "threshold": 0.5, "forms": {"saved_model": "."},
    })
    return version_dir


# Local directories ----------------------------------------------------------------------------

def test_a_local_version_directory_is_used_as_pinned(tmp_path):
    version_dir = make_version(tmp_path, "m", 3)

    located = locate_model(str(version_dir), tmp_path / "cache")

    assert (located.path, located.manifest["version"], located.downloaded) == (version_dir, 3, False)


def test_a_local_model_root_means_its_latest_complete_version(tmp_path):
    make_version(tmp_path, "m", 2)
    make_version(tmp_path, "m", 10)  # numeric order, not string order
    (tmp_path / "m" / "11").mkdir()  # no manifest yet: still being written
    (tmp_path / "m" / ".12.staging-abc").mkdir()

    located = locate_model(str(tmp_path / "m"), tmp_path / "cache")

    assert located.path == tmp_path / "m" / "10"


def test_a_local_version_that_fails_verification_is_refused(tmp_path):
    version_dir = make_version(tmp_path, "m", 1)
    (version_dir / "saved_model.pb").write_bytes(b"edited")

    with pytest.raises(ModelLocationError, match="saved_model.pb differs"):
        locate_model(str(version_dir), tmp_path / "cache")
    with pytest.raises(ModelLocationError, match="does not exist"):
        locate_model(str(tmp_path / "absent"), tmp_path / "cache")


def test_worker_settings_accept_a_model_uri_and_refuse_two_locations(tmp_path):
    from worker.settings import SettingsError, WorkerSettings

    base = {"GOOGLE_CLOUD_PROJECT": "p", "WORKER_SUBSCRIPTION": "s", "WORKER_RESULTS_TABLE": "p.d.r",
            "WORKER_ERRORS_TABLE": "p.d.e"}
    make_version(tmp_path, "m", 1)

    settings = WorkerSettings.from_env({**base, "WORKER_MODEL_URI": "gs://bucket/models/m"})
    local = WorkerSettings.from_env({**base, "WORKER_MODEL_URI": str(tmp_path / "m")})

    assert settings.model_location == "gs://bucket/models/m"
    assert local.model_location == str(tmp_path / "m")
    with pytest.raises(SettingsError, match="not both"):
        WorkerSettings.from_env({**base, "WORKER_MODEL_URI": "gs://b/m", "WORKER_MODEL_DIR": str(tmp_path / "m" / "1")})
    with pytest.raises(SettingsError, match="WORKER_MODEL_URI"):
        WorkerSettings.from_env(base)
    with pytest.raises(SettingsError, match="WORKER_TFSERVING_URL"):
        WorkerSettings.from_env({**base, "WORKER_MODEL_URI": "gs://b/m", "WORKER_ENGINE": "tfserving"})
    with pytest.raises(SettingsError, match="does not apply to WORKER_ENGINE=tensorflow"):
        WorkerSettings.from_env({**base, "WORKER_MODEL_URI": "gs://b/m", "WORKER_ENGINE": "tensorflow",
                                 "WORKER_PRECISION": "int8"})


# A bucket on the local stack ------------------------------------------------------------------

@pytest.fixture
def gcs(stack):
    from worker.clients import storage_client

    client = storage_client(stack.config.project, stack.config.client_env())
    bucket = client.create_bucket(f"models-{uuid.uuid4().hex[:10]}")
    yield client, bucket.name
    for blob in client.list_blobs(bucket.name):
        blob.delete()
    bucket.delete()




@pytest.mark.stack
def test_publish_puts_the_version_under_name_and_version_with_the_manifest(gcs, tmp_path):
    client, bucket = gcs
    version_dir = make_version(tmp_path, "m", 1)

    published = publish_version(version_dir, f"gs://{bucket}", client)
    again = publish_version(version_dir, f"gs://{bucket}", client)

    assert published.uri == f"gs://{bucket}/models/m/1" and published.uploaded
    assert not again.uploaded  # identical manifest: nothing to do
    names = sorted(blob.name for blob in client.list_blobs(bucket))
    assert names == ["models/m/1/manifest.json", "models/m/1/saved_model.pb", "models/m/1/variables/variables.data"]


@pytest.mark.stack
def test_a_published_version_is_immutable_unless_overwritten(gcs, tmp_path):
    client, bucket = gcs
    publish_version(make_version(tmp_path / "a", "m", 1), f"gs://{bucket}/registry", client)
    other = make_version(tmp_path / "b", "m", 1, payload=b"retrained")

    with pytest.raises(PublishError, match="versions are immutable"):
        publish_version(other, f"gs://{bucket}/registry", client)
    publish_version(other, f"gs://{bucket}/registry", client, overwrite=True)

    located = locate_model(f"gs://{bucket}/registry/m/1", tmp_path / "cache", lambda: client)
    assert (located.path / "saved_model.pb").read_bytes() == b"graph-retrained"


@pytest.mark.stack
def test_the_worker_downloads_the_latest_version_once_and_verifies_it(gcs, tmp_path):
    client, bucket = gcs
    for version in (1, 2):
        publish_version(make_version(tmp_path, "m", version, payload=b"v%d" % version), f"gs://{bucket}", client)
    # Version 3 is half-published: files are up, the manifest (uploaded last) is not.
    client.bucket(bucket).blob("models/m/3/saved_model.pb").upload_from_string(b"partial")
    cache = tmp_path / "cache"

    first = locate_model(f"gs://{bucket}/models/m", cache, lambda: client)
    second = locate_model(f"gs://{bucket}/models/m/", cache, lambda: client)
    pinned = locate_model(f"gs://{bucket}/models/m/1", cache, lambda: client)

    assert (first.manifest["version"], first.source, first.downloaded) == (2, f"gs://{bucket}/models/m/2", True)
    assert first.path == cache / bucket / "models" / "m" / "2"
    assert not (tmp_path / "m" / "2").samefile(first.path)
    assert (second.path, second.downloaded) == (first.path, False)  # reused from the cache
    assert (pinned.manifest["version"], pinned.downloaded) == (1, True)
    assert sorted(p.name for p in (cache / bucket / "models" / "m").iterdir()) == ["1", "2"]  # no staging left


@pytest.mark.stack
def test_a_tampered_bucket_object_is_caught_by_the_manifest_hashes(gcs, tmp_path):
    client, bucket = gcs
    publish_version(make_version(tmp_path, "m", 1), f"gs://{bucket}", client)
    client.bucket(bucket).blob("models/m/1/variables/variables.data").upload_from_string(b"swapped")

    with pytest.raises(ModelLocationError, match="variables.data differs"):
        locate_model(f"gs://{bucket}/models/m", tmp_path / "cache", lambda: client)
    assert list((tmp_path / "cache" / bucket / "models" / "m").iterdir()) == []


@pytest.mark.stack
def test_a_manifest_that_points_outside_the_version_is_refused(gcs, tmp_path):
    client, bucket = gcs
    manifest = {"name": "m", "version": 1, "files": {"../../escape": "0" * 64}}
    client.bucket(bucket).blob("models/m/1/manifest.json").upload_from_string(json.dumps(manifest))

    with pytest.raises(ModelLocationError, match="unsafe path '../../escape'"):
        locate_model(f"gs://{bucket}/models/m", tmp_path / "cache", lambda: client)


@pytest.mark.stack
def test_missing_versions_have_clear_errors(gcs, tmp_path):
    client, bucket = gcs

    with pytest.raises(ModelLocationError, match="no published version under"):
        locate_model(f"gs://{bucket}/models/none", tmp_path / "cache", lambda: client)
    with pytest.raises(ModelLocationError, match="manifest.json does not exist"):
        locate_model(f"gs://{bucket}/models/none/4", tmp_path / "cache", lambda: client)


@pytest.mark.stack
def test_the_publish_command_uses_the_emulator_from_the_environment(gcs, tmp_path, stack, monkeypatch):
    from modelkit.cli import cli

    client, bucket = gcs
    for key, value in stack.config.client_env().items():
        monkeypatch.setenv(key, value)
    version_dir = make_version(tmp_path, "m", 5)

    result = CliRunner().invoke(cli, ["publish", str(version_dir), f"gs://{bucket}/models"])
    again = CliRunner().invoke(cli, ["publish", str(version_dir), f"gs://{bucket}/models"])

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"published gs://{bucket}/models/m/5 (2 files + {MANIFEST_NAME})")
    assert again.stdout.startswith("unchanged")
