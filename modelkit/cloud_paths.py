"""Where training reads its dataset and writes its model version: a local folder or Cloud Storage.

On Vertex AI a custom job sees Cloud Storage in two ways: the API (the storage client) and Cloud
Storage FUSE, which mounts every bucket the job's service account can read at /gcs/BUCKET
(gs://b/p is /gcs/b/p). Training reads a gs:// dataset through the mount when it is there (no copy),
else downloads the prefix into a scratch folder. It writes a gs:// model version through the API,
with modelkit.publish (manifest last), never through the mount: a folder rename on FUSE is a copy
and delete, so a reader could find half a version there.

The job's environment (https://cloud.google.com/vertex-ai/docs/training/code-requirements):
AIP_MODEL_DIR is where the job should write its model (base_output_directory + "/model/"); it is
the default of `train --out`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from modelkit.errors import DatasetError, ModelkitError

_LOGGER = logging.getLogger(__name__)
GCS = "gs://"
FUSE_ROOT = Path("/gcs")
# Set by Vertex AI in every custom job's containers.
VERTEX_MARKERS = ("CLOUD_ML_JOB_ID", "AIP_MODEL_DIR")


def split_gcs(uri: str) -> tuple[str, str]:
    """gs://bucket/a/b/ -> ("bucket", "a/b")."""
    if not uri.startswith(GCS):
        raise ModelkitError(f"{uri!r} is not a gs:// URI")
    bucket, _, prefix = uri[len(GCS):].partition("/")
    if not bucket:
        raise ModelkitError(f"{uri!r} names no bucket (expected gs://BUCKET/PATH)")
    return bucket, prefix.strip("/")


def to_fuse_path(uri: str, fuse_root: Path = FUSE_ROOT) -> Path:
    """gs://b/p -> /gcs/b/p (Cloud Storage FUSE on Vertex AI)."""
    bucket, prefix = split_gcs(uri)
    return fuse_root / bucket / prefix if prefix else fuse_root / bucket


def from_fuse_path(path: str | Path, fuse_root: Path = FUSE_ROOT) -> str | None:
    """/gcs/b/p -> gs://b/p; None for a path outside the mount."""
    try:
        relative = PurePosixPath(Path(path).as_posix()).relative_to(fuse_root.as_posix())
    except ValueError:
        return None
    if not relative.parts:
        return None
    return GCS + "/".join(relative.parts)


def on_vertex(env: Mapping[str, str] = os.environ) -> bool:
    return any(env.get(name) for name in VERTEX_MARKERS)


def output_location(out: str | None, env: Mapping[str, str] = os.environ, fuse_root: Path = FUSE_ROOT) -> str:
    """Where the version goes: --out, else AIP_MODEL_DIR; a FUSE path becomes its gs:// URI (written
    through the API, manifest last). Returns a local path or a gs:// URI (of the models root)."""
    chosen = out or env.get("AIP_MODEL_DIR", "")
    if not chosen:
        raise ModelkitError("no output: pass --out (a local models root or gs://BUCKET/models) or run where "
                            "AIP_MODEL_DIR is set (a Vertex AI custom job with base_output_directory)")
    if chosen.startswith(GCS):
        return chosen.rstrip("/")
    return from_fuse_path(chosen, fuse_root) or chosen


def dataset_folder(data: str, scratch: Path, client_factory: Callable[[], Any],
                   fuse_root: Path = FUSE_ROOT) -> Path:
    """A local folder holding the dataset: `data` itself, its FUSE path, or a download into scratch."""
    if not data.startswith(GCS):
        return Path(data)
    mounted = to_fuse_path(data, fuse_root)
    if mounted.is_dir():
        _LOGGER.info("dataset %s read through Cloud Storage FUSE at %s", data, mounted)
        return mounted
    return download_prefix(data, scratch, client_factory())


def download_prefix(uri: str, scratch: Path, client) -> Path:
    """Copy every object under gs://bucket/prefix/ into scratch/<prefix name>/, keeping sub-folders."""
    bucket, prefix = split_gcs(uri)
    target = Path(scratch) / (PurePosixPath(prefix).name or bucket)
    count = 0
    for blob in client.list_blobs(bucket, prefix=f"{prefix}/" if prefix else None):
        relative = PurePosixPath(blob.name[len(prefix):].lstrip("/") if prefix else blob.name)
        if not relative.parts or blob.name.endswith("/"):
            continue  # a "folder" placeholder object
        if ".." in relative.parts:
            raise DatasetError(f"{uri}: object {blob.name!r} would land outside the dataset folder")
        local = target.joinpath(*relative.parts)
        local.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(local))
        count += 1
    if not count:
        raise DatasetError(f"no objects under {uri}/: upload the dataset there (one sub-folder per class), e.g. "
                           f"gcloud storage cp -r DATASET_DIR {uri}")
    _LOGGER.info("dataset %s downloaded: %d files into %s", uri, count, target)
    return target


def next_version(location: str, name: str, client_factory: Callable[[], Any]) -> int:
    """One above the highest version of `name` at a models root (local or gs://, manifest present)."""
    from worker.models import local_versions, published_versions

    if location.startswith(GCS):
        bucket, prefix = split_gcs(location)
        versions = published_versions(client_factory(), bucket, f"{prefix}/{name}" if prefix else name)
    else:
        versions = local_versions(Path(location) / name)
    return (versions[0] if versions else 0) + 1


def published_manifest_exists(location: str, name: str, version: int, client) -> bool:
    bucket, prefix = split_gcs(location)
    path = "/".join(part for part in (prefix, name, str(version), "manifest.json") if part)
    return client.bucket(bucket).blob(path).exists()


def available_cores() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota)) if quota else cores


def _cgroup_quota() -> int | None:
    for path, parse in (("/sys/fs/cgroup/cpu.max", _quota_v2), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if parse:
            return parse(text)
        try:
            quota = int(text)
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            return None
        return -(-quota // period) if quota > 0 and period > 0 else None
    return None


def _quota_v2(text: str) -> int | None:
    match = re.fullmatch(r"(\d+|max)\s+(\d+)", text)
    if not match or match.group(1) == "max":
        return None
    return -(-int(match.group(1)) // int(match.group(2)))
