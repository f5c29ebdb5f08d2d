"""Unit tests of the function, beside it: pure parts directly, the HTTP surface through
functions-framework's own app (the same code path `functions-framework` serves)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cloudevents.http import CloudEvent
from functions_framework import create_app

import main

SOURCE = Path(__file__).parent / "main.py"
GOLDEN = json.loads((Path(__file__).parent.parent / "tests" / "data" / "gcs_notification_finalize.json").read_text())
NOW = dt.datetime(2026, 11, 22, 22, 27, 5, tzinfo=dt.timezone.utc)


def settings(**overrides) -> main.FunctionSettings:
    values = dict(jobs_topic="projects/p/topics/jobs", upload_bucket="uploads", upload_prefix="incoming/",
                  max_event_age_s=3600.0, publish_timeout_s=5.0)
    values.update(overrides)
    return main.FunctionSettings(**values)


def storage_event(data=None, event_type=main.FINALIZED_EVENT_TYPE, time="2026-11-22T22:27:04Z") -> CloudEvent:
    return CloudEvent({"id": "42", "source": "//storage.googleapis.com/projects/_/buckets/uploads",
                       "type": event_type, "time": time}, GOLDEN["data"] if data is None else data)


def test_build_job_carries_the_upload_identity_and_its_times():
    job = main.build_job(storage_event(), NOW)
    assert job["event_key"] == "uploads/incoming/golden/cat photo.png#1795386424652715"
    assert (job["bucket"], job["name"], job["generation"]) == ("uploads", "incoming/golden/cat photo.png",
                                                              "1795386424652715")
    assert job["size"] == 9 and job["content_type"] == "image/png"
    assert job["time_created"] == "2026-11-22T22:27:04.652711Z"
    assert job["event_id"] == "42" and job["metadata"] == {"run_id": "golden"}
    assert job["function_received_at"] == NOW.isoformat()


@pytest.mark.parametrize("data, problem", [
    ({"name": "a.png", "generation": "1"}, "bucket"),
    ({"bucket": "uploads", "generation": "1"}, "name"),
    ({"bucket": "uploads", "name": "a.png", "generation": "x1"}, "not a number"),
    ({"bucket": "uploads", "name": "a.png", "generation": "1", "size": "big"}, "size"),
    (["not", "an", "object"], "not a JSON object"),
])
def test_build_job_rejects_malformed_events_saying_what_is_wrong(data, problem):
    with pytest.raises(ValueError, match=problem):
        main.build_job(storage_event(data), NOW)


@pytest.mark.parametrize("changes, reason", [
    ({"bucket": "other"}, "not the upload bucket"),
    ({"name": "elsewhere/a.png"}, "outside the upload prefix"),
    ({"event_time": "2026-11-22T20:00:00Z"}, "old"),
])
def test_skip_reason_names_why_an_event_is_not_ours(changes, reason):
    job = {**main.build_job(storage_event(), NOW), **changes}
    assert reason in main.skip_reason(job, settings(), NOW)


def test_skip_reason_is_none_for_our_events_and_age_check_can_be_disabled():
    job = {**main.build_job(storage_event(), NOW), "event_time": "2020-01-01T00:00:00Z"}
    assert main.skip_reason(job, settings(max_event_age_s=0), NOW) is None
    assert main.skip_reason(main.build_job(storage_event(), NOW), settings(), NOW) is None


def test_settings_explain_what_is_missing():
    with pytest.raises(RuntimeError, match="JOBS_TOPIC"):
        main.FunctionSettings.from_env({"UPLOAD_BUCKET": "b"})
    with pytest.raises(RuntimeError, match="GOOGLE_CLOUD_PROJECT"):
        main.FunctionSettings.from_env({"JOBS_TOPIC": "jobs", "UPLOAD_BUCKET": "b"})
    with pytest.raises(RuntimeError, match="MAX_EVENT_AGE_S"):
        main.FunctionSettings.from_env({"JOBS_TOPIC": "projects/p/topics/t", "UPLOAD_BUCKET": "b",
                                        "MAX_EVENT_AGE_S": "soon"})
    parsed = main.FunctionSettings.from_env({"JOBS_TOPIC": "jobs", "GOOGLE_CLOUD_PROJECT": "p", "UPLOAD_BUCKET": "b"})
    assert parsed.jobs_topic == "projects/p/topics/jobs" and parsed.upload_prefix == ""


@pytest.fixture
def client(monkeypatch):
    # Publishing would need a server: point at a closed port, so a publish attempt fails loudly.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
    monkeypatch.setenv("JOBS_TOPIC", "projects/p/topics/jobs")
    monkeypatch.setenv("UPLOAD_BUCKET", "uploads")
    monkeypatch.setenv("UPLOAD_PREFIX", "incoming/")
    monkeypatch.setenv("MAX_EVENT_AGE_S", "0")
    monkeypatch.setenv("PUBLISH_TIMEOUT_S", "2")
    return create_app("on_object_finalized", str(SOURCE), "cloudevent").test_client()


def binary_mode_headers(event_type=main.FINALIZED_EVENT_TYPE, bucket="uploads") -> dict:
    return {"ce-specversion": "1.0", "ce-id": "7", "ce-type": event_type,
            "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
            "ce-subject": "objects/x", "Content-Type": "application/json"}


def test_other_event_types_buckets_and_prefixes_are_ignored_with_200(client):
    other_type = client.post("/", headers=binary_mode_headers("google.cloud.storage.object.v1.deleted"),
                             data=json.dumps(GOLDEN["data"]))
    other_bucket = client.post("/", headers=binary_mode_headers(bucket="other"),
                               data=json.dumps({**GOLDEN["data"], "bucket": "other"}))
    outside = client.post("/", headers=binary_mode_headers(),
                          data=json.dumps({**GOLDEN["data"], "name": "elsewhere/x.png"}))
    assert [r.status_code for r in (other_type, other_bucket, outside)] == [200, 200, 200]


def test_malformed_storage_events_get_a_400_naming_the_problem(client):
    response = client.post("/", headers=binary_mode_headers(), data=json.dumps({"bucket": "uploads"}))
    assert response.status_code == 400
    assert b"lacks name, generation" in response.data


def test_a_request_that_is_not_a_cloudevent_gets_a_400(client):
    assert client.post("/", data="{}", headers={"Content-Type": "application/json"}).status_code == 400


def test_a_failed_publish_fails_the_invocation_so_eventarc_retries(client):
    response = client.post("/", headers=binary_mode_headers(), data=json.dumps(GOLDEN["data"]))
    assert response.status_code == 500
