"""Cloud Function (2nd gen): a Cloud Storage object was finalized -> one inference job on Pub/Sub.

Deployed from this directory as is (`--source=functions --entry-point=on_object_finalized`).
It only parses, filters and publishes; the worker does everything else. The job itself is built
by storage_job.py, beside this file.

Settings (environment):
  JOBS_TOPIC          topic path `projects/P/topics/T`, or a short name with GOOGLE_CLOUD_PROJECT
  UPLOAD_BUCKET       the only bucket whose events become jobs (required)
  UPLOAD_PREFIX       only objects whose name starts with this become jobs ("" = all)
  MAX_EVENT_AGE_S     events older than this are dropped, so retries of ancient events stop
                      (default 86400; 0 disables)
  PUBLISH_TIMEOUT_S   how long to wait for Pub/Sub to accept the job (default 30)
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import sys
from dataclasses import dataclass

import functions_framework
from cloudevents.http import CloudEvent
from werkzeug.exceptions import BadRequest

# The job contract, beside this file (functions-framework and the Cloud Functions runtime put this
# directory on sys.path); the worker's `reconcile` republishes jobs with the same module.
from storage_job import FINALIZED_EVENT_TYPE, job_attributes, job_from_object


@dataclass(frozen=True)
class FunctionSettings:
    jobs_topic: str
    upload_bucket: str
    upload_prefix: str
    max_event_age_s: float
    publish_timeout_s: float

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ = os.environ) -> "FunctionSettings":
        topic = env.get("JOBS_TOPIC", "").strip()
        if not topic:
            raise RuntimeError("JOBS_TOPIC is not set: give the jobs topic path projects/P/topics/T")
        if not topic.startswith("projects/"):
            project = env.get("GOOGLE_CLOUD_PROJECT", "").strip()
            if not project:
                raise RuntimeError(
                    f"JOBS_TOPIC={topic!r} is a short name: set GOOGLE_CLOUD_PROJECT or give projects/P/topics/T"
                )
            topic = f"projects/{project}/topics/{topic}"
        bucket = env.get("UPLOAD_BUCKET", "").strip()
        if not bucket:
            raise RuntimeError("UPLOAD_BUCKET is not set: give the bucket whose uploads are classified")
        return cls(
            jobs_topic=topic,
            upload_bucket=bucket,
            upload_prefix=env.get("UPLOAD_PREFIX", ""),
            max_event_age_s=_number(env, "MAX_EVENT_AGE_S", 86400.0),
            publish_timeout_s=_number(env, "PUBLISH_TIMEOUT_S", 30.0),
        )


def _number(env, name: str, default: float) -> float:
    raw = env.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise RuntimeError(f"{name}={raw!r} is not a number")
    if value < 0:
        raise RuntimeError(f"{name}={raw!r} must be >= 0")
    return value


def parse_rfc3339(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def build_job(cloud_event: CloudEvent, received_at: dt.datetime) -> dict:
    """CloudEvent of a finalized object -> job dict. Raises ValueError on a malformed event."""
    data = cloud_event.get_data()
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except ValueError:
            raise ValueError("event data is not JSON")
    return job_from_object(data, event_id=cloud_event["id"], event_type=cloud_event["type"],
                           event_time=cloud_event.get("time"), received_at=received_at)


def skip_reason(job: dict, settings: FunctionSettings, now: dt.datetime) -> str | None:
    """Why this job is not ours to publish, or None when it is."""
    if job["bucket"] != settings.upload_bucket:
        return f"bucket {job['bucket']} is not the upload bucket {settings.upload_bucket}"
    if not job["name"].startswith(settings.upload_prefix):
        return f"object is outside the upload prefix {settings.upload_prefix!r}"
    if settings.max_event_age_s and job["event_time"]:
        age_s = (now - parse_rfc3339(job["event_time"])).total_seconds()
        if age_s > settings.max_event_age_s:
            return f"event is {age_s:.0f} s old, over MAX_EVENT_AGE_S={settings.max_event_age_s:.0f}"
    return None


def log(severity: str, message: str, **fields) -> None:
    # One JSON line per entry: Cloud Logging turns it into a structured entry with severity.
    print(json.dumps({"severity": severity, "message": message, **fields}, default=str), file=sys.stdout, flush=True)


@functools.cache
def _settings() -> FunctionSettings:
    return FunctionSettings.from_env()


@functools.cache
def _publisher():
    from google.cloud import pubsub_v1

    # A job is tiny and the caller waits for it: do not hold it back for batching.
    return pubsub_v1.PublisherClient(batch_settings=pubsub_v1.types.BatchSettings(max_messages=1))


@functions_framework.cloud_event
def on_object_finalized(cloud_event: CloudEvent) -> None:
    received_at = dt.datetime.now(dt.timezone.utc)
    settings = _settings()
    event_id = cloud_event.get("id")
    if cloud_event.get("type") != FINALIZED_EVENT_TYPE:
        log("INFO", "ignored: not an object-finalized event", event_id=event_id, event_type=cloud_event.get("type"))
        return
    try:
        job = build_job(cloud_event, received_at)
    except ValueError as exc:
        log("ERROR", f"malformed storage event: {exc}", event_id=event_id)
        raise BadRequest(f"malformed storage event {event_id}: {exc}")
    reason = skip_reason(job, settings, received_at)
    if reason:
        log("INFO", f"ignored: {reason}", event_id=event_id, event_key=job["event_key"])
        return
    future = _publisher().publish(settings.jobs_topic, json.dumps(job).encode(), **job_attributes(job))
    # Raising here fails the invocation, so Eventarc retries it: no upload is lost to a publish error.
    message_id = future.result(timeout=settings.publish_timeout_s)
    log("INFO", "job published", event_id=event_id, event_key=job["event_key"], message_id=message_id)

