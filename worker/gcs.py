"""Download one object, at the job's generation, into memory."""

from __future__ import annotations

from google.api_core.exceptions import NotFound
from google.cloud.storage.retry import DEFAULT_RETRY

from worker.batch import PermanentError
from worker.jobs import Job


class GcsFetcher:
    def __init__(self, client, timeout_s: float = 30.0):
        self._client = client
        self._timeout_s = timeout_s
        self._retry = DEFAULT_RETRY.with_timeout(timeout_s)

    def fetch(self, job: Job) -> bytes:
        # Asking for the generation means a replaced object is not silently classified in its place.
        blob = self._client.bucket(job.bucket).blob(job.name, generation=job.generation)
        try:
            return blob.download_as_bytes(timeout=self._timeout_s, retry=self._retry)
        except NotFound:
            raise PermanentError(
                "object_not_found",
                f"gs://{job.bucket}/{job.name} generation {job.generation} no longer exists "
                "(deleted or replaced before the worker downloaded it); upload it again to classify it",
            )
