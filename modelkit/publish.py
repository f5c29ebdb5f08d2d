"""Publish a model version to a bucket: gs://BUCKET/<path>/<name>/<version>/, manifest last.

The manifest is uploaded after every file it lists, so a reader that finds `manifest.json` finds a
complete version (worker.models picks "latest" by manifest). A published version is immutable:
publishing the same version again is a no-op when its manifest is identical and an error
otherwise, unless overwrite is asked for (then the old manifest goes first, stale files after).
Works against the local fake-gcs-server through STORAGE_EMULATOR_HOST (worker.clients).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from modelkit.errors import ModelkitError
from modelspec.manifest import MANIFEST_NAME, verify_manifest

_LOGGER = logging.getLogger(__name__)


class PublishError(ModelkitError):
    """The version cannot be published where asked."""


@dataclass(frozen=True)
class Published:
    uri: str  # gs://bucket/path/name/version
    files: int
    uploaded: bool  # False when the identical version was already there


def publish_version(version_dir: Path, destination: str, client, overwrite: bool = False) -> Published:
    """Upload version_dir (verified first) under destination (gs://BUCKET[/path], default path
    "models") as <name>/<version>/."""
    from google.api_core.exceptions import NotFound

    version_dir = Path(version_dir)
    manifest = verify_manifest(version_dir)
    bucket_name, base = parse_destination(destination)
    prefix = f"{base}/{manifest['name']}/{manifest['version']}"
    uri = f"gs://{bucket_name}/{prefix}"
    bucket = client.bucket(bucket_name)
    manifest_bytes = (version_dir / MANIFEST_NAME).read_bytes()

    manifest_blob = bucket.blob(f"{prefix}/{MANIFEST_NAME}")
    try:
        existing = manifest_blob.download_as_bytes()
    except NotFound:
        existing = None
    if existing == manifest_bytes:
        _LOGGER.info("%s is already published with the same manifest", uri)
        return Published(uri, len(manifest["files"]), uploaded=False)
    if existing is not None:
        if not overwrite:
            raise PublishError(f"{uri} already holds a different version {manifest['name']}/{manifest['version']}: "
                               "versions are immutable; build a new version number (or pass --overwrite)")
        manifest_blob.delete()  # readers stop picking it before its files change

    for relative in sorted(manifest["files"]):
        bucket.blob(f"{prefix}/{relative}").upload_from_filename(str(version_dir / relative))
    listed = set(manifest["files"]) | {MANIFEST_NAME}
    for blob in client.list_blobs(bucket_name, prefix=f"{prefix}/"):
        if blob.name[len(prefix) + 1:] not in listed:
            blob.delete()  # left over from an overwritten version
    manifest_blob.upload_from_string(manifest_bytes, content_type="application/json")
    _LOGGER.info("published %s (%d files, manifest last)", uri, len(manifest["files"]))
    return Published(uri, len(manifest["files"]), uploaded=True)


def parse_destination(destination: str) -> tuple[str, str]:
    """gs://BUCKET[/path] -> (bucket, path), path "models" when absent."""
    if not destination.startswith("gs://"):
        raise PublishError(f"destination {destination!r} must be gs://BUCKET[/path]")
    bucket, _, path = destination[len("gs://"):].partition("/")
    if not bucket:
        raise PublishError(f"destination {destination!r} names no bucket")
    return bucket, path.strip("/") or "models"
