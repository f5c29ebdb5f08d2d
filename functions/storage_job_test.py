"""Unit tests of the job contract, beside it: the golden object resource in, the job and its
Pub/Sub attributes out (the worker's `reconcile` builds its jobs with the same module)."""

from __future__ import annotations

import ast
import datetime as dt
import json
import sys
from pathlib import Path

import pytest

import storage_job

SOURCE = Path(__file__).parent / "storage_job.py"
GOLDEN = json.loads((Path(__file__).parent.parent / "tests" / "data" / "gcs_notification_finalize.json").read_text())
NOW = dt.datetime(2026, 11, 22, 22, 27, 5, tzinfo=dt.timezone.utc)


def golden_job(**resource_changes) -> dict:
    return storage_job.job_from_object({**GOLDEN["data"], **resource_changes}, event_id="42",
                                       event_type=storage_job.FINALIZED_EVENT_TYPE,
                                       event_time="2026-11-22T22:27:04Z", received_at=NOW)


def test_job_from_object_is_the_documented_job():
    assert golden_job() == {
        "schema_version": "1",
        "event_key": "uploads/incoming/golden/cat photo.png#1795386424652715",
        "bucket": "uploads",
        "name": "incoming/golden/cat photo.png",
        "generation": "1795386424652715",
        "size": 9,
        "content_type": "image/png",
        "time_created": "2026-11-22T22:27:04.652711Z",
        "metadata": {"run_id": "golden"},
        "event_id": "42",
        "event_type": "google.cloud.storage.object.v1.finalized",
        "event_time": "2026-11-22T22:27:04Z",
        "function_received_at": "2026-11-22T22:27:05+00:00",
    }


def test_job_from_object_takes_numbers_and_missing_optional_fields():
    job = golden_job(generation=1795386424652715, size=None, metadata=None, contentType=None)
    assert job["generation"] == "1795386424652715" and job["size"] is None
    assert job["metadata"] == {} and job["content_type"] is None


@pytest.mark.parametrize("resource, message", [
    ({"name": "a.png", "generation": "1"}, "event data lacks bucket"),
    ({"bucket": "uploads", "generation": "1"}, "event data lacks name"),
    ({"bucket": "uploads"}, "event data lacks name, generation"),
    ({"bucket": "uploads", "name": "a.png", "generation": "x1"}, "generation 'x1' is not a number"),
    ({"bucket": "uploads", "name": "a.png", "generation": "1", "size": "big"}, "size 'big' is not a number"),
    (["not", "an", "object"], "not a JSON object"),
])
def test_a_malformed_resource_raises_value_error_saying_what_is_wrong(resource, message):
    with pytest.raises(ValueError, match=message):
        storage_job.job_from_object(resource, event_id="1", event_type=storage_job.FINALIZED_EVENT_TYPE,
                                    event_time=None, received_at=NOW)


def test_attributes_carry_identity_but_not_the_object_name():
    attributes = storage_job.job_attributes(golden_job())
    assert attributes == {"bucket": "uploads", "generation": "1795386424652715", "event_id": "42",
                          "schema_version": storage_job.JOB_SCHEMA_VERSION}
    assert all(isinstance(value, str) for value in attributes.values())  # Pub/Sub takes only strings


def test_event_key_is_bucket_object_and_generation():
    assert storage_job.event_key("b", "a/b.png", "7") == "b/a/b.png#7"


def test_the_contract_needs_only_the_standard_library():
    # The worker images copy this file without the function's requirements.
    imported = set()
    for node in ast.walk(ast.parse(SOURCE.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported - {"__future__"} <= set(sys.stdlib_module_names)
