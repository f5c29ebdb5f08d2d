"""Rolling a newer model version into a running worker, between batches.

With WORKER_MODEL_URI naming a model rather than one version (gs://BUCKET/models/NAME, or a local
folder of numeric versions) and WORKER_MODEL_POLL_S > 0, a watcher thread looks every so often for
a version above the one being served. It downloads it, verifies every file against the manifest,
loads and warms the engine beside the serving one, and offers it to the batch runner. The runner
switches at the start of its next batch (batches in flight finish on the old version) and frees the
old engine after the last batch that holds it (worker/batch.py, ServedModel).

A version that fails verification or loading is refused with one log line and never tried again by
this process; the serving version goes on. A version still uploading has no manifest yet (publish
uploads it last), so it is not seen at all until it is complete. A failure that may pass (the bucket
did not answer) is logged and tried again at the next look.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from worker.batch import BatchRunner, ServedModel
from worker.models import (GCS_SCHEME, ModelLocationError, follows_latest, local_versions, locate_model,
                           parse_gcs_uri, published_versions, version_uri)

_LOGGER = logging.getLogger(__name__)


class Refused(Exception):
    """This version cannot be served (verification or loading failed): it is not tried again."""


class ModelWatcher:
    """Looks for a newer version every poll_s seconds and offers it, loaded and warmed, to the runner.

    The collaborators are plain callables, so tests drive it with in-memory fakes:
    list_versions() -> published versions (any order); prepare(version) -> ServedModel, raising
    Refused for a version that must not be served; offer(model) hands it to the batch runner.
    """

    def __init__(self, *, root: str, serving_version: int, list_versions: Callable[[], list[int]],
                 prepare: Callable[[int], ServedModel], offer: Callable[[ServedModel], None], poll_s: float):
        self.root = root
        self.serving_version = serving_version  # the newest version offered (or served since start)
        self.refused: dict[int, str] = {}  # version -> why
        self._list_versions = list_versions
        self._prepare = prepare
        self._offer = offer
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> int | None:
        """One look: offer the highest newer version that verifies and loads; returns it, or None.
        Newer versions that are refused are skipped for the next one down."""
        candidates = sorted((v for v in set(self._list_versions())
                             if v > self.serving_version and v not in self.refused), reverse=True)
        for version in candidates:
            where = version_uri(self.root, version)
            try:
                model = self._prepare(version)
            except Refused as exc:
                self.refused[version] = str(exc)
                _LOGGER.warning("refused model version %s: %s; still serving version %d", where, exc,
                                self.serving_version, extra={"refused_version": version})
                continue
            self._offer(model)
            _LOGGER.info("model version %s is loaded and warmed; it serves from the next batch", where,
                         extra={"model_version": version, "previous_version": self.serving_version})
            self.serving_version = version
            return version
        return None

    def start(self) -> "ModelWatcher":
        self._thread = threading.Thread(target=self._loop, name="model-watcher", daemon=True)
        self._thread.start()
        _LOGGER.info("watching %s for versions above %d every %g s", self.root, self.serving_version, self._poll_s)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.check()
            except Exception as exc:  # the bucket did not answer, a disk filled: look again later
                _LOGGER.warning("looking for a newer model version under %s failed: %s: %s; trying again in %g s",
                                self.root, type(exc).__name__, exc, self._poll_s)


def version_lister(root: str, storage_client: Callable[[], Any]) -> Callable[[], list[int]]:
    """The published versions under a model's root: manifests in the bucket, or local sub-folders."""
    if root.startswith(GCS_SCHEME):
        bucket, prefix = parse_gcs_uri(root)
        return lambda: published_versions(storage_client(), bucket, prefix)
    return lambda: local_versions(Path(root))


def version_preparer(root: str, cache_dir: Path, storage_client: Callable[[], Any],
                     load_engine: Callable[[Path, dict], Any]) -> Callable[[int], ServedModel]:
    """prepare(version) for ModelWatcher: download and verify (worker.models), then load and warm
    the engine with load_engine(path, manifest). Verification and load failures raise Refused."""

    def prepare(version: int) -> ServedModel:
        try:
            located = locate_model(version_uri(root, version), cache_dir, storage_client)
        except ModelLocationError as exc:
            raise Refused(f"fails verification: {exc}") from None
        said = str(located.manifest.get("version"))
        if said != str(version):
            raise Refused(f"its manifest says version {said}, not {version}")
        try:
            engine = load_engine(located.path, located.manifest)
            return ServedModel(engine, located.manifest, source=located.source)  # reads the spec too
        except Exception as exc:
            raise Refused(f"fails to load: {type(exc).__name__}: {exc}") from None

    return prepare


def start_rollout(runner: BatchRunner, *, location: str, poll_s: float, cache_dir: Path,
                  storage_client: Callable[[], Any], load_engine: Callable[[Path, dict], Any]) -> ModelWatcher | None:
    """Start watching `location` for newer versions when it names a model (not one version) and
    poll_s > 0; None otherwise (the version found at start is pinned)."""
    if poll_s <= 0:
        _LOGGER.info("WORKER_MODEL_POLL_S=0: model %s/%s is pinned for this process", runner.model_name,
                     runner.model_version)
        return None
    if not follows_latest(location):
        return None  # a pinned version: nothing newer can come
    root = location.strip().rstrip("/")
    if not runner.model_version.isdigit():
        _LOGGER.warning("model %s/%s: a version that is not a number cannot be compared; not watching %s",
                        runner.model_name, runner.model_version, root)
        return None
    watcher = ModelWatcher(root=root, serving_version=int(runner.model_version),
                           list_versions=version_lister(root, storage_client),
                           prepare=version_preparer(root, cache_dir, storage_client, load_engine),
                           offer=runner.offer, poll_s=poll_s)
    return watcher.start()
