"""Parse the job messages the Cloud Function publishes (pure functions, no I/O)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass


class MalformedJob(ValueError):
    """The message is not a job this worker understands: permanent, it goes to the errors table."""


@dataclass(frozen=True)
class Job:
    event_key: str
    bucket: str
    name: str
    generation: int
    size: int | None
    content_type: str | None
    time_created: dt.datetime | None
    function_received_at: dt.datetime | None
    run_id: str | None


def parse_timestamp(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def parse_job(data: bytes) -> Job:
    try:
        body = json.loads(data)
    except ValueError:
        raise MalformedJob("message data is not JSON")
    if not isinstance(body, dict):
        raise MalformedJob("message data is not a JSON object")
    missing = [key for key in ("event_key", "bucket", "name", "generation") if not body.get(key)]
    if missing:
        raise MalformedJob(f"job lacks {', '.join(missing)}")
    try:
        generation = int(body["generation"])
        size = int(body["size"]) if body.get("size") is not None else None
    except (TypeError, ValueError):
        raise MalformedJob(f"generation {body.get('generation')!r} or size {body.get('size')!r} is not a number")
    metadata = body.get("metadata") or {}
    return Job(
        event_key=str(body["event_key"]),
        bucket=str(body["bucket"]),
        name=str(body["name"]),
        generation=generation,
        size=size,
        content_type=body.get("content_type"),
        time_created=parse_timestamp(body.get("time_created")),
        function_received_at=parse_timestamp(body.get("function_received_at")),
        run_id=metadata.get("run_id") if isinstance(metadata, dict) else None,
    )


def partial_identity(data: bytes) -> dict:
    """Best-effort identity of a malformed job, so its error row still says which upload it was."""
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(body, dict):
        return {}
    return {key: body.get(key) for key in ("event_key", "bucket", "name", "generation")}
