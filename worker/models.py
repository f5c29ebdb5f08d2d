"""Where the worker's model version comes from: a local directory or a bucket.

WORKER_MODEL_URI takes one of:

    /models/demo/3            a pinned local version directory
    /models/demo              the latest local version: highest numeric sub-directory with a manifest
    gs://BUCKET/models/demo/3 a pinned published version
    gs://BUCKET/models/demo   the latest published version: highest numeric version whose
                              manifest.json exists (publishing uploads the manifest last, so a
                              half-published version is never picked)

A published version is downloaded into WORKER_MODEL_CACHE_DIR/<bucket>/<path>/<version>/ (never
inside the version itself), every file is checked against the manifest's sha256, and only then is
the directory renamed into place; the next start reuses it when it still verifies and its manifest
matches the bucket's. Every version, local or downloaded, is verified before the engine loads it.
A running worker looks for newer versions of a "latest" location every WORKER_MODEL_POLL_S
(worker/rollout.py) and switches to one between batches.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from modelspec.errors import ManifestError
from modelspec.manifest import MANIFEST_NAME, verify_manifest

_LOGGER = logging.getLogger(__name__)
GCS_SCHEME = "gs://"


class ModelLocationError(RuntimeError):
    """No usable model version at the configured location; the message says what to do."""


@dataclass(frozen=True)
class LocatedModel:
    path: Path  # a local, verified version directory
    manifest: dict[str, Any]
    source: str  # where it came from: the version's local path or gs:// URI
    downloaded: bool = False  # True when this start fetched it from the bucket


def locate_model(uri: str, cache_dir: Path, storage_client: Callable[[], Any] | None = None) -> LocatedModel:
    """Resolve uri (see module doc) to a verified local version directory.

    storage_client is a factory (called only for gs:// URIs), e.g.
    `lambda: worker.clients.storage_client(project)`, which honours STORAGE_EMULATOR_HOST.
    """
    uri = str(uri).strip()
    if not uri:
        raise ModelLocationError("no model location: set WORKER_MODEL_URI (a version directory or gs:// URI)")
    if uri.startswith(GCS_SCHEME):
        if storage_client is None:
            raise ModelLocationError(f"{uri}: a gs:// model location needs a storage client")
        return _locate_gcs(uri, Path(cache_dir), storage_client())
    return _locate_local(Path(uri))


def is_version_name(name: str) -> bool:
    """TF Serving's rule: a version directory's name is a positive integer."""
    return name.isdigit() and int(name) > 0


# Local ----------------------------------------------------------------------------------------

def _locate_local(path: Path) -> LocatedModel:
    if (path / MANIFEST_NAME).is_file():
        version_dir = path
    elif path.is_dir():
        versions = local_versions(path)
        if not versions:
            raise ModelLocationError(
                f"{path} has no manifest.json and no numeric version sub-directory with one: "
                "point WORKER_MODEL_URI at a model version (make model builds build/models/demo/1)")
        version_dir = path / str(versions[0])
    else:
        raise ModelLocationError(f"model location {path} does not exist (and has no manifest.json)")
    try:
        manifest = verify_manifest(version_dir)
    except ManifestError as exc:
        raise ModelLocationError(f"model version {version_dir} fails verification: {exc}") from None
    return LocatedModel(path=version_dir, manifest=manifest, source=str(version_dir))


# Cloud Storage --------------------------------------------------------------------------------

def parse_gcs_uri(uri: str) -> tuple[str, str]:
    """gs://bucket/a/b/ -> ("bucket", "a/b")."""
    rest = uri[len(GCS_SCHEME):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ModelLocationError(f"{uri} names no bucket (expected gs://BUCKET/models/NAME[/VERSION])")
    return bucket, prefix.strip("/")


def published_versions(client, bucket: str, prefix: str) -> list[int]:
    """Every N with `<prefix>/N/manifest.json` in the bucket, highest first (publishing uploads the
    manifest last, so a version still uploading is not among them)."""
    pattern = re.compile(rf"^{re.escape(prefix)}/(\d+)/{re.escape(MANIFEST_NAME)}$" if prefix
                         else rf"^(\d+)/{re.escape(MANIFEST_NAME)}$")
    versions = []
    for blob in client.list_blobs(bucket, prefix=f"{prefix}/" if prefix else None):
        match = pattern.match(blob.name)
        if match and is_version_name(match.group(1)):
            versions.append(int(match.group(1)))
    return sorted(versions, reverse=True)


def latest_published_version(client, bucket: str, prefix: str) -> int | None:
    """Highest N with `<prefix>/N/manifest.json` in the bucket, or None."""
    versions = published_versions(client, bucket, prefix)
    return versions[0] if versions else None


def local_versions(root: Path) -> list[int]:
    """Numeric sub-directories of root that hold a manifest, highest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(p.name) for p in root.iterdir()
                   if p.is_dir() and is_version_name(p.name) and (p / MANIFEST_NAME).is_file()), reverse=True)


def follows_latest(uri: str) -> bool:
    """True when uri names a model (its latest version), not one version: gs://B/models/NAME, or a
    local folder of numeric versions. Only such a location can roll out a newer version."""
    uri = str(uri).strip().rstrip("/")
    if uri.startswith(GCS_SCHEME):
        _, prefix = parse_gcs_uri(uri)
        return not is_version_name(prefix.rsplit("/", 1)[-1])
    return not (Path(uri) / MANIFEST_NAME).is_file()


def version_uri(root_uri: str, version: int) -> str:
    """The location of one version under a model's root (gs:// or a local folder)."""
    return f"{str(root_uri).strip().rstrip('/')}/{version}"


def _locate_gcs(uri: str, cache_dir: Path, client) -> LocatedModel:
    bucket, prefix = parse_gcs_uri(uri)
    last = prefix.rsplit("/", 1)[-1]
    if is_version_name(last):
        version_prefix = prefix
    else:
        version = latest_published_version(client, bucket, prefix)
        if version is None:
            raise ModelLocationError(f"no published version under {uri}: publish one with "
                                     f"`python -m modelkit publish VERSION_DIR gs://{bucket}/...`")
        version_prefix = f"{prefix}/{version}" if prefix else str(version)
    source = f"{GCS_SCHEME}{bucket}/{version_prefix}"

    manifest_blob = client.bucket(bucket).blob(f"{version_prefix}/{MANIFEST_NAME}")
    from google.api_core.exceptions import NotFound

    try:
        manifest_bytes = manifest_blob.download_as_bytes()
    except NotFound:
        raise ModelLocationError(f"{source}/{MANIFEST_NAME} does not exist: that version is not published "
                                 "(or still uploading; the manifest goes last)") from None
    remote = _parse_manifest(manifest_bytes, source)

    target = cache_dir / bucket / PurePosixPath(version_prefix)
    if (target / MANIFEST_NAME).is_file() and (target / MANIFEST_NAME).read_bytes() == manifest_bytes:
        try:
            manifest = verify_manifest(target)
        except ManifestError as exc:
            _LOGGER.warning("cached model %s fails verification (%s): downloading it again", target, exc)
        else:
            _LOGGER.info("model %s reused from the cache %s", source, target)
            return LocatedModel(path=target, manifest=manifest, source=source)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.download-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        for relative in sorted(remote["files"]):
            local = staging / _safe_relative(relative, source)
            local.parent.mkdir(parents=True, exist_ok=True)
            client.bucket(bucket).blob(f"{version_prefix}/{relative}").download_to_filename(str(local))
        (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
        try:
            manifest = verify_manifest(staging)
        except ManifestError as exc:
            raise ModelLocationError(f"{source} does not match its manifest after download: {exc}") from None
        _move_into_place(staging, target, manifest_bytes)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _LOGGER.info("model %s downloaded to %s (%d files, verified)", source, target, len(remote["files"]))
    return LocatedModel(path=target, manifest=manifest, source=source, downloaded=True)


def _move_into_place(staging: Path, target: Path, manifest_bytes: bytes) -> None:
    """Rename the verified download into the cache. Another worker sharing the cache may have
    put the same version there meanwhile: then keep theirs (it may be loading from it). A cached
    copy of different content (the version was overwritten in the bucket) is replaced."""
    for _ in range(3):
        try:
            staging.rename(target)
            return
        except OSError:
            if not target.exists():
                raise
        cached = target / MANIFEST_NAME
        if cached.is_file() and cached.read_bytes() == manifest_bytes:
            shutil.rmtree(staging, ignore_errors=True)
            return
        retired = target.parent / f".{target.name}.retired-{uuid.uuid4().hex[:8]}"
        try:
            target.rename(retired)
        except FileNotFoundError:
            continue
        shutil.rmtree(retired, ignore_errors=True)
    raise ModelLocationError(f"cannot move the download of {target.name} into {target.parent}")


def _parse_manifest(data: bytes, source: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ModelLocationError(f"{source}/{MANIFEST_NAME} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ModelLocationError(f"{source}/{MANIFEST_NAME} has no files table")
    return manifest


def _safe_relative(relative: str, source: str) -> PurePosixPath:
    """A manifest path must stay inside the version directory."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts or not path.parts or relative == MANIFEST_NAME:
        raise ModelLocationError(f"{source}/{MANIFEST_NAME} lists an unsafe path {relative!r}")
    return path


__all__ = ["LocatedModel", "ModelLocationError", "follows_latest", "is_version_name", "latest_published_version",
           "local_versions", "locate_model", "parse_gcs_uri", "published_versions", "version_uri"]
