"""The job contract: a Cloud Storage object resource -> the job message on the jobs topic.

One source for everyone who publishes a job: the Cloud Function (main.py, beside this file) and
the worker's `reconcile` command, which republishes the job of an upload that has no row
(worker/reconcile.py loads this file by path through worker/job_contract.py). Standard library
only, pure functions: the function is deployed from this directory as is, and the worker images
copy this file without the function's dependencies.
"""

from __future__ import annotations

import datetime as dt

FINALIZED_EVENT_TYPE = "google.cloud.storage.object.v1.finalized"
JOB_SCHEMA_VERSION = "1"


def event_key(bucket: str, name: str, generation: str) -> str:
    """The identity of one upload, used from here to the BigQuery insertId.

    A re-upload of the same name makes a new generation, hence a new key and a new row.
    """
    return f"{bucket}/{name}#{generation}"


def job_from_object(resource: dict, *, event_id: str, event_type: str, event_time: str | None,
                    received_at: dt.datetime) -> dict:
    """Object resource (JSON API form: generation and size as strings) -> job dict.

    event_id, event_type and event_time say which event the job stands for; received_at is when
    the publisher got it. Raises ValueError on a malformed resource, naming what is wrong.
    """
    if not isinstance(resource, dict):
        raise ValueError("event data is not a JSON object (expected the Cloud Storage object resource)")
    missing = [field for field in ("bucket", "name", "generation") if not resource.get(field)]
    if missing:
        raise ValueError(f"event data lacks {', '.join(missing)}")
    generation = str(resource["generation"])
    if not generation.isdigit():
        raise ValueError(f"generation {generation!r} is not a number")
    size = resource.get("size")
    try:
        size = int(size) if size is not None else None
    except (TypeError, ValueError):
        raise ValueError(f"size {size!r} is not a number")
    return {
        "schema_version": JOB_SCHEMA_VERSION,
        "event_key": event_key(resource["bucket"], resource["name"], generation),
        "bucket": resource["bucket"],
        "name": resource["name"],
        "generation": generation,
        "size": size,
        "content_type": resource.get("contentType"),
        "time_created": resource.get("timeCreated"),
        "metadata": resource.get("metadata") or {},
        "event_id": event_id,
        "event_type": event_type,
        "event_time": event_time,
        "function_received_at": received_at.isoformat(),
    }


def job_attributes(job: dict) -> dict[str, str]:
    """The Pub/Sub message attributes of a job (its data is the job as JSON).

    The object name stays in the data only: attribute values are capped at 1024 bytes.
    """
    return {
        "bucket": job["bucket"],
        "generation": job["generation"],
        "event_id": str(job["event_id"]),
        "schema_version": JOB_SCHEMA_VERSION,
    }
